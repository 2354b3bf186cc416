"""The old and the new path of one stage kind, back to back, seed by seed: seconds and accuracy.

    python benchmarks/bench_stages.py teacher --seeds 0 1 2 [--epochs 3]
    python benchmarks/bench_stages.py victim --teachers T0 T1 T2 --mode divqat --variant out
    python benchmarks/bench_stages.py eval --victims V0 V1 V2 [--transfer holdout]
    python benchmarks/bench_stages.py compile [--pairs 3] [--images 1000]
    python benchmarks/bench_stages.py profile --victim V [--transfer holdout] [--eval-precision bf16]
    python benchmarks/bench_stages.py convs

Every run uses one torch thread (the experiment's ``numerics.threads``); A (the old path) and B
(the new one) alternate, A, B, A, B, ..., so that a change of load on a shared machine falls on
both. Each prints per pair the wall and the CPU seconds (this process's; on a loaded machine the
CPU seconds say more), the ratio of the medians A / B, and for the paths that change numbers the
difference B - A of the stage's own metrics paired by seed with its 95 % interval
(``divqat.experiment.stats``):

- ``teacher``: the fp32 teacher (default preset's shape: ``fashion-mnist[0-4]``, holdout 5,000)
  trained in fp32 (A) and under bf16 autocast (B): test accuracy.
- ``victim``: a QAT or DivQAT victim fine-tuned from the given teachers (one per seed) in fp32
  (A) and bf16 (B); ``--variant`` in / out / out-cap1 are the default preset's DivQAT victims:
  int8 test accuracy and KL to the teacher.
- ``eval``: a KnockoffNets thief's surrogates (the default's recipe, bf16 training, trained once
  per victim) measured on the test split in fp32 (A) and under bf16 autocast with BatchNorm
  folded (B, ``eval_precision: bf16``): adversary accuracy and agreement.
- ``compile``: the surrogate's training step eager (A) and ``torch.compile``-d (B), on random
  images at the surrogate's shape; the first compiled step's seconds (cold or warm: run with
  ``TORCHINDUCTOR_CACHE_DIR`` pointing to an empty folder for cold) and CPU seconds per step.
- ``profile``: where one default attack stage's CPU time goes (knockoff, the default preset's
  thief against victim ``V`` behind no defense, run once to load and compile the victim as a
  Ray worker holds it, then again under ``cProfile`` with CPU time): the phases and the
  functions that take the most.
- ``convs``: CPU milliseconds of each of resnet8's convolutions at the surrogate's batch (128
  images, 28x28), forward and backward, in bf16 channels_last (what the surrogates train with),
  bf16 NCHW and fp32 channels_last, with the forward's GFLOP/s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from divqat.experiment.stats import paired_difference
from divqat.io import write_json

DATASET, HOLDOUT = "fashion-mnist[0-4]", 5000
# The default preset's DivQAT victims.
VARIANTS = {"in": {"alpha": 2.0, "cap": 0.15},
            "out": {"alpha": 2.0, "cap": 0.3, "divergence_on": "out", "distill": 1.0},
            "out-cap1": {"alpha": 2.0, "cap": 1.0, "divergence_on": "out"}}


def clocked(fn: Callable[[], dict]) -> dict:
    """``fn()``'s metrics with its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return {**out, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def alternate(pairs: int, a: Callable[[int], dict], b: Callable[[int], dict]) -> list[dict]:
    """A(i), B(i) for i in range(pairs), in that order; rows with ``pair`` and ``path``."""
    rows = []
    for i in range(pairs):
        for path, fn in (("A", a), ("B", b)):
            row = {"pair": i, "path": path, **clocked(lambda fn=fn, i=i: fn(i))}
            rows.append(row)
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    return rows


def summary(rows: list[dict], metrics: tuple[str, ...], scale: float = 100.0) -> list[str]:
    a = [r for r in rows if r["path"] == "A"]
    b = [r for r in rows if r["path"] == "B"]
    lines = []
    for clock in ("wall", "cpu"):
        ma, mb = statistics.median(r[clock] for r in a), statistics.median(r[clock] for r in b)
        lines.append(f"{clock:4s} s: A {ma:.2f}, B {mb:.2f} (medians of {len(a)}); A / B = {ma / mb:.2f}x")
    for m in metrics:
        d = paired_difference(scale * (y[m] - x[m]) for x, y in zip(a, b, strict=True))
        if d is None:
            continue
        ci = f"[{d.low:+.2f}, {d.high:+.2f}]" if d.has_interval else "(n=1)"
        lines.append(f"{m}: A {statistics.fmean(scale * r[m] for r in a):.2f}, "
                     f"B {statistics.fmean(scale * r[m] for r in b):.2f}, B - A {d.mean:+.2f} {ci}"
                     f"{' within noise' if d.within_noise else ''}")
    return lines


def teacher(args: argparse.Namespace, work: Path) -> tuple[list[dict], tuple[str, ...]]:
    from divqat.pipelines.train import TrainRequest, train_victim

    def run(precision: str) -> Callable[[int], dict]:
        def one(i: int) -> dict:
            seed = args.seeds[i]
            m = train_victim(TrainRequest(dataset=DATASET, mode="fp32", out=work / f"t-{precision}-{seed}",
                                          epochs=args.epochs, holdout=HOLDOUT, seed=seed,
                                          precision=precision, data_root=args.data_root,
                                          progress=False, log_epochs=False))
            return {"seed": seed, "test_accuracy": m["test_accuracy"]}
        return one

    return alternate(len(args.seeds), run("fp32"), run("bf16")), ("test_accuracy",)


def victim(args: argparse.Namespace, work: Path) -> tuple[list[dict], tuple[str, ...]]:
    from divqat.pipelines.train import TrainRequest, train_victim
    from divqat.train.losses import DivQATSettings

    settings = DivQATSettings(**VARIANTS[args.variant]) if args.mode == "divqat" else DivQATSettings()

    def run(precision: str) -> Callable[[int], dict]:
        def one(i: int) -> dict:
            m = train_victim(TrainRequest(dataset=DATASET, mode=args.mode, teacher=args.teachers[i],
                                          out=work / f"v-{precision}-{i}", epochs=1, lr=0.01,
                                          holdout=HOLDOUT, seed=i, divqat=settings,
                                          precision=precision, data_root=args.data_root,
                                          progress=False, log_epochs=False))
            return {"seed": i, "int8_test_accuracy": m["int8_test_accuracy"],
                    "kl_to_teacher": m["kl_to_teacher"], "train_seconds": m["train_seconds"]}
        return one

    rows = alternate(len(args.teachers), run("fp32"), run("bf16"))
    return rows, ("int8_test_accuracy",)


def evaluation(args: argparse.Namespace, work: Path) -> tuple[list[dict], tuple[str, ...]]:
    from divqat.attacks import Knockoff, SurrogateTraining
    from divqat.blackbox import BlackBox, DefendedVictim
    from divqat.data import load_dataset, to_victim_input
    from divqat.pipelines.attack import load_transfer_set, surrogate_predictions
    from divqat.victim import load_victim

    stolen = []
    for i, path in enumerate(args.victims):
        victim = load_victim(path)
        test = load_dataset(victim.metadata["dataset"], "test", args.data_root)
        images = to_victim_input(test.images, victim.input_shape)
        with torch.no_grad():
            answers = torch.cat([victim(images[s:s + 256]).argmax(1) for s in range(0, len(images), 256)])
        transfer = load_transfer_set(args.transfer, victim.metadata, args.data_root)
        training = SurrogateTraining(epochs=5, min_steps=150, precision="bf16", seed=i, progress=False)
        torch.manual_seed(i)
        for s in Knockoff().steal(BlackBox(DefendedVictim(victim), budget=max(args.budgets)), args.budgets,
                                  training, transfer=transfer):
            stolen.append((i, s.budget, s.surrogate, images, torch.as_tensor(test.labels), answers))
        print(f"victim {i}: {len(args.budgets)} surrogates trained", flush=True)

    def run(precision: str) -> Callable[[int], dict]:
        def one(k: int) -> dict:
            seed, budget, surrogate, images, labels, answers = stolen[k]
            pred = surrogate_predictions(surrogate, images, precision=precision)
            return {"seed": seed, "budget": budget, "adversary_accuracy": float((pred == labels).float().mean()),
                    "agreement": float((pred == answers).float().mean())}
        return one

    return alternate(len(stolen), run("fp32"), run("bf16")), ("adversary_accuracy", "agreement")


def compile_step(args: argparse.Namespace, work: Path) -> tuple[list[dict], tuple[str, ...]]:
    from divqat.attacks.base import SoftCrossEntropy, build_surrogate
    from divqat.data import augment, to_float

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=g)
    targets = torch.softmax(3 * torch.randn(args.images, 5, generator=g), 1)
    objective = SoftCrossEntropy()

    def train(compiled: bool) -> Callable[[int], dict]:
        def one(i: int) -> dict:
            model = build_surrogate("resnet8", (1, 28, 28), 5, seed=i).to(memory_format=torch.channels_last)
            forward = torch.compile(model, dynamic=False) if compiled else model
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            first = 0.0
            for step in range(args.steps + 1):
                start = time.perf_counter()
                idx = torch.randint(0, args.images, (128,), generator=g)
                x = augment(to_float(images[idx]), generator=g).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = forward(x)
                loss, _ = objective(logits.float(), targets[idx], x, 0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step == 0:  # the compiled path compiles here (or loads from inductor's cache)
                    first = time.perf_counter() - start
                    cpu = time.process_time()
            return {"first_step": first, "ms_per_step": 1000 * (time.process_time() - cpu) / args.steps}
        return one

    return alternate(args.pairs, train(False), train(True)), ()


def profile(args: argparse.Namespace, work: Path) -> None:
    import cProfile
    import pstats

    from divqat.pipelines.stages import AttackStageRequest, DefenseSetting, StageWork
    from divqat.stopwatch import measuring

    stage = StageWork(data_root=args.data_root)
    request = AttackStageRequest(name="knockoff", budgets=[1000, 5000], transfer=args.transfer, seed=0,
                                 surrogate={"arch": "resnet8", "epochs": 5, "min_steps": 150,
                                            "precision": "bf16", "eval_precision": args.eval_precision})
    stage.attack(work / "first", args.victim, DefenseSetting("none"), request)  # loads, compiles
    profiler = cProfile.Profile(time.process_time)
    cpu = time.process_time()
    with measuring() as watch:
        profiler.runcall(stage.attack, work / "profiled", args.victim, DefenseSetting("none"), request)
    print(f"{time.process_time() - cpu:.1f} CPU s; phases (wall): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(watch.totals.items(), key=lambda kv: -kv[1])))
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"divqat|run_backward|conv2d|batch_norm", 30)


def convs(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    layers = [("stem 1-16", 1, 16, 28, 3, 1), ("16-16", 16, 16, 28, 3, 1), ("16-32 /2", 16, 32, 28, 3, 2),
              ("32-32", 32, 32, 14, 3, 1), ("shortcut 16-32 /2", 16, 32, 28, 1, 2),
              ("32-64 /2", 32, 64, 14, 3, 2), ("64-64", 64, 64, 7, 3, 1), ("shortcut 32-64 /2", 32, 64, 14, 1, 2)]
    kinds = (("bf16 NHWC", torch.bfloat16, True), ("bf16 NCHW", torch.bfloat16, False),
             ("fp32 NHWC", torch.float32, True))
    for name, cin, cout, hw, k, stride in layers:
        cells = []
        for label, dtype, channels_last in kinds:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(128, cin, hw, hw, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(cin > 1)
            w = torch.randn(cout, cin, k, k, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            times = []
            for backward in (False, True):
                for rep in range(args.reps + 2):
                    if rep == 2:
                        cpu = time.process_time()
                    y = F.conv2d(x, w, stride=stride, padding=k // 2)
                    if backward:
                        y.backward(torch.ones_like(y))
                times.append(1000 * (time.process_time() - cpu) / args.reps)
            out_hw = (hw + 2 * (k // 2) - k) // stride + 1
            gflops = 2 * 128 * out_hw * out_hw * cout * cin * k * k / times[0] / 1e6
            cells.append(f"{label} {times[0]:.2f} / {times[1] - times[0]:.2f} ms ({gflops:.0f} GFLOP/s)")
        print(f"{name:18s}  " + "  ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--epochs", type=int, default=3)
    v = sub.add_parser("victim")
    v.add_argument("--teachers", nargs="+", required=True, help="fp32 victim folders, one per seed")
    v.add_argument("--mode", choices=("qat", "divqat"), default="qat")
    v.add_argument("--variant", choices=tuple(VARIANTS), default="in")
    e = sub.add_parser("eval")
    e.add_argument("--victims", nargs="+", required=True, help="int8 victim folders, one per seed")
    e.add_argument("--transfer", default="holdout")
    e.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000])
    c = sub.add_parser("compile")
    c.add_argument("--pairs", type=int, default=3)
    c.add_argument("--steps", type=int, default=30)
    c.add_argument("--images", type=int, default=1000)
    f = sub.add_parser("profile")
    f.add_argument("--victim", required=True, help="an int8 victim folder")
    f.add_argument("--transfer", default="holdout")
    f.add_argument("--eval-precision", default="fp32", choices=("fp32", "bf16"))
    k = sub.add_parser("convs")
    k.add_argument("--reps", type=int, default=10)
    for s in (t, v, e, c, f, k):
        s.add_argument("--data-root", default="data")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--out", default=None, help="rows as JSON (default: benchmarks/results/stages-WHAT.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "convs":
        return convs(args)
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    if args.what == "profile":
        try:
            return profile(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        run = {"teacher": teacher, "victim": victim, "eval": evaluation, "compile": compile_step}[args.what]
        rows, metrics = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = summary(rows, metrics)
    if args.what == "compile":
        for path in ("A", "B"):
            steps = [r["ms_per_step"] for r in rows if r["path"] == path]
            first = [r["first_step"] for r in rows if r["path"] == path]
            lines.append(f"{path}: {statistics.median(steps):.1f} CPU ms per step (median), first step "
                         f"{', '.join(f'{x:.1f}' for x in first)} s")
    print("\n".join(lines))
    out = Path(args.out or f"benchmarks/results/stages-{args.what}.json")
    write_json(out, {"args": vars(args), "rows": rows, "summary": lines,
                     "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__})
    print(f"rows in {out}")


if __name__ == "__main__":
    main()
