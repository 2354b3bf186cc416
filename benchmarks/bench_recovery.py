"""What the recovery thief's network can undo, per defense, on synthetic posteriors.

    python benchmarks/bench_recovery.py [--classes 10] [--train 4000] [--test 2000]
        [--steps 2000] [--seeds 0 1 2] [--out benchmarks/results/recovery.json]

Clean posteriors are softmax(z * s) with z ~ N(0, I_K) and a scale s ~ U(0, 6) per row (from
nearly uniform to confident). For each formula defense (the settings below) a recovery network
(``divqat.attacks.recovery.fit_recovery``, the recovery thief's defaults) is trained on
(defended, clean) pairs of ``--train`` rows and measured on ``--test`` other rows: the mean L1
distance to the clean posteriors of the defended and of the recovered answers, and how many
labels each gets wrong (where the defense kept every training pair's label, the recovered
answers keep the defended labels, as the recovery thief does). This is the network's part of the attack with the clean posteriors'
distribution known exactly (the thief's shadow models only approximate it): an upper bound on
what recovery takes back. Prints mean ± sd over the seeds per defense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from divqat.attacks.recovery import fit_recovery, keep_labels, l1, recover
from divqat.defenses import create_defense

SETTINGS = [
    ("dcp", {"beta": 0.5}), ("dcp", {"beta": 1.0}), ("reverse-sigmoid", {"beta": 0.5}),
    ("rounding", {"decimals": 1}), ("top-k", {"k": 2}), ("top-k", {"k": 1}),
    ("random-noise", {"eps": 0.5, "seed": 1}),
]


def posteriors(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 6, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/recovery.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, params in SETTINGS:
        runs = []
        for seed in args.seeds:
            defense = create_defense(name, **params)
            train = posteriors(args.train, args.classes, 2 * seed)
            test = posteriors(args.test, args.classes, 2 * seed + 1)
            start = time.perf_counter()
            net = fit_recovery(defense(train), train, steps=args.steps, seed=seed)
            seconds = time.perf_counter() - start
            defended = defense(test)
            recovered = recover(net, defended)
            # As the recovery thief does: a defense that kept every training label keeps them.
            if bool((defense(train).argmax(dim=1) == train.argmax(dim=1)).all()):
                recovered = keep_labels(recovered, defended.argmax(dim=1))
            truth = test.argmax(dim=1)
            runs.append({"seed": seed, "l1_defended": l1(defended, test),
                         "l1_recovered": l1(recovered, test),
                         "wrong_defended": int((defended.argmax(dim=1) != truth).sum()),
                         "wrong_recovered": int((recovered.argmax(dim=1) != truth).sum()),
                         "seconds": seconds})
        row = {"defense": name, "params": params, "runs": runs}
        for key in ("l1_defended", "l1_recovered"):
            values = [r[key] for r in runs]
            row[key] = statistics.mean(values)
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
        setting = " ".join(f"{k}={v}" for k, v in params.items())
        print(f"{name} {setting}: L1 defended {row['l1_defended']:.4f} ± {row['l1_defended_sd']:.4f}, "
              f"recovered {row['l1_recovered']:.4f} ± {row['l1_recovered_sd']:.4f}; wrong labels "
              f"{sum(r['wrong_defended'] for r in runs)} -> {sum(r['wrong_recovered'] for r in runs)} "
              f"of {args.test * len(runs)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
