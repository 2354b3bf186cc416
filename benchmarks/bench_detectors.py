"""What an extraction detector costs per query, at the start and at the end of a long stream.

    python benchmarks/bench_detectors.py --victim runs/victims/qat [--length 50000] [--threads 1]

One key's stream of ``--length`` natural in-distribution queries (the victim's training images,
then its test split, in a random order; answered by the victim beforehand, not timed), fed to
each detector in requests of ``--batch`` images. Reports the detector's milliseconds per image
over the first and the last ``--window`` queries (a growing state must not make the last query
slow: the budget is 0.5 ms per image), the memory its per-key state holds at the end, and the
size and time of saving that state (what ``divqat serve`` writes to its database). The mmd
detector's time includes its feature extractor (the fp32 teacher's forward pass). Calibrate the
detectors first (``divqat calibrate``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from divqat.blackbox import DefendedVictim
from divqat.data import load_dataset, to_victim_input
from divqat.detectors import state_nbytes, state_to_bytes
from divqat.pipelines.detect import build_detector
from divqat.victim import load_victim, victim_metadata

BUDGET_MS = 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", required=True)
    parser.add_argument("--detectors", nargs="+", default=["prada", "mmd"])
    parser.add_argument("--length", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=int, default=2560, help="queries timed at each end")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    meta = victim_metadata(args.victim)
    shape = tuple(meta["input_shape"])
    pool = torch.cat([to_victim_input(load_dataset(meta["dataset"], split).images, shape)
                      for split in ("train", "test")])
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[:args.length]
    images = pool[order]
    served = DefendedVictim(load_victim(args.victim))
    answers = torch.cat([served(images[i:i + 256]).defended for i in range(0, len(images), 256)])
    print(f"stream: {len(images)} queries of {meta['dataset']} (train + test, shuffled), requests of "
          f"{args.batch}, {args.threads} thread(s)")

    for name in args.detectors:
        # Warm-up on a throwaway detector: the first test imports scipy.stats, the first forward
        # pass allocates; neither is a cost of the stream.
        warm = build_detector(name, {}, args.victim)
        warm.observe(images[:1024], answers[:1024])
        features = getattr(warm, "features", None)
        feature_ms = None
        if features is not None:
            t = time.perf_counter()
            for i in range(0, 2048, args.batch):
                features(images[i:i + args.batch])
            feature_ms = (time.perf_counter() - t) / 2048 * 1e3
        detector = build_detector(name, {}, args.victim)
        per_batch: list[tuple[int, float]] = []
        start = time.perf_counter()
        for i in range(0, len(images), args.batch):
            chunk = images[i:i + args.batch]
            t = time.perf_counter()
            verdict = detector.observe(chunk, answers[i:i + args.batch])
            per_batch.append((len(chunk), time.perf_counter() - t))
        total = time.perf_counter() - start
        first, last = _ms_per_image(per_batch, args.window), _ms_per_image(per_batch[::-1], args.window)
        state = detector.state_dict()
        t = time.perf_counter()
        blob = state_to_bytes(state)
        save_ms = (time.perf_counter() - t) * 1e3
        extra = ""
        if name == "prada":
            sets = state["state"]["sets"]
            extra = f", growing sets {sum(len(s) for s in sets)} images over {len(sets)} classes"
        print(f"{name}: {first:.3f} ms/image over the first {args.window} queries, {last:.3f} over the "
              f"last {args.window} ({'within' if max(first, last) <= BUDGET_MS else 'OVER'} the "
              f"{BUDGET_MS} ms budget); whole stream {total:.1f} s ({total / len(images) * 1e3:.3f} "
              f"ms/image, median request {statistics.median(s for _, s in per_batch) * 1e3:.1f} ms); "
              f"state at the end {state_nbytes(state) / 2**20:.1f} MiB in memory{extra}; saved "
              f"{len(blob) / 2**20:.1f} MiB in {save_ms:.0f} ms; {verdict.tests} tests, first alarm "
              f"{verdict.first_alarm}"
              + ("" if feature_ms is None else f"; of which the fp32 features alone {feature_ms:.3f} ms/image"),
              flush=True)
    return 0


def _ms_per_image(batches: list[tuple[int, float]], window: int) -> float:
    images = seconds = 0.0
    for n, s in batches:
        if images >= window:
            break
        images += n
        seconds += s
    return seconds / images * 1e3


if __name__ == "__main__":
    sys.exit(main())
