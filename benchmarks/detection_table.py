"""The detection table of docs/results.md: each detector against each thief, over seeds.

    python benchmarks/detection_table.py --victim runs/victims/qat --out runs/detection [--seeds 0 1 2]

For every attack (knockoff on the holdout, knockoff on MNIST, knockoff-adaptive, jbda, dfme,
maze) at the default experiment's budgets (knockoff: 5,000 holdout / 4,000 MNIST queries, the
largest of its sweeps; dfme 5,000; the others 5,000), one run per seed watched by every detector
at once (``divqat.pipelines.detect.detect_attack``); the evasive knockoff (MNIST, mixing holdout
images) at mix 0.5 and 0.9; then each detector's false-alarm rate over benign streams of 5,000
queries. The detectors must be calibrated first (``divqat calibrate``). Writes OUT/runs.json
(every record) and OUT/table.md; a finished run is skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from divqat.attacks import SurrogateTraining
from divqat.io import write_json, write_text
from divqat.pipelines.context import RunContext
from divqat.pipelines.detect import DetectRequest, detect_attack

# (label, attack, attack params, transfer, budget)
ATTACKS = [
    ("knockoff, holdout", "knockoff", {}, "holdout", 5000),
    ("knockoff, MNIST", "knockoff", {}, "mnist", 4000),
    ("knockoff-adaptive, holdout", "knockoff-adaptive", {}, "holdout", 5000),
    ("jbda (seed: holdout)", "jbda", {}, "holdout", 5000),
    ("dfme", "dfme", {}, None, 5000),
    ("maze", "maze", {}, None, 5000),
]
MIXES = [0.5, 0.9]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--detectors", nargs="+", default=["prada", "mmd"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--benign-streams", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs_path = out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    detectors = {name: None for name in args.detectors}

    def run(key: str, **kwargs) -> dict:
        if key not in runs:
            start = time.perf_counter()
            runs[key] = detect_attack(DetectRequest(args.victim, detectors, **kwargs),
                                      RunContext(progress=False))
            alarms = {n: r["first_alarm"] for n, r in runs[key]["detectors"].items()}
            print(f"{key}: first alarm {alarms} ({time.perf_counter() - start:.0f} s)", flush=True)
            write_json(runs_path, runs)
        return runs[key]

    for seed in args.seeds:
        training = SurrogateTraining(epochs=5, min_steps=150, seed=seed, progress=False)
        for label, attack, params, transfer, budget in ATTACKS:
            run(f"{label} | seed {seed}", attack=attack, attack_params=params, transfer=transfer,
                budget=budget, training=training, benign_streams=0)
        for mix in MIXES:
            run(f"knockoff, MNIST, mix {mix} | seed {seed}", attack="knockoff",
                attack_params={"mix": mix}, transfer="mnist", benign="holdout", budget=4000,
                training=training, benign_streams=0)
    far = run("benign", attack="knockoff", attack_params={}, transfer="holdout", budget=5000,
              training=SurrogateTraining(epochs=5, min_steps=150, seed=0, progress=False),
              benign_streams=args.benign_streams)
    write_text(out / "table.md", table(runs, args.detectors, args.seeds, far))
    print(table(runs, args.detectors, args.seeds, far))
    return 0


def _cell(rows: list[dict]) -> str:
    found = [r["first_alarm"] for r in rows if r["first_alarm"] is not None]
    text = f"{len(found)}/{len(rows)}"
    if found:
        text += f": {', '.join(str(a) for a in sorted(found))}"
        if len(found) > 1:
            text += f" (median {statistics.median(found):g})"
    return text


def table(runs: dict, names: list[str], seeds: list[int], far: dict) -> str:
    lines = ["| thief (budget) | " + " | ".join(f"{n}: detected (queries to first alarm)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    labels = [(label, budget) for label, *_, budget in ATTACKS]
    labels += [(f"knockoff, MNIST, mix {m}", 4000) for m in MIXES]
    for label, budget in labels:
        cells = []
        for name in names:
            rows = [runs[f"{label} | seed {s}"]["detectors"][name] for s in seeds
                    if f"{label} | seed {s}" in runs]
            cells.append(_cell(rows) if rows else "-")
        lines.append(f"| {label} ({budget:,}) | " + " | ".join(cells) + " |")
    lines.append("| **false-alarm rate**, benign streams of 5,000 | " + " | ".join(
        f"{far['detectors'][n]['false_alarms']}/{far['detectors'][n]['benign_streams']} "
        f"({far['detectors'][n]['false_alarm_rate']:.1%})" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
