"""What each defense adds to one batch-256 query of an int8 victim, as a ratio to the undefended query.

    python benchmarks/bench_defenses.py [--victim DIR] [--repeats 7] [--iters 10] [--out benchmarks/results/defenses.json]

The undefended query is the victim alone (``victim(images) -> logits``); the defended one is the
whole served path, ``DefendedVictim(victim, defense)(images)``: the input check, the victim, the
softmax and the defense, which for none, top-k, rounding, reverse-sigmoid and dcp run inside the
victim's compiled int8 program (``Defense.epilogue``). Timed in pairs of blocks: ``--iters``
queries to the victim alone, then ``--iters`` served ones (each block warm, as in a deployment
that serves one way), a fraction of a second apart so that load from other processes mostly
cancels; ``--repeats`` rounds, the defenses in an order rotated per round. The verdict ``ratio``
is the median over the rounds of (median served ms / median alone ms). For the fusable defenses the
``eager`` column is the same ratio with the defense run eagerly after the victim
(``fuse=False``), the path that missed the target before the fusion.

With ``--components ROUNDS`` (default 200) it also times each step of the served path (the
input check, the softmax, each formula defense's ``serve``) right after a victim call, as when
serving, and alone: the difference is what the victim's run costs the small steps after it.

Target (DCP's claim, algorithms.md section 3): none, top-k, rounding, reverse-sigmoid and dcp
each add at most 5%. MAD (a surrogate forward pass and a search per query) and adaptive
misinformation (a second model's forward pass) are reported; their models are untrained here,
which costs the same as trained ones. Without ``--victim`` a quick int8 resnet8 on 1x28x28 with
10 classes is built (QAT-prepared, observers calibrated on random images, converted, saved,
loaded as a user gets it): untrained, but it runs the same kernels as a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from divqat.blackbox import DefendedVictim
from divqat.defenses import create_defense
from divqat.models import VictimNet
from divqat.pipelines.defense_models import build_defense, random_surrogate
from divqat.quant import convert_to_int8, prepare_qat
from divqat.victim import load_victim, save_victim

SHAPE, CLASSES = (1, 28, 28), 10
TARGET = 1.05
# (name, params, held to the target?)
DEFENSES = [
    ("none", {}, True),
    ("top-k", {"k": 1}, True),
    ("rounding", {"decimals": 2}, True),
    ("reverse-sigmoid", {"beta": 0.5, "gamma": 0.2}, True),
    ("dcp", {"beta": 0.5, "gamma": 0.2}, True),
    ("random-noise", {"eps": 0.5}, False),
    ("adaptive-misinformation", {"tau": 0.5}, False),
    ("mad", {"eps": 0.5}, False),
]


def quick_victim(folder: Path) -> Path:
    """An untrained int8 resnet8 victim artifact (1x28x28, 10 classes) in ``folder``."""
    torch.manual_seed(0)
    example = torch.rand(4, *SHAPE)
    qat = prepare_qat(VictimNet("resnet8", SHAPE[0], CLASSES, (0.286,), (0.353,)), example)
    with torch.no_grad():  # observers need ranges before conversion
        for _ in range(4):
            qat(torch.rand(64, *SHAPE))
    meta = {"dataset": "synthetic", "arch": "resnet8", "mode": "qat", "input_shape": list(SHAPE),
            "classes": [str(i) for i in range(CLASSES)], "mean": [0.286], "std": [0.353]}
    return save_victim(folder / "int8", convert_to_int8(qat, example), meta)


def make_defense(name: str, params: dict, victim_dir: Path):
    if name == "adaptive-misinformation":
        # An untrained misinformation model of the victim's architecture: the same cost, no training.
        return create_defense(name, misinformation_model=random_surrogate(victim_dir, seed=1), **params)
    return build_defense(name, params, victim_dir)


def _block_ms(call, images: torch.Tensor, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call(images)
        times.append(1000 * (time.perf_counter() - start))
    return times


def paired_blocks(victim, served: DefendedVictim, images: torch.Tensor, iters: int) -> tuple[float, list[float]]:
    """A block of ``iters`` queries to the victim alone, then a block of ``iters`` served ones,
    each block warm as in a deployment that serves one way: (median served / median alone, the
    served milliseconds). The two blocks run a fraction of a second apart, so load from other
    processes mostly cancels in the ratio."""
    alone = _block_ms(victim, images, iters)
    defended = _block_ms(served, images, iters)
    return _median(defended) / _median(alone), defended


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _median_ms(times: list[float]) -> float:
    return 1000 * sorted(times)[len(times) // 2]


def components(victim, served: dict[str, DefendedVictim], images: torch.Tensor, rounds: int) -> dict:
    """Each step of the served path, timed right after a victim call (as it runs when serving)
    and again on its own, back to back: medians in ms. The difference is what the victim's run
    costs the steps after it (caches and predictors it evicted), which is most of the added time."""
    any_served = next(iter(served.values()))
    with torch.no_grad():
        logits = victim(images)
    clean = torch.softmax(logits, dim=1)
    steps = {"check_images": lambda: any_served.check_images(images),
             "softmax": lambda: torch.softmax(logits, dim=1)}
    for name, call in served.items():
        if name not in ("adaptive-misinformation", "mad"):
            steps[f"{name}.serve"] = (lambda d: lambda: d.serve(clean, logits, images))(call.defense)
    out = {}
    with torch.no_grad():
        for name, step in steps.items():
            after, alone = [], []
            for _ in range(rounds):
                victim(images)
                start = time.perf_counter()
                step()
                after.append(time.perf_counter() - start)
            for _ in range(rounds):
                start = time.perf_counter()
                step()
                alone.append(time.perf_counter() - start)
            out[name] = {"ms_after_victim": _median_ms(after), "ms_alone": _median_ms(alone)}
    return out


def bench(victim_dir: Path, batch: int, repeats: int, iters: int, component_rounds: int = 0) -> dict:
    victim = load_victim(victim_dir)
    images = torch.rand(batch, *victim.input_shape, generator=torch.Generator().manual_seed(0))
    # The served path (fused into the int8 program where the defense allows it), and for the
    # fusable defenses the same defense run eagerly after the victim, for comparison.
    served = {}
    for name, params, _ in DEFENSES:
        served[name] = DefendedVictim(victim, make_defense(name, params, victim_dir))
        if served[name].defense.fusable:
            served[f"{name} (eager)"] = DefendedVictim(victim, served[name].defense, fuse=False)
    with torch.no_grad():
        for _ in range(3):
            victim(images)  # warm-up; the first call compiles the int8 program
        for call in served.values():
            call(images)  # the first call of a fused one compiles it
    ratios: dict[str, list[float]] = {name: [] for name in served}
    ms: dict[str, list[float]] = {name: [] for name in served}
    alone: list[float] = []
    names = list(served)
    with torch.no_grad():
        for rep in range(repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                r, m = paired_blocks(victim, served[name], images, iters)
                ratios[name].append(r)
                ms[name] += m
            alone += _block_ms(victim, images, iters)
    results = []
    for name, given, held in DEFENSES:
        ratio = _median(ratios[name])
        row = {"defense": name, "given_params": given, "params": served[name].defense.params(),
               "fused": served[name].fused, "ms_defended": _median(ms[name]), "ratio": ratio,
               "target": TARGET if held else None, "meets_target": (ratio <= TARGET) if held else None}
        if f"{name} (eager)" in served:
            row["ratio_eager"] = _median(ratios[f"{name} (eager)"])
            row["ms_defended_eager"] = _median(ms[f"{name} (eager)"])
        results.append(row)
    r = {"victim": str(victim_dir), "victim_mode": victim.mode, "arch": victim.metadata.get("arch"),
         "input_shape": list(victim.input_shape), "batch": batch, "ms_undefended": _median(alone),
         "results": results}
    if component_rounds:
        r["components"] = components(victim, {k: v for k, v in served.items() if "(eager)" not in k},
                                     images, component_rounds)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--victim", type=Path, help="an int8 victim directory (default: build a quick one)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="rounds over all defenses")
    parser.add_argument("--iters", type=int, default=10, help="queries per timed block")
    parser.add_argument("--components", type=int, default=200, metavar="ROUNDS",
                        help="also time each step of the served path right after a victim call and "
                             "alone, median of ROUNDS (0: skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/defenses.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        victim_dir = args.victim if args.victim is not None else quick_victim(Path(tmp))
        r = bench(victim_dir, args.batch, args.repeats, args.iters, args.components)
    if args.victim is None:
        r["victim"] = "quick untrained int8 resnet8 (1x28x28, 10 classes)"

    print(f"{r['victim']} ({r['victim_mode']}): undefended {r['ms_undefended']:.2f} ms per batch of "
          f"{args.batch} (median)")
    print(f"{'defense':<24} {'params':<20} {'path':<6} {'ms/batch':>9} {'ratio':>7}  "
          f"{'eager':>7}  target (ratio)")
    for row in r["results"]:
        params = ", ".join(f"{k}={v}" for k, v in row["given_params"].items())
        verdict = ("reported" if row["target"] is None
                   else f"<= {row['target']:.2f} {'ok' if row['meets_target'] else 'MISSED'}")
        eager = f"{row['ratio_eager']:>6.3f}x" if "ratio_eager" in row else f"{'':>7}"
        print(f"{row['defense']:<24} {params:<20} {'fused' if row['fused'] else 'eager':<6} "
              f"{row['ms_defended']:>9.2f} {row['ratio']:>6.3f}x  {eager}  {verdict}")
    print(f"(ratio: median over {args.repeats} rounds of (served / victim alone), medians of blocks "
          f"of {args.iters} queries, "
          f"interleaved; eager: the same defense run after the victim instead of fused into its "
          f"program; {args.threads} threads)")
    if "components" in r:
        print(f"served-path steps, median ms of {args.components}: right after a victim call / alone")
        for name, c in r["components"].items():
            print(f"  {name:<24} {c['ms_after_victim']:>7.3f} / {c['ms_alone']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "torch": torch.__version__, "repeats": args.repeats, "iters": args.iters,
                               **r}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
