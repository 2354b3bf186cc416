"""The same stages under `divqat run --executor serial` and `--executor ray`, one run after the other.

    python benchmarks/bench_executors.py [--preset smoke | --config FILE] [--rounds 1]
        [--threads N] [--cpus-per-stage N] [--work DIR] [--out benchmarks/results/executors.json]

Each round runs the whole `divqat run` command twice from an empty output folder, serial first
(one stage at a time), then Ray (a stage worker per ``--cpus-per-stage`` CPUs, as many stages at
a time as the cores allow; the local Ray instance's start and stop included), and times each end
to end. Every stage runs with the config's ``numerics.threads`` torch threads under both
(``--threads`` overrides it for both). With several rounds the order alternates, so a change of
load on the machine falls on both. Prints each wall time, the stage seconds summed from
``done.json``, the ratio serial / ray per round and over all rounds (the verdict), and whether
both executors wrote the same results (every number but the timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMINGS = {"ms_per_query_clean", "ms_per_query_defended", "latency_ratio", "attack_seconds",
           "train_seconds", "timing"}


def run(executor: str, source: list[str], out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "divqat.cli", "run", *source, "--out", str(out), "--no-progress",
               "--executor", executor]
    command += ["--threads", str(args.threads)] if args.threads else []
    if executor == "ray" and args.cpus_per_stage:
        command += ["--cpus-per-stage", str(args.cpus_per_stage)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stages = [json.loads(p.read_text()) for p in out.glob("stages/*/*/done.json")]
    return {"executor": executor, "wall_seconds": seconds, "stages": len(stages),
            "stage_seconds": sum(r["seconds"] for r in stages)}


def same_results(a: Path, b: Path) -> bool:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    for table in ("victims", "defenses", "attacks"):
        if len(ra[table]) != len(rb[table]):
            return False
        for x, y in zip(ra[table], rb[table], strict=True):
            if {k: v for k, v in x.items() if k not in TIMINGS} != {k: v for k, v in y.items()
                                                                        if k not in TIMINGS}:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--config", help="a YAML config instead of --preset")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every stage (default: the config's numerics.threads)")
    parser.add_argument("--cpus-per-stage", type=int, default=None,
                        help="ray: CPUs per stage worker (default: the stages' threads)")
    parser.add_argument("--work", help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--out", default="benchmarks/results/executors.json")
    args = parser.parse_args()
    source = [args.config] if args.config else ["--preset", args.preset]
    work = Path(args.work or tempfile.mkdtemp(prefix="divqat-executors-"))
    rows = []
    try:
        for r in range(args.rounds):
            order = ("serial", "ray") if r % 2 == 0 else ("ray", "serial")
            got = {}
            for executor in order:
                out = work / f"round{r}-{executor}"
                shutil.rmtree(out, ignore_errors=True)
                got[executor] = run(executor, source, out, args)
                print(f"round {r + 1} {executor}: {got[executor]['wall_seconds']:.0f} s wall, "
                      f"{got[executor]['stages']} stages, {got[executor]['stage_seconds']:.0f} s of "
                      "stages", flush=True)
            ratio = got["serial"]["wall_seconds"] / got["ray"]["wall_seconds"]
            row = {"round": r + 1, "order": list(order), **{f"{k}_{e}": v for e in got
                                                            for k, v in got[e].items() if k != "executor"},
                   "ratio": ratio}
            row["same_results"] = same_results(work / f"round{r}-serial", work / f"round{r}-ray")
            rows.append(row)
            print(f"round {r + 1}: serial / ray = {ratio:.2f}x, same results: {row['same_results']}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    serial = sum(r["wall_seconds_serial"] for r in rows)
    ray = sum(r["wall_seconds_ray"] for r in rows)
    print(f"all rounds: serial {serial:.0f} s, ray {ray:.0f} s: ray {serial / ray:.2f}x faster")
    record = {"source": source, "threads": args.threads, "cpus_per_stage": args.cpus_per_stage,
              "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "rounds": rows, "ratio": serial / ray}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
