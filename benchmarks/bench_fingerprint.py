"""Fingerprints of the file: does a copy of the victim match its IPGuard fingerprint,
and does an independently trained model not?

    OMP_NUM_THREADS=1 python benchmarks/bench_fingerprint.py --work runs/fingerprint \\
        [--dataset fashion-mnist] [--train 4000] [--thief 4000] [--epochs 4] [--points 100] \\
        [--margins 0.25,1,3] [--independent resnet8:1,resnet8:2,cnn:0,cnn:1,resnet20:0] [--seed 0]

Trains (once: folders under ``--work`` are reused) an fp32 ResNet-8 victim (seed ``--seed``;
the thief's fine-tuning takes the next seed) on the first
``--train`` training images, holding out the last ``--thief`` as the thief's own data, and the
independent models on the same ``--train`` images (other seeds, other architectures: ``cnn`` is
a small plain CNN defined here). Then:

- exports the victim with ``divqat export`` (an fp32 XNNPACK ``.pte``), once with its
  fingerprint and once without: the export's added cost;
- makes the thief's copies from the victim's weights: fine-tuned 1 and 5 epochs on the thief's
  data (SGD, lr 0.01, cosine, the project's training loop; and 5 epochs at lr 0.1, the victim's
  own peak rate, which moves much further), 30 % magnitude-pruned (global L1,
  ``torch.nn.utils.prune``), and requantized to int8 from the fp32 weights (PT2E post-training
  quantization with the x86 scheme, 512 thief images to calibrate);
- matches every suspect against the fingerprint (``divqat.ownership.fingerprint.match``) and
  prints one row each: test accuracy, match rate, the chance rate granted, agreement with the
  points' source labels, p-value and verdict; with ``--margins``, the same for fingerprints made
  at other margins from the torch victim (the margin's trade-off).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from divqat.data import load_dataset, to_float
from divqat.models.normalized import VictimNet
from divqat.ownership.fingerprint import (
    MARGIN,
    Fingerprint,
    generate_fingerprint,
    load_fingerprint,
    match,
    match_file,
)
from divqat.pipelines.export import export_victim, fingerprint_images
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.quant import export_dynamic
from divqat.train.losses import CrossEntropy
from divqat.train.trainer import FitConfig, fit, predict_logits
from divqat.victim import load_fp32_net, load_victim, read_metadata


class SmallCNN(nn.Module):
    """Another family than the victim's: two conv layers, no residual, no BatchNorm."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(64 * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def train(args, work: Path, arch: str, seed: int) -> Path:
    """An fp32 model on the victim's training images, trained once into ``work``."""
    out = work / f"{arch}-s{seed}"
    if not (out / "victim.json").exists():
        spec: str | nn.Module = SmallCNN() if arch == "cnn" else arch
        train_victim(TrainRequest(dataset=args.dataset, arch=spec, mode="fp32", epochs=args.epochs,
                                  limit=args.train, holdout=args.thief, seed=seed, out=out,
                                  progress=False, log_epochs=False))
    return out


def load_net(folder: Path) -> VictimNet:
    arch = SmallCNN() if read_metadata(folder)["arch"].endswith("SmallCNN") else None
    return load_fp32_net(folder, arch=arch)[0]


def labeller(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    @torch.no_grad()
    def labels(x: Tensor) -> Tensor:
        return model(x).argmax(1)

    return labels


def fine_tuned(net: VictimNet, thief, epochs: int, seed: int, lr: float = 0.01) -> VictimNet:
    """The thief's copy fine-tuned on its own labelled data (all layers, the FTAL of IPGuard)."""
    net = copy.deepcopy(net)
    fit(net, thief.images, thief.labels, CrossEntropy(),
        FitConfig(epochs=epochs, lr=lr, schedule="cosine", seed=seed, progress=False,
                  log_epochs=False))
    return net.eval()


def pruned(net: VictimNet, amount: float = 0.3) -> VictimNet:
    """The copy with the smallest ``amount`` of its conv and linear weights set to zero (global
    L1 magnitude pruning)."""
    from torch.nn.utils import prune

    net = copy.deepcopy(net)
    layers = [(m, "weight") for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in layers:
        prune.remove(module, name)
    return net.eval()


def requantized(net: VictimNet, calibration: Tensor) -> Callable[[Tensor], Tensor]:
    """int8 post-training quantization of the copy's fp32 weights (PT2E, x86 scheme: int8
    per-channel weights, uint8 activations), run eagerly."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    graph = export_dynamic(copy.deepcopy(net).eval(), calibration[:2]).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calibration.split(128):
            prepared(chunk)
    return convert_pt2e(prepared)


def row(name: str, fp: Fingerprint, model, test, note: str = "") -> str:
    labels_of = labeller(model)
    started = time.perf_counter()
    v = match(fp, labels_of)
    seconds = time.perf_counter() - started
    answers = labels_of(fp.inputs())
    source = float((answers == fp.sources).float().mean())
    with torch.no_grad():
        logits = predict_logits(model, test.images)
    acc = float((logits.argmax(1) == torch.as_tensor(test.labels)).float().mean())
    verdict = "verified" if v.verified else "not verified"
    return (f"| {name} | {acc:.2%} | {v.agreement:.0%} | {source:.0%} | {v.chance:.2f} | "
            f"{v.p_value:.1e} | {verdict} | {seconds * 1000:.0f} ms |{note}")


HEADER = ("| suspect | test acc. | match rate | agrees with source | chance granted | p-value | verdict "
          "| match time |\n|---|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train", type=int, default=4000, help="victim's training images")
    p.add_argument("--thief", type=int, default=4000, help="thief's images (the training split's tail)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--margins", default="", help="comma-separated extra margins to compare")
    p.add_argument("--independent", default="resnet8:1,resnet8:2,cnn:0,cnn:1,resnet20:0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the victim's seed (other seeds: other victims)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    independents = [(a, int(s)) for a, s in (item.split(":") for item in args.independent.split(",") if item)]
    if ("resnet8", args.seed) in independents:
        p.error(f"--independent resnet8:{args.seed} is the victim itself (--seed {args.seed})")
    victim_dir = train(args, args.work, "resnet8", args.seed)
    others = {f"independent {a} seed {s}": train(args, args.work, a, s) for a, s in independents}
    trained_s = time.perf_counter() - began

    suffix = f"-s{args.seed}" if args.seed else ""  # seed 0 keeps the names it always had
    program = args.work / f"victim{suffix}.pte"
    # Without first: the first export of a process also pays for loading ExecuTorch. Both are
    # timed in wall and in CPU seconds of this process (the machine may be shared).
    clocks = {}
    for name, path, fingerprint in (("without", f"plain{suffix}.pte", False), ("with", program.name, True)):
        cpu = time.process_time()
        clocks[name] = export_victim(victim_dir, args.work / path, fingerprint=fingerprint,
                                     fingerprint_points=args.points)
        clocks[name]["cpu"] = time.process_time() - cpu
    without, with_fp = clocks["without"], clocks["with"]
    fp = load_fingerprint(with_fp["fingerprint"])

    train_split = load_dataset(args.dataset, "train")
    thief = train_split.subset(slice(len(train_split) - args.thief, len(train_split)))
    test = load_dataset(args.dataset, "test")
    net = load_net(victim_dir)
    copies_began = time.perf_counter()
    suspects: list[tuple[str, Callable[[Tensor], Tensor], str]] = [
        ("exact copy (the .pte)", load_victim(program), ""),
        ("victim's torch network (fp32)", net, ""),
        ("fine-tuned 1 epoch", fine_tuned(net, thief, 1, seed=args.seed + 1), ""),
        ("fine-tuned 5 epochs", fine_tuned(net, thief, 5, seed=args.seed + 1), ""),
        ("fine-tuned 5 epochs at lr 0.1", fine_tuned(net, thief, 5, seed=args.seed + 1, lr=0.1), ""),
        ("30 % magnitude-pruned", pruned(net, 0.3), ""),
        ("requantized int8 (PTQ)", requantized(net, to_float(thief.images[:512])), ""),
    ]
    suspects += [(name, load_net(folder), "") for name, folder in others.items()]
    copies_s = time.perf_counter() - copies_began

    same = match_file(fp, program)
    other = match_file(fp, args.work / f"plain{suffix}.pte")
    print(f"# bench_fingerprint, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"victim {read_metadata(victim_dir)['arch']} fp32, seed {args.seed}, on {args.dataset} ({args.train} images, "
          f"{args.epochs} epochs); thief data {args.thief} held-out training images")
    print(f"export: {without['seconds']:.1f} s ({without['cpu']:.1f} s CPU) without the fingerprint, "
          f"{with_fp['seconds']:.1f} s ({with_fp['cpu']:.1f} s CPU) with it (the fingerprint "
          f"{with_fp['fingerprint_seconds']:.1f} s, {fp.params['cpu_seconds']:.1f} s CPU: {len(fp)} "
          f"points of {fp.params['candidates']} candidates, margin {fp.params['margin']}, "
          f"{Path(with_fp['fingerprint']).stat().st_size / 1024:.0f} KiB)")
    print(f"file hash: the .pte itself -> {same.evidence} (verified {same.verified}); the same "
          f"victim exported again without the fingerprint -> {other.evidence} (the export is "
          "deterministic)")
    print(f"\nfingerprint of the .pte (margin {fp.params['margin']}, labels from the program):\n")
    print(HEADER)
    for name, model, note in suspects:
        print(row(name, fp, model, test, note), flush=True)
    for margin in [float(m) for m in args.margins.split(",") if m]:
        if margin == MARGIN:
            continue
        starts = fingerprint_images(read_metadata(victim_dir), None, args.points)
        other_fp = generate_fingerprint(net, starts, points=args.points, margin=margin)
        print(f"\nmargin {margin} (from the torch victim, {other_fp.params['seconds']:.1f} s, "
              f"{other_fp.params['cpu_seconds']:.1f} s CPU):\n")
        print(HEADER)
        for name, model, note in suspects[1:]:
            print(row(name, other_fp, model, test, note), flush=True)
    print(f"\ntraining {trained_s:.0f} s (0 when reused), copies {copies_s:.0f} s, "
          f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
