"""Sybil sweep: what K API keys buy a thief against per-key extraction detection, what the
service-wide view takes back, and what the service-wide view costs honest keys.

    python benchmarks/bench_sybil.py --victim DIR [--detectors prada mmd] [--keys 1 2 4 8 16]
        [--budget 2000] [--transfer "fashion-mnist[5-9]:train"] [--batch 50] [--trials 3]
        [--seed 0] [--out benchmarks/results/sybil.json]

The victim (``divqat train``, or a victim stage of ``divqat run``) must be calibrated for each
detector (``divqat calibrate --victim DIR --detector NAME``); the detectors run with their
calibrated thresholds. For each detector and each K, in process (no server):

- the thief: KnockoffNets' random sample of ``budget`` images of its transfer set (a stream that
  does not depend on what the thief learns), sent in requests of ``batch`` images through a
  ``SpreadBoundary`` over K black boxes, round-robin (the Sybil thief's default schedule), each
  box with its own budget ``ceil(budget / K)`` and a monitor that only records: every key watched
  by its own detector and the union of the K keys by one more (``ServiceWide``, all keys in one
  group: the thief opened them together). Measured: the thief's queries (all keys) when the first
  key raised the alarm on its own stream and when the union did, and how many of the K streams
  each view flags (the union flags every key of its group from the moment it alarms);
- honest keys: K clients, each sending ``ceil(budget / K)`` distinct images of the victim's test
  split in a random order of its own (the K keys' images disjoint), interleaved the same way and
  watched the same way: every flag is a false alarm, per key alone and by the union.

Each over ``trials`` thief samples and honest populations (seeds ``seed``, ``seed + 1``, ...).
Prints one table (mean over the trials; queries to the first alarm as the median over the trials
that raised it, with how many did) and writes every trial's record to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from divqat.attacks import SpreadBoundary
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.data import to_float
from divqat.defenses import create_defense
from divqat.pipelines.attack import load_transfer_set
from divqat.pipelines.detect.factory import detector_factory
from divqat.pipelines.detect.honest import benign_pools
from divqat.pipelines.detect.watch import watching_keys
from divqat.victim import load_victim, victim_metadata

# Bounds: no sweep runs more than this many requests per stream population.
MAX_REQUESTS = 100_000


def watch_population(make, images: torch.Tensor, served: DefendedVictim, keys: int, budget: int,
                     batch: int, name: str) -> dict[str, Any]:
    """Send ``images`` (uint8 (N, C, H, W), N <= budget, in the order given) in requests of
    ``batch`` over ``keys`` black boxes round-robin, each with budget ceil(budget / keys), watched
    per key and over their union by ``make``'s detectors; returns what each view saw."""
    per_key = math.ceil(budget / keys)
    names = [f"{name}{i + 1}" for i in range(keys)]
    monitors, views = watching_keys({"d": make}, names)
    view = views["d"]
    boxes = [BlackBox(served, budget=per_key, monitor=m) for m in monitors]
    spread = SpreadBoundary(boxes, schedule="round-robin")
    sent, first_key_alarm = 0, None
    for n, start in enumerate(range(0, len(images), batch)):
        if n >= MAX_REQUESTS:
            raise RuntimeError(f"more than {MAX_REQUESTS} requests: lower --budget or raise --batch")
        before = [b.queries_used for b in boxes]
        chunk = images[start:start + batch]
        spread.query(to_float(chunk))
        if first_key_alarm is None:
            # A key that raised its own alarm in this request: the thief's queries then (a
            # request goes whole to one key, but for the spill-over at a key's budget's end).
            for k, b, was in zip(names, boxes, before, strict=True):
                own = view.key_verdict(k)
                if own is not None and own.first_alarm is not None and b.queries_used > was:
                    at = sent + own.first_alarm - was
                    first_key_alarm = at if first_key_alarm is None else min(first_key_alarm, at)
        sent += len(chunk)
    record = view.record()
    union = record["groups"]["all"]
    used = [b.queries_used for b in boxes]
    assert all(u <= per_key for u in used), "a key went over its budget"
    return {"keys": keys, "per_key_budget": per_key, "queries": sent, "used": used,
            "first_key_alarm": first_key_alarm, "keys_alarmed_alone": record["keys_flagged_alone"],
            "union_first_alarm": union["first_alarm"], "keys_flagged": record["keys_flagged"]}


def _median(values: list[int | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"– (0/{len(values)})"
    return f"{statistics.median(got):,.0f} ({len(got)}/{len(values)})"


def _share(count: float, total: float) -> str:
    return f"{count / total:.2f}" if total else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", required=True)
    parser.add_argument("--detectors", nargs="+", default=["prada", "mmd"])
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--transfer", default="fashion-mnist[5-9]:train")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="benchmarks/results/sybil.json")
    args = parser.parse_args()
    if min(args.keys) < 1 or args.budget < 1 or args.batch < 1 or args.trials < 1:
        parser.error("--keys, --budget, --batch and --trials must be >= 1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    victim_dir = Path(args.victim)
    meta = victim_metadata(victim_dir)
    served = DefendedVictim(load_victim(victim_dir), create_defense("none"))
    transfer = load_transfer_set(args.transfer, meta, args.data_root)
    test = benign_pools(meta, args.data_root, served, None, ["test"])[0]
    if args.budget > min(len(transfer), len(test.images)):
        parser.error(f"--budget {args.budget} is more than the transfer set ({len(transfer)}) or the "
                     f"test split ({len(test.images)}) holds")
    rows, records = [], []
    for name in args.detectors:
        make, settings = detector_factory(name, None, victim_dir)
        if not settings["calibrated"]:
            parser.error(f"{name} is not calibrated for {victim_dir}: divqat calibrate --victim "
                         f"{victim_dir} --detector {name}")
        for k in args.keys:
            thief, honest = [], []
            for t in range(args.trials):
                g = torch.Generator().manual_seed(args.seed + t)
                sample = transfer.images[torch.randperm(len(transfer), generator=g)[:args.budget]]
                thief.append(watch_population(make, sample, served, k, args.budget, args.batch, "thief"))
                order = torch.randperm(len(test.images), generator=g)[:args.budget]
                honest.append(watch_population(make, test.images[order], served, k, args.budget,
                                               args.batch, "honest"))
            records.append({"detector": name, "keys": k, "thief": thief, "honest": honest})
            n = args.trials * k
            rows.append([name, str(k), f"{math.ceil(args.budget / k):,}",
                         _median([r["first_key_alarm"] for r in thief]),
                         _share(sum(r["keys_alarmed_alone"] for r in thief), n),
                         _median([r["union_first_alarm"] for r in thief]),
                         _share(sum(r["keys_flagged"] for r in thief), n),
                         _share(sum(r["keys_alarmed_alone"] for r in honest), n),
                         f"{sum(r['union_first_alarm'] is not None for r in honest)}/{args.trials}",
                         _share(sum(r["keys_flagged"] for r in honest), n)])
    header = ["detector", "K", "queries per key",
              "per key: thief's queries to the first alarm (trials)",
              "per key: alarms per thief stream",
              "service-wide: thief's queries to the union's alarm (trials)",
              "service-wide: thief streams flagged (own or union alarm)",
              "honest keys: own alarms per stream", "honest keys: union alarms (trials)",
              "honest keys: streams flagged (own or union alarm)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))
    seconds = time.perf_counter() - start
    print(f"{args.trials} trial(s) per cell, budget {args.budget:,}, requests of {args.batch}, "
          f"transfer set {transfer.name}, honest keys from {test.name}; {seconds:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "seconds": seconds, "cells": records}, indent=1))


if __name__ == "__main__":
    main()
