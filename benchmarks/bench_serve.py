"""What the HTTP service costs against the in-process served path, and what dynamic batching buys.

    python benchmarks/bench_serve.py [--victim DIR] [--defense dcp --param beta=0.5] [--threads 1]
        [--rounds 15] [--seconds 0.5] [--clients 32] [--max-delay-ms 2] [--out FILE.json]

Starts ``divqat serve`` (a subprocess, 127.0.0.1, a free port, a fresh key database) with the
victim behind the defense, and in this process the same victim behind the same defense as a
``DefendedVictim``, both with ``--threads`` torch threads. Then ``--rounds`` rounds, each of
short blocks of ``--seconds`` timed back to back, so that load from other processes on a shared
machine falls on both sides of a ratio; a verdict is the median over the rounds of the round's
ratio:

1. batch 256: images/s of ``DefendedVictim(images)`` in process, against images/s of ``.npy``
   requests of 256 float32 images over loopback, one at a time, sent by the thief's own client
   (``RemoteBlackBox.query``) and by a minimal HTTP/1.1 client (the service alone).
   Target: HTTP >= 0.7x in process.
2. ``--clients`` single-image clients (each its own keep-alive connection; a minimal HTTP/1.1
   client, so that the load generator costs little of the cores): all at once, against the
   same clients taking turns, one request in flight at a time. Requests/s, the speedup, p50 /
   p99 latency over all rounds, and the mean batch the victim saw (``/metrics``). Target: >= 4x.

Every loop is bounded in time and count and talks only to 127.0.0.1. Without ``--victim`` a
quick untrained int8 resnet8 (bench_defenses.quick_victim) is served.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from divqat.registry import parse_params
from divqat.remote import RemoteBlackBox
from divqat.serve.server import load_service
from divqat.serve.store import KeyStore

MAX_REQUESTS = 200_000  # per measurement, on top of the time bound
METRICS_TOKEN = secrets.token_urlsafe(16)  # this run's operator token for /metrics


def start_service(victim: Path, defense: str, params: list[str], db: Path, threads: int,
                  max_delay_ms: float, log: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "divqat.cli", "serve", "--victim", str(victim), "--db", str(db),
           "--defense", defense, "--host", "127.0.0.1", "--port", "0", "--threads", str(threads),
           "--max-delay-ms", str(max_delay_ms)]
    for p in params:
        cmd += ["--param", p]
    # /metrics answers only the operator's token (divqat.serve.server.METRICS_TOKEN_ENV).
    env = {**os.environ, "DIVQAT_METRICS_TOKEN": METRICS_TOKEN}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"divqat serve exited ({proc.returncode}); see {log}")
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise SystemExit("divqat serve did not start in 300 s")


def npy_body(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    return buffer.getvalue()


class RawClient:
    """One keep-alive HTTP/1.1 connection sending one prepared POST again and again."""

    def __init__(self, port: int, secret: str, body: bytes) -> None:
        self.port = port
        self.request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer "
                        f"{secret}\r\nContent-Type: application/x-npy\r\nAccept: application/x-npy\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def connect(self) -> None:
        """A fresh connection (the service closes idle ones after a few seconds)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def send(self) -> float:
        start = time.perf_counter()
        self.writer.write(self.request)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        await asyncio.wait_for(self.reader.readexactly(length), 30)
        if status != 200:
            raise RuntimeError(f"the service answered {status}")
        return time.perf_counter() - start

    def close(self) -> None:
        self.writer.close()


async def connect(clients: list[RawClient]) -> list[RawClient]:
    await asyncio.gather(*(c.connect() for c in clients))
    return clients


async def concurrent(clients: list[RawClient], seconds: float) -> list[float]:
    """Every client sends as fast as it is answered; latencies of the requests answered."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def loop(client: RawClient) -> None:
        while time.perf_counter() < deadline and len(latencies) < MAX_REQUESTS:
            latencies.append(await client.send())

    await asyncio.gather(*(loop(c) for c in clients))
    return latencies


async def in_turns(clients: list[RawClient], seconds: float) -> list[float]:
    """The same clients one at a time (round robin), one request in flight."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    i = 0
    while time.perf_counter() < deadline and len(latencies) < MAX_REQUESTS:
        latencies.append(await clients[i % len(clients)].send())
        i += 1
    return latencies


def timed(fn, seconds: float) -> tuple[int, float]:
    """Calls of ``fn`` in ``seconds`` (at least 3, after one untimed), and the time they took."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 3 or (time.perf_counter() - start < seconds and calls < MAX_REQUESTS):
        fn()
        calls += 1
    return calls, time.perf_counter() - start


def batch_stats(port: int) -> tuple[float, float]:
    """(victim calls, images) so far, from the service's /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10,
                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    count = float(re.search(r"^divqat_batch_images_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^divqat_batch_images_sum (\S+)$", text, re.M).group(1))
    return count, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--victim", type=Path)
    parser.add_argument("--defense", default="dcp")
    parser.add_argument("--param", action="append", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = args.param if args.param is not None else (["beta=0.5"] if args.defense == "dcp" else [])
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        victim = args.victim
        if victim is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_defenses import quick_victim

            victim = quick_victim(tmp)
        store = KeyStore(tmp / "keys.db")
        _, secret = store.create_key("bench", 10**12)
        store.close()
        proc, port = start_service(victim, args.defense, params, tmp / "keys.db", args.threads,
                                   args.max_delay_ms, tmp / "serve.log")
        try:
            served, _ = load_service(victim, args.defense, parse_params(params))
            shape = served.input_shape
            images = torch.rand(256, *shape, generator=torch.Generator().manual_seed(0))
            box = RemoteBlackBox(f"http://127.0.0.1:{port}", secret)
            loop = asyncio.new_event_loop()
            big = RawClient(port, secret, npy_body(images.numpy()))
            one = npy_body(images[:1].numpy())
            clients = [RawClient(port, secret, one) for _ in range(args.clients)]

            rounds = []
            conc_latencies: list[float] = []
            for r in range(args.rounds):
                row = {}
                calls, secs = timed(lambda: served(images), args.seconds)
                row["in_process_img_s"] = 256 * calls / secs
                calls, secs = timed(lambda: box.query(images), args.seconds)
                row["http_box_img_s"] = 256 * calls / secs
                loop.run_until_complete(connect([big]))
                calls, secs = timed(lambda: loop.run_until_complete(big.send()), args.seconds)
                row["http_raw_img_s"] = 256 * calls / secs
                lat_turns = loop.run_until_complete(in_turns(loop.run_until_complete(connect(clients)),
                                                             args.seconds))
                before = batch_stats(port)
                lat_conc = loop.run_until_complete(concurrent(loop.run_until_complete(connect(clients)),
                                                              args.seconds))
                after = batch_stats(port)
                conc_latencies += lat_conc
                row["turns_req_s"] = len(lat_turns) / args.seconds
                row["concurrent_req_s"] = len(lat_conc) / args.seconds
                row["concurrent_mean_batch"] = (after[1] - before[1]) / max(1.0, after[0] - before[0])
                row["box_ratio"] = row["http_box_img_s"] / row["in_process_img_s"]
                row["raw_ratio"] = row["http_raw_img_s"] / row["in_process_img_s"]
                row["batching_speedup"] = row["concurrent_req_s"] / row["turns_req_s"]
                rounds.append(row)
                print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            for c in [*clients, big]:
                c.close()
            box.close()
            loop.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    summary = {
        "victim": str(args.victim or "quick untrained int8 resnet8"), "defense": args.defense,
        "params": params, "threads": args.threads, "seconds": args.seconds, "rounds": rounds,
        "clients": args.clients, "max_delay_ms": args.max_delay_ms, "median": med,
        "batch256_ratio_box": med["box_ratio"], "batch256_ratio_raw": med["raw_ratio"],
        "batching_speedup": med["batching_speedup"],
        "concurrent_p50_ms": 1e3 * float(np.percentile(conc_latencies, 50)),
        "concurrent_p99_ms": 1e3 * float(np.percentile(conc_latencies, 99)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    print(f"\nbatch 256, medians over {args.rounds} rounds: in process {med['in_process_img_s']:.0f} img/s; "
          f"HTTP via RemoteBlackBox {med['http_box_img_s']:.0f} img/s, ratio {med['box_ratio']:.2f}x; "
          f"raw client {med['http_raw_img_s']:.0f} img/s, ratio {med['raw_ratio']:.2f}x  [target >= 0.7x]")
    print(f"{args.clients} single-image clients: concurrent {med['concurrent_req_s']:.0f} req/s, in turns "
          f"{med['turns_req_s']:.0f} req/s, speedup {med['batching_speedup']:.2f}x  [target >= 4x]; "
          f"concurrent p50 {summary['concurrent_p50_ms']:.1f} ms, p99 {summary['concurrent_p99_ms']:.1f} ms, "
          f"mean batch {med['concurrent_mean_batch']:.1f} images (max delay {args.max_delay_ms:g} ms)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
