"""What DAWN's watermark costs: the marking's share of a query at batch 256 against an
int8 victim, the storage of 10,000 marks, and the time ``divqat verify`` takes to ask for them.

    OMP_NUM_THREADS=1 python benchmarks/bench_watermark.py [--victim DIR] [--defense dcp]
        [--param beta=0.5] [--rate 0.005] [--rounds 15] [--seconds 0.5] [--threads 1]

1. Marking at batch 256: ``BlackBox(victim).query`` against ``BlackBox(victim, watermark=...)``
   on the same batches (a pool of distinct random images, so that the log keeps filling as it
   would), in blocks of ``--seconds`` timed back to back in alternating order, ``--rounds``
   rounds; the verdict is the median of the rounds' ratios (target: the marked box at most 5 %
   slower). Also: ``Watermark.apply`` alone on one batch (the HMAC of each image and the swap),
   and, for the service, recording one batch's marks and controls in the key database
   (``MarkStore.add``, SQLite in WAL mode: what ``divqat serve --watermark`` adds per request that
   holds a mark or a control).
2. Storage: 10,000 marks and 10,000 controls of 1x28x28 and of 3x32x32 images, as ``.npz``
   (``save_marks``, compressed; random pixels, so the compression is the worst case) and in the
   key database (the SQLite file's growth).
3. Verify: ``verify_marks`` asking the int8 victim (the same cost as a suspect of its size) for
   10,000 marks and 10,000 controls: seconds, and images/s.

Without ``--victim`` a quick untrained int8 resnet8 (``bench_defenses.quick_victim``, 1x28x28,
10 classes: the same kernels as a trained one) is used. Everything runs in this process; no
server is started.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from divqat.blackbox import BlackBox, DefendedVictim
from divqat.ownership import Watermark, load_marks, save_marks
from divqat.ownership.mark_store import MarkStore
from divqat.ownership.marks import CONTROL, MARK
from divqat.ownership.watermark import MarkLog
from divqat.pipelines.suspect import open_suspect
from divqat.pipelines.verify import verify_marks
from divqat.registry import parse_params
from divqat.serve.server import load_service

BATCH = 256
POOL = 64  # distinct batches cycled through: 16,384 images, about 80 marks at 0.5 %


def block(box: BlackBox, pool: list[torch.Tensor], start: int, seconds: float) -> tuple[float, int]:
    """Images/s of ``box.query`` over batches of ``pool`` for about ``seconds``; the next index."""
    done, began, i = 0, time.perf_counter(), start
    while time.perf_counter() - began < seconds and done < 10_000 * BATCH:
        box.query(pool[i % len(pool)])
        done, i = done + BATCH, i + 1
    return done / (time.perf_counter() - began), i


def marking(served: DefendedVictim, rate: float, rounds: int, seconds: float) -> dict:
    g = torch.Generator().manual_seed(0)
    pool = [torch.rand(BATCH, *served.input_shape, generator=g) for _ in range(POOL)]
    plain = BlackBox(served)
    watermark = Watermark(served.num_classes, rate=rate, key="bench")
    marked = BlackBox(served, watermark=watermark)
    for box in (plain, marked):  # warm both paths (compiled program, allocator)
        block(box, pool, 0, 0.2)
    ratios, rates = [], {"plain": [], "marked": []}
    at = {"plain": 0, "marked": 0}
    for r in range(rounds):
        order = [("plain", plain), ("marked", marked)]
        for name, box in order if r % 2 == 0 else order[::-1]:
            speed, at[name] = block(box, pool, at[name], seconds)
            rates[name].append(speed)
        ratios.append(rates["marked"][-1] / rates["plain"][-1])
    # The marking alone: apply() on one batch of answers (HMAC of each image, the swap, the log).
    answers = torch.softmax(torch.randn(BATCH, served.num_classes, generator=g), dim=1)
    alone = Watermark(served.num_classes, rate=rate, key="alone")
    times = []
    for i in range(200):
        began = time.perf_counter()
        alone.apply(answers, pool[i % POOL])
        times.append(time.perf_counter() - began)
    return {"ratio": statistics.median(ratios), "plain": statistics.median(rates["plain"]),
            "marked": statistics.median(rates["marked"]), "apply_ms": statistics.median(times) * 1e3,
            "answered": watermark.log.answered, "marked_answers": watermark.log.marked,
            "kept": len(watermark.log)}


def store_write(served: DefendedVictim, rate: float, folder: Path) -> float:
    """Median ms of ``MarkStore.add`` for the marks and controls of one batch of 256."""
    store = MarkStore(folder / "keys.db")
    secret = store.secret(1, "bench", rate=rate, input_shape=served.input_shape,
                          num_classes=served.num_classes)
    watermark = Watermark(served.num_classes, secret, rate, key="bench")
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(200):
        images = torch.rand(BATCH, *served.input_shape, generator=g)
        choice = watermark.choose(images, torch.zeros(BATCH, dtype=torch.long))
        began = time.perf_counter()
        for kind, rows in ((MARK, choice.marked), (CONTROL, choice.control)):
            index = np.flatnonzero(rows)
            store.add(1, kind, [choice.digests[i] for i in index], choice.pixels[index],
                      choice.labels[index], time.time(), answered=BATCH if kind == MARK else 0,
                      marked=int(rows.sum()) if kind == MARK else 0)
        times.append(time.perf_counter() - began)
    store.close()
    return statistics.median(times) * 1e3


def storage(shape: tuple[int, int, int], n: int, folder: Path) -> tuple[int, int]:
    """Bytes of ``n`` marks and ``n`` controls of ``shape`` as .npz and in the key database."""
    rng = np.random.default_rng(0)
    log = MarkLog(10, 0.005, key="bench", max_marks=n)
    store = MarkStore(folder / f"store-{'x'.join(map(str, shape))}.db", max_marks=n)
    store.secret(1, "bench", rate=0.005, input_shape=shape, num_classes=10)
    empty = (folder / f"store-{'x'.join(map(str, shape))}.db").stat().st_size
    for kind in (MARK, CONTROL):
        for _ in range(n // 1000):
            pixels = rng.integers(0, 256, (1000, *shape), dtype=np.uint8)
            digests = [rng.bytes(32) for _ in range(1000)]
            labels = rng.integers(0, 10, 1000)
            log.record(kind, digests, pixels, labels, time.time())
            store.add(1, kind, digests, pixels, labels, time.time())
    path = save_marks(log.marks(), folder / f"marks-{'x'.join(map(str, shape))}.npz")
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = folder / f"store-{'x'.join(map(str, shape))}.db"
    store.close()
    return path.stat().st_size, db.stat().st_size - empty


def verify_time(victim_dir: Path, served: DefendedVictim, n: int, folder: Path) -> dict:
    rng = np.random.default_rng(2)
    log = MarkLog(served.num_classes, 0.005, key="bench", max_marks=n)
    for kind in (MARK, CONTROL):
        log.record(kind, [rng.bytes(32) for _ in range(n)],
                   rng.integers(0, 256, (n, *served.input_shape), dtype=np.uint8),
                   rng.integers(0, served.num_classes, n), time.time())
    path = save_marks(log.marks(), folder / "verify.npz")
    began = time.perf_counter()
    marks = load_marks(path)
    loaded = time.perf_counter() - began
    with open_suspect(victim_dir) as suspect:
        began = time.perf_counter()
        record = verify_marks(suspect, marks)
        seconds = time.perf_counter() - began
    return {"load_s": loaded, "verify_s": seconds, "queries": record["queries"],
            "query_s": record["query_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--victim", type=Path, help="a victim folder (default: a quick untrained int8 resnet8)")
    p.add_argument("--defense", default="none")
    p.add_argument("--param", action="append", default=[], help="a defense parameter NAME=VALUE")
    p.add_argument("--rate", type=float, default=0.005)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--marks", type=int, default=10_000, help="marks (and controls) stored and verified")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.victim is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_defenses import quick_victim

            victim_dir = quick_victim(folder / "victim")
            what = "quick untrained int8 resnet8 (1x28x28, 10 classes)"
        else:
            victim_dir, what = args.victim, str(args.victim)
        served, _ = load_service(victim_dir, args.defense, parse_params(args.param))
        print(f"# bench_watermark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} thread(s); victim: {what} behind {args.defense}; rate {args.rate}")
        m = marking(served, args.rate, args.rounds, args.seconds)
        print(f"\n1. batch {BATCH}, {args.rounds} rounds of {args.seconds} s blocks in turns (medians):")
        print(f"   unmarked {m['plain']:,.0f} img/s, marked {m['marked']:,.0f} img/s: "
              f"**{m['ratio']:.3f}x** ({(1 / m['ratio'] - 1) * 100:+.1f} % time per query; target <= +5 %)")
        print(f"   Watermark.apply alone on one batch: {m['apply_ms']:.2f} ms "
              f"({m['apply_ms'] / (BATCH / m['plain'] * 1e3) * 100:.1f} % of an unmarked batch's "
              f"{BATCH / m['plain'] * 1e3:.2f} ms)")
        print(f"   the marked box answered {m['answered']:,} images, marked {m['marked_answers']:,} "
              f"({m['marked_answers'] / max(m['answered'], 1):.2%}), kept {m['kept']} distinct marks")
        write_ms = store_write(served, args.rate, folder)
        print(f"   the service's record of one batch's marks and controls (MarkStore.add, SQLite WAL): "
              f"{write_ms:.2f} ms ({write_ms / (BATCH / m['plain'] * 1e3) * 100:.1f} % of a batch)")
        print(f"\n2. storage of {args.marks:,} marks and {args.marks:,} controls (random pixels):")
        for shape in ((1, 28, 28), (3, 32, 32)):
            npz, db = storage(shape, args.marks, folder)
            print(f"   {'x'.join(map(str, shape))}: .npz {npz / 2**20:.1f} MiB, key database "
                  f"+{db / 2**20:.1f} MiB ({db / (2 * args.marks):,.0f} bytes per input kept)")
        v = verify_time(victim_dir, served, args.marks, folder)
        print(f"\n3. verify: {v['queries']:,} images asked of the int8 victim in {v['query_s']:.2f} s "
              f"({v['queries'] / v['query_s']:,.0f} img/s); the whole test {v['verify_s']:.2f} s, "
              f"loading the marks {v['load_s']:.2f} s")


if __name__ == "__main__":
    main()
