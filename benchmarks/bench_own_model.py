"""A user's own architecture on a user's own image folder: accuracy, distance and speed, in one run.

    python scripts/make_image_folder.py --out photos --size 64
    python benchmarks/bench_own_model.py --folder photos --size 64 \\
        [--archs mobilenet_v3_small resnet18] [--epochs 4] [--work runs/own-bench] \\
        [--out benchmarks/results/own_model.json]

Per torchvision architecture, on ``image-folder@SIZE`` (``divqat train`` as a user runs it):

- accuracy: the fp32 model trained from scratch, its QAT and DivQAT int8 victims (x86, one epoch
  each, the defaults), their test accuracy and KL(fp32 || int8) on the test split;
- DivQAT step cost: images/s of the real training loop (batch 64) for the QAT and the DivQAT
  fake-quant models, timed in turns (best of ``--repeats``);
- int8 speed: ms per call at batch 1 and 64 of the x86 int8 program compiled with inductor
  freezing against the fp32 program compiled the same way, and of the int8 ``.pte`` (an edge QAT
  victim, XNNPACK) against the fp32 ``.pte``, each exactly at that batch (no bucket padding); every
  ratio is taken within this run (``bench_edge._time``: warm blocks in rotated order, median).

Trained victims are kept in ``--work`` and reused when there (delete it to retrain).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_edge import _raw_pte, _raw_torch, _time  # noqa: E402
from bench_train_infer import interleaved  # noqa: E402

from divqat.data import load_dataset  # noqa: E402
from divqat.pipelines.export import export_victim  # noqa: E402
from divqat.pipelines.train import TrainRequest, train_victim  # noqa: E402
from divqat.quant import prepare_qat  # noqa: E402
from divqat.train import CrossEntropy, DivQATLoss, FitConfig, fit  # noqa: E402
from divqat.train.losses import RECOMMENDED  # noqa: E402
from divqat.victim import load_fp32_net  # noqa: E402


def _victim(work: Path, name: str, req: TrainRequest) -> dict:
    """Train ``req`` into ``work/name`` unless a finished victim is there; its metrics."""
    out = work / name
    if not (out / "metrics.json").is_file():
        train_victim(TrainRequest(**{**req.__dict__, "out": out}))
    return json.loads((out / "metrics.json").read_text())


def _step_cost(teacher_dir: Path, images, labels, repeats: int) -> dict[str, float]:
    """Images/s of QAT and DivQAT training steps from the same teacher, timed in turns."""
    teacher, _ = load_fp32_net(teacher_dir)
    example = torch.rand(4, *images.shape[1:])
    cfg = FitConfig(epochs=1, batch_size=64, lr=0.01, schedule="constant", progress=False, log_epochs=False)
    models = {"qat": (prepare_qat(copy.deepcopy(teacher), example), CrossEntropy()),
              "divqat": (prepare_qat(copy.deepcopy(teacher), example),
                         DivQATLoss(copy.deepcopy(teacher).to(memory_format=torch.channels_last), RECOMMENDED))}

    def timer(model, objective):
        fit(model, images[:128], labels[:128], objective, cfg)  # warm-up

        def once() -> float:
            import time

            start = time.perf_counter()
            fit(model, images, labels, objective, cfg)
            return len(images) / (time.perf_counter() - start)

        return once

    return interleaved({k: timer(*v) for k, v in models.items()}, repeats)


def bench_arch(arch: str, args: argparse.Namespace) -> dict:
    dataset, spec = f"image-folder@{args.size}", f"torchvision:{arch}"
    work = Path(args.work) / arch
    base = TrainRequest(dataset=dataset, arch=spec, data_root=args.folder, progress=False, log_epochs=False)
    r: dict = {"arch": spec, "dataset": dataset}
    fp32 = _victim(work, "fp32", TrainRequest(**{**base.__dict__, "epochs": args.epochs}))
    r["fp32_test_accuracy"] = fp32["test_accuracy"]
    for mode in ("qat", "divqat"):
        m = _victim(work, mode, TrainRequest(**{**base.__dict__, "mode": mode, "teacher": work / "fp32",
                                                "epochs": 1, "divqat": RECOMMENDED if mode == "divqat"
                                                else base.divqat}))
        r[f"{mode}_int8_test_accuracy"] = m["int8_test_accuracy"]
        r[f"{mode}_kl_to_teacher"] = m["kl_to_teacher"]
    edge = _victim(work, "edge-qat", TrainRequest(**{**base.__dict__, "mode": "qat", "teacher": work / "fp32",
                                                      "epochs": 1, "target": "edge"}))
    r["edge_qat_int8_test_accuracy"] = edge["int8_test_accuracy"]

    train = load_dataset(dataset, "train", args.folder)
    steps = _step_cost(work / "fp32", train.images[:args.step_images], train.labels[:args.step_images],
                       args.repeats)
    r["train_qat_img_s"], r["train_divqat_img_s"] = steps["qat"], steps["divqat"]
    r["divqat_step_cost_vs_qat"] = steps["qat"] / steps["divqat"]

    programs = {}
    for name, victim in (("fp32", "fp32"), ("int8", "edge-qat")):
        out = work / f"{name}.pte"
        if not out.is_file():
            export_victim(work / victim, out, fingerprint=False)  # the program is what is timed
        programs[name] = out
    for batch in (1, 64):
        ms = _time({"x86 fp32": _raw_torch(work / "fp32", batch), "x86 int8": _raw_torch(work / "qat", batch),
                    "pte fp32": _raw_pte(programs["fp32"], batch), "pte int8": _raw_pte(programs["int8"], batch)},
                   args.rounds, args.iters)
        r[f"batch{batch}_ms"] = ms
        r[f"batch{batch}_int8_speedup_x86"] = ms["x86 fp32"] / ms["x86 int8"]
        r[f"batch{batch}_int8_speedup_pte"] = ms["pte fp32"] / ms["pte int8"]
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="an image folder (scripts/make_image_folder.py)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v3_small", "resnet18"])
    parser.add_argument("--epochs", type=int, default=4, help="fp32 training epochs (default: 4)")
    parser.add_argument("--step-images", type=int, default=640, help="images per step-cost timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", default="runs/own-bench")
    parser.add_argument("--out", default="benchmarks/results/own_model.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = [bench_arch(a, args) for a in args.archs]
    print("arch | fp32 acc | qat int8 acc (KL) | divqat int8 acc (KL) | divqat/qat step | "
          "int8 speed-up x86 b1 / b64 | .pte b1 / b64")
    for r in results:
        print(f"{r['arch']} | {r['fp32_test_accuracy']:.1%} | {r['qat_int8_test_accuracy']:.1%} "
              f"({r['qat_kl_to_teacher']:.4f}) | {r['divqat_int8_test_accuracy']:.1%} "
              f"({r['divqat_kl_to_teacher']:.4f}) | {r['divqat_step_cost_vs_qat']:.2f}x | "
              f"{r['batch1_int8_speedup_x86']:.2f}x / {r['batch64_int8_speedup_x86']:.2f}x | "
              f"{r['batch1_int8_speedup_pte']:.2f}x / {r['batch64_int8_speedup_pte']:.2f}x")
        for batch in (1, 64):
            print(f"  batch {batch} ms/call: " + ", ".join(f"{k} {v:.2f}" for k, v in r[f"batch{batch}_ms"].items()))
    print(f"({args.threads} threads; {args.folder} at {args.size} px; fp32 {args.epochs} epochs, "
          "qat/divqat 1 epoch)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "torch": torch.__version__, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
