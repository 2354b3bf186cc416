"""Memory and throughput of training on an image folder streamed from disk versus held in memory.

    python benchmarks/bench_folder_memory.py [--n 10000 50000] [--dir /tmp/divqat-folder-bench]
        [--steps 200] [--batch 64] [--size 96] [--workers N] [--paths streamed in-memory]

Writes a synthetic folder of N images per N (96x96 RGB JPEGs of random color blocks, 10
classes, DIR/n<N>/{train,test}/<class>/<i>.jpg; reused when already there), then for each path
trains a small CNN for ``--steps`` SGD steps of one epoch over all N images through the real
loop (``divqat.train.fit``, pad-crop or random resized crop as FitConfig.crop="auto" picks) in a
fresh process, and prints the peak memory above that process at rest (after importing torch
and building the model, before loading the folder):

- main: the training process's peak RSS (``getrusage`` maxrss) minus its RSS at rest;
- tree: the peak over time of the summed PSS (proportional set size, so pages the forked
  workers share with their parent count once) of the process and its DataLoader workers,
  sampled every 0.1 s from /proc, minus the PSS at rest;
- images/s over the steps after the first 10 (worker start-up excluded).

"streamed" forces the lazy path (``stream_bytes=0``); "in-memory" decodes the folder up front as
sets under ``divqat.data.folders.STREAM_BYTES`` are. Training stops after ``--steps`` by an
exception raised from the objective, so the epoch's order (and the sampler) still covers all N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = 10


# --- the synthetic folder ------------------------------------------------------------------------

def _write_range(args: tuple[str, str, int, int, int, int]) -> int:
    from PIL import Image

    folder, split, start, stop, size, seed = args
    rng = np.random.default_rng([seed, start])
    for i in range(start, stop):
        c = i % CLASSES
        blocks = rng.integers(0, 160, (size // 8, size // 8, 3), dtype=np.uint8)
        blocks[..., c % 3] += np.uint8(60 + 9 * c)  # a class-dependent tint: learnable, barely
        pixels = blocks.repeat(8, axis=0).repeat(8, axis=1)
        Image.fromarray(pixels).save(Path(folder) / split / f"c{c}" / f"{i:06d}.jpg", quality=90)
    return stop - start


def write_folder(folder: Path, n: int, size: int, processes: int) -> float:
    """Write N train and N // 10 test images unless a previous run finished it; seconds taken."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{n} {size}":
        return 0.0
    start = time.perf_counter()
    counts = {"train": n, "test": max(CLASSES, n // 10)}
    for split in counts:
        for c in range(CLASSES):
            (folder / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    step = 2000
    jobs = [(str(folder), split, lo, min(lo + step, count), size, 0 if split == "train" else 1)
            for split, count in counts.items() for lo in range(0, count, step)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_range, jobs))
    done.write_text(f"{n} {size}")
    return time.perf_counter() - start


# --- one measurement, in a fresh process ---------------------------------------------------------

def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


class TreeSampler(threading.Thread):
    """Peak summed PSS (KiB) of this process and its descendants, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.stopped = interval, 0, threading.Event()

    def total(self) -> int:
        me = os.getpid()
        return sum(_pss_kib(p) for p in [me, *_descendants(me)])

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, self.total())
            self.stopped.wait(self.interval)


class Stop(Exception):
    pass


def measure(folder: Path, path: str, steps: int, batch: int, size: int, workers: int | None) -> dict:
    import resource

    import torch
    from torch import nn

    from divqat.data.folders import load_image_folder
    from divqat.train import FitConfig, fit

    torch.manual_seed(0)
    model = nn.Sequential(  # small on purpose: the data path is what is measured
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES))
    times: list[float] = []

    def objective(logits, targets, inputs, progress):
        times.append(time.perf_counter())
        if len(times) > steps:
            raise Stop
        loss = nn.functional.cross_entropy(logits, targets)
        return loss, {"loss": loss.detach()}

    sampler = TreeSampler()
    rest_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rest_tree = sampler.total()
    sampler.start()
    start = time.perf_counter()
    train = load_image_folder("train", folder, (size, size),
                              stream_bytes=0 if path == "streamed" else 1 << 62)
    load_seconds = time.perf_counter() - start
    cfg = FitConfig(epochs=1, batch_size=batch, lr=0.05, progress=False, log_epochs=False,
                    workers=workers)
    try:
        fit(model, train.images, train.labels, objective, cfg)
    except Stop:
        pass
    sampler.stopped.set()
    sampler.join()
    timed = times[10:steps + 1]
    rate = batch * (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    return {
        "path": path, "n": len(train), "steps": min(steps, len(times)), "batch": batch,
        "workers": cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1),
        "load_s": round(load_seconds, 2), "images_per_s": round(rate, 1),
        "rest_main_mib": round(rest_main / 1024, 1),
        "main_peak_above_rest_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           - rest_main) / 1024, 1),
        "tree_pss_peak_above_rest_mib": round((sampler.peak - rest_tree) / 1024, 1),
        "decoded_size_mib": round(len(train) * 3 * size * size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/divqat-folder-bench"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(4, CPUs))")
    parser.add_argument("--paths", nargs="+", default=["streamed", "in-memory"],
                        choices=["streamed", "in-memory"])
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.paths[0], args.steps, args.batch, args.size,
                                 args.workers)))
        return

    rows = []
    for n in args.n:
        folder = args.dir / f"n{n}"
        seconds = write_folder(folder, n, args.size, processes=os.cpu_count() or 1)
        if seconds:
            print(f"wrote {n} images to {folder} in {seconds:.0f} s", flush=True)
        for path in args.paths:
            command = [sys.executable, __file__, "--measure", str(folder), "--paths", path,
                       "--steps", str(args.steps), "--batch", str(args.batch), "--size", str(args.size)]
            if args.workers is not None:
                command += ["--workers", str(args.workers)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)

    header = ("path", "n", "decoded MiB", "load s", "main +MiB", "tree PSS +MiB", "images/s")
    print("\n" + " | ".join(header))
    for r in rows:
        print(" | ".join(str(v) for v in (r["path"], r["n"], r["decoded_size_mib"], r["load_s"],
                                          r["main_peak_above_rest_mib"],
                                          r["tree_pss_peak_above_rest_mib"], r["images_per_s"])))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
