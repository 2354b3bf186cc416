"""fp32 against bf16 autocast training, seed by seed: the fp32 teacher and the knockoff surrogates.

    python benchmarks/bench_bf16.py --victims V0 V1 V2 [--dataset 'fashion-mnist[0-4]']
        [--holdout 5000] [--teacher-epochs 3] [--budget 5000] [--threads 2]
        [--work DIR] [--out benchmarks/results/bf16.json]

For each seed i (one per victim given, i = 0, 1, ...), in turns so that a change of load falls on
both precisions:
- an fp32 teacher (``divqat train --mode fp32``) trained with ``--precision fp32`` and then
  ``--precision bf16``: test accuracy and seconds;
- a KnockoffNets surrogate against victim ``Vi`` (soft labels, the holdout, ``--budget``
  queries, resnet8, 5 epochs, at least 150 steps: the default preset's thief) trained in fp32
  and then in bf16: adversary accuracy and seconds.

Prints, per model and precision, mean ± sd over the seeds, and the bf16 − fp32 difference paired
by seed with its 95 % confidence interval (``divqat.experiment.stats``), plus the time ratio.
The precision really used is recorded: on a CPU without native bf16 both runs are fp32 and the
script says so. The victims are int8 victim folders, e.g. the qat victims of a default run
(``runs/default/stages/victim/<key>``, one per seed).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from divqat.attacks import SurrogateTraining
from divqat.experiment.stats import mean_sd, paired_difference
from divqat.io import write_json
from divqat.pipelines.attack import AttackRequest, attack_victim
from divqat.pipelines.context import RunContext
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.train.trainer import bf16_supported, resolve_precision

PRECISIONS = ("fp32", "bf16")


def teacher_run(args: argparse.Namespace, seed: int, precision: str, work: Path) -> dict:
    out = work / f"teacher-{precision}-{seed}"
    start = time.perf_counter()
    m = train_victim(TrainRequest(dataset=args.dataset, arch="resnet8", mode="fp32", out=out,
                                  epochs=args.teacher_epochs, holdout=args.holdout, seed=seed,
                                  precision=precision, progress=False))
    return {"accuracy": m["test_accuracy"], "seconds": time.perf_counter() - start,
            "ran_in": m.get("precision", "fp32")}


def surrogate_run(args: argparse.Namespace, victim: str, seed: int, precision: str, work: Path) -> dict:
    training = SurrogateTraining(arch="resnet8", epochs=5, min_steps=150, precision=precision, seed=seed,
                                 progress=False)
    start = time.perf_counter()
    m = attack_victim(AttackRequest(victim, "knockoff", [args.budget], transfer="holdout",
                                    training=training, out=work / f"surrogate-{precision}-{seed}"),
                      RunContext(progress=False))
    return {"accuracy": m["results"][-1]["adversary_accuracy"], "seconds": time.perf_counter() - start,
            "ran_in": resolve_precision(precision)}


def summary(rows: list[dict], model: str) -> list[str]:
    lines = []
    by = {p: [r for r in rows if r["model"] == model and r["precision"] == p] for p in PRECISIONS}
    for p in PRECISIONS:
        acc, sd, n = mean_sd(100 * r["accuracy"] for r in by[p])
        secs, _, _ = mean_sd(r["seconds"] for r in by[p])
        lines.append(f"  {model:9s} {p}: accuracy {acc:.2f} ± {sd or 0:.2f} % (n={n}), "
                     f"{secs:.1f} s per run, ran in {sorted({r['ran_in'] for r in by[p]})}")
    diff = paired_difference(100 * (b["accuracy"] - f["accuracy"]) for f, b in zip(by["fp32"], by["bf16"], strict=True))
    ratio = statistics.fmean(f["seconds"] / b["seconds"] for f, b in zip(by["fp32"], by["bf16"], strict=True))
    ci = f"[{diff.low:+.2f}, {diff.high:+.2f}]" if diff.has_interval else "(n=1, no interval)"
    lines.append(f"  {model:9s} bf16 − fp32: {diff.mean:+.2f} points, 95 % CI {ci}"
                 f"{' within noise' if diff.within_noise else ''}; fp32 / bf16 time {ratio:.2f}x")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--victims", nargs="+", required=True, help="int8 victim folders, one per seed")
    p.add_argument("--dataset", default="fashion-mnist[0-4]")
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--budget", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-teachers", action="store_true", help="surrogates only")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default="benchmarks/results/bf16.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-bf16-"))
    print(f"native bf16 on this CPU: {bf16_supported()}; {args.threads} threads; work in {work}")
    rows = []
    try:
        for seed, victim in enumerate(args.victims):
            for precision in PRECISIONS:
                if not args.skip_teachers:
                    r = teacher_run(args, seed, precision, work)
                    rows.append({"model": "teacher", "precision": precision, "seed": seed, **r})
                    print(f"seed {seed} teacher {precision}: {r['accuracy']:.2%} in {r['seconds']:.0f} s",
                          flush=True)
                r = surrogate_run(args, victim, seed, precision, work)
                rows.append({"model": "surrogate", "precision": precision, "seed": seed, **r})
                print(f"seed {seed} surrogate {precision}: {r['accuracy']:.2%} in {r['seconds']:.0f} s",
                      flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("over the seeds:")
    for model in ("teacher", "surrogate"):
        if any(r["model"] == model for r in rows):
            print("\n".join(summary(rows, model)))
    write_json(Path(args.out), {"args": vars(args), "rows": rows})
    print(f"rows in {args.out}")


if __name__ == "__main__":
    main()
