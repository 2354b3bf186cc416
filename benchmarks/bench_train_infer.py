"""Training and inference throughput of fp32, QAT and DivQAT victims, measured in one run.

    python benchmarks/bench_train_infer.py [--archs resnet8 resnet20] [--out benchmarks/results/train_infer.json]

Training: images/s of the real training loop (``divqat.train.fit``: augmentation, channels_last,
SGD step) at batch 128 on Fashion-MNIST-shaped data (1x28x28, 10 classes), for fp32, QAT
(fake-quant graph) and DivQAT (the same plus the frozen fp32 teacher's forward pass and the
divergence). Inference: images/s at batch 256 of the fp32 model run eagerly versus the
converted int8 program compiled with inductor freezing, both saved as victim artifacts and
served by ``load_victim`` as a user gets them; the channels_last fp32 module is shown for reference.
Prints a table and the ratios the issue asks about; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from divqat.models import VictimNet
from divqat.quant import convert_to_int8, export_dynamic, prepare_qat
from divqat.train import CrossEntropy, DivQATLoss, DivQATSettings, FitConfig, fit
from divqat.victim import load_victim, save_victim

SHAPE, CLASSES = (1, 28, 28), 10


def train_timer(model, objective, images, labels, batch: int):
    """A zero-argument callable timing one pass of the real training loop (images/s); warmed up."""
    cfg = FitConfig(epochs=1, batch_size=batch, lr=0.01, schedule="constant", progress=False, log_epochs=False)
    fit(model, images[: batch * 3], labels[: batch * 3], objective, cfg)  # warm-up

    def once() -> float:
        start = time.perf_counter()
        fit(model, images, labels, objective, cfg)
        return len(images) / (time.perf_counter() - start)

    return once


def infer_timer(forward, batch: int, iters: int):
    """A zero-argument callable timing ``iters`` batches of inference (images/s); warmed up
    (the int8 victim compiles on its first call)."""
    x = torch.rand(batch, *SHAPE)
    with torch.no_grad():
        for _ in range(3):
            forward(x)

    @torch.no_grad()
    def once() -> float:
        start = time.perf_counter()
        for _ in range(iters):
            forward(x)
        return batch * iters / (time.perf_counter() - start)

    return once


def interleaved(timers: dict, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` for each timer, the timers taking turns, so that a burst of load from
    another process on this shared machine hits both sides of a ratio alike."""
    best = dict.fromkeys(timers, 0.0)
    for _ in range(repeats):
        for name, once in timers.items():
            best[name] = max(best[name], once())
    return best


def bench_arch(arch: str, train_images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train_images, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, train_images).astype(np.int64)
    example = torch.rand(4, *SHAPE)

    teacher = VictimNet(arch, SHAPE[0], CLASSES, (0.286,), (0.353,))
    r: dict = {"arch": arch}
    r["train_fp32_img_s"] = interleaved({"fp32": train_timer(teacher, CrossEntropy(), images, labels, 128)},
                                        repeats)["fp32"]
    teacher.eval().to(memory_format=torch.contiguous_format)

    # QAT and DivQAT prepared as `divqat train` does (the teacher channels_last).
    qat = prepare_qat(copy.deepcopy(teacher), example)
    divqat = prepare_qat(copy.deepcopy(teacher), example)
    loss = DivQATLoss(copy.deepcopy(teacher).to(memory_format=torch.channels_last), DivQATSettings(alpha=1.0))
    steps = interleaved({"qat": train_timer(qat, CrossEntropy(), images, labels, 128),
                         "divqat": train_timer(divqat, loss, images, labels, 128)}, repeats)
    r["train_qat_img_s"], r["train_divqat_img_s"] = steps["qat"], steps["divqat"]

    # Inference as a user gets it: both victims saved as artifacts and served by load_victim
    # (fp32: the exported program run eagerly; int8: compiled with inductor freezing). For
    # reference, not the target: the fp32 nn.Module with channels_last weights and input, the
    # fastest eager fp32 we know of here.
    teacher.eval().to(memory_format=torch.contiguous_format)
    meta = {"dataset": "synthetic", "arch": arch, "input_shape": list(SHAPE), "classes": [str(i) for i in range(CLASSES)],
            "mean": [0.286], "std": [0.353]}
    with tempfile.TemporaryDirectory() as tmp:
        save_victim(Path(tmp) / "fp32", export_dynamic(teacher, example), {**meta, "mode": "fp32"})
        save_victim(Path(tmp) / "int8", convert_to_int8(qat, example), {**meta, "mode": "qat"})
        cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
        infer = interleaved({
            "fp32": infer_timer(load_victim(Path(tmp) / "fp32"), 256, 10),
            "int8": infer_timer(load_victim(Path(tmp) / "int8"), 256, 40),
            "fp32_cl": infer_timer(lambda x: cl(x.contiguous(memory_format=torch.channels_last)), 256, 10),
        }, repeats)
    r["infer_fp32_eager_img_s"] = infer["fp32"]
    r["infer_int8_compiled_img_s"] = infer["int8"]
    r["infer_fp32_eager_channels_last_img_s"] = infer["fp32_cl"]
    r["divqat_step_cost_vs_qat"] = r["train_qat_img_s"] / r["train_divqat_img_s"]
    r["qat_step_cost_vs_fp32"] = r["train_fp32_img_s"] / r["train_qat_img_s"]
    r["int8_speedup_vs_fp32_eager"] = r["infer_int8_compiled_img_s"] / r["infer_fp32_eager_img_s"]
    r["int8_speedup_vs_fp32_eager_channels_last"] = (
        r["infer_int8_compiled_img_s"] / r["infer_fp32_eager_channels_last_img_s"])
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet8", "resnet20"])
    parser.add_argument("--train-images", type=int, default=128 * 24)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timings, taken in turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/train_infer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = [bench_arch(a, args.train_images, args.repeats) for a in args.archs]
    header = ("arch", "train fp32", "train qat", "train divqat", "divqat/qat cost", "infer fp32 eager",
              "infer int8", "int8 speedup", "(fp32 eager channels_last", "int8 speedup vs it)")
    print(" | ".join(header))
    for r in results:
        print(" | ".join([
            r["arch"], f"{r['train_fp32_img_s']:,.0f}", f"{r['train_qat_img_s']:,.0f}",
            f"{r['train_divqat_img_s']:,.0f}", f"{r['divqat_step_cost_vs_qat']:.2f}x",
            f"{r['infer_fp32_eager_img_s']:,.0f}", f"{r['infer_int8_compiled_img_s']:,.0f}",
            f"{r['int8_speedup_vs_fp32_eager']:.1f}x", f"{r['infer_fp32_eager_channels_last_img_s']:,.0f}",
            f"{r['int8_speedup_vs_fp32_eager_channels_last']:.1f}x",
        ]))
    print("(images/s; training at batch 128, inference at batch 256; best of "
          f"{args.repeats}; {args.threads} threads)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "torch": torch.__version__, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
