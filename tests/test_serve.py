"""`divqat serve`: the key store and its accounting, the dynamic batcher, the HTTP API against a
real uvicorn server on a free loopback port (bad inputs, keys, budgets, rate limits, output
levels, metrics), 64 concurrent clients on one budget, kill -9 and SIGTERM, and the thief's
RemoteBlackBox. Every server listens on 127.0.0.1 only; every client call has a timeout and
every load loop a bound in count and time."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from conftest import TINY, TINY_CLASSES, BarsVictim, make_bars
from PIL import Image

from divqat.attacks import check_blackbox
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.boundary import BudgetExceeded, QueryBoundary, QueryError
from divqat.cli import main
from divqat.data import adapt
from divqat.remote import RemoteBlackBox, RemoteError
from divqat.serve.app import ServiceLimits, create_app
from divqat.serve.batcher import DynamicBatcher
from divqat.serve.server import bind, uvicorn_config
from divqat.serve.store import KeyStore, Refused

TIMEOUT = 30.0  # seconds, every HTTP call of these tests
NPY = "application/x-npy"
METRICS_TOKEN = "operator-token"


# ---------------------------------------------------------------------- helpers

class ThreadServer:
    """uvicorn serving ``app`` in a thread of this process, on a free loopback port, configured
    as ``divqat serve`` configures it (``uvicorn_config``: the request-head limits)."""

    def __init__(self, app) -> None:
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app))
        self.thread = threading.Thread(target=self.server.run, args=([sock],), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def from_npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def post(url: str, key: str | None, body: bytes, content_type: str = NPY, accept: str | None = None,
         **kwargs) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if accept:
        headers["Accept"] = accept
    return httpx.post(f"{url}/v1/predict", content=body, headers=headers, timeout=TIMEOUT, **kwargs)


def bars(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(make_bars(n, seed)[0]).float() / 255


@pytest.fixture
def service(tmp_path):
    """A live service: the hand-made bars victim behind no defense, small request limits."""
    victim = BarsVictim()
    db = tmp_path / "keys.db"
    limits = ServiceLimits(max_images=64, max_body_bytes=256 * 1024, max_side=64, max_delay=0.002)
    app = create_app(DefendedVictim(victim), db, classes=TINY_CLASSES, dataset=TINY, limits=limits,
                     metrics_token=METRICS_TOKEN)
    server = ThreadServer(app)
    store = KeyStore(db)
    yield server.url, store, victim
    server.stop()
    store.close()


# ---------------------------------------------------------------------- the key store

def test_keys_are_random_stored_as_hashes_and_refused_once_revoked(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    key, secret = store.create_key("thief", 100, output="top-3")
    _, other = store.create_key("other", 100)
    assert re.fullmatch(r"dq_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", secret) and secret != other
    assert key.top_k == 3 and not key.label_only
    assert store.authenticate(secret).name == "thief"
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert secret.encode() not in raw and secret.split("_", 2)[2].encode() not in raw
    store = KeyStore(tmp_path / "keys.db", create=False)
    for presented, code in ((None, "missing_key"), ("", "missing_key"), ("nonsense", "unknown_key"),
                            (secret[:-1] + ("A" if secret[-1] != "A" else "B"), "unknown_key")):
        with pytest.raises(Refused) as refused:
            store.authenticate(presented)
        assert (refused.value.status, refused.value.code) == (401, code)
    store.revoke("thief")
    with pytest.raises(Refused, match="revoked") as refused:
        store.authenticate(secret)
    assert refused.value.code == "revoked_key"
    with pytest.raises(Exception, match="exists already"):
        store.create_key("other", 1)
    with pytest.raises(Exception, match="output must be"):
        store.create_key("x", 1, output="top-0")
    store.close()


def test_reserve_refuses_whole_requests_past_the_budget_or_the_rate(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    key, _ = store.create_key("k", 20, rate=6, window=60)
    r = store.reserve(key.id, 4, 1000.0, "h")
    assert r.key.used == 4 and r.window == (2, 60)
    with pytest.raises(Refused) as refused:
        store.reserve(key.id, 3, 1010.0, "h")
    assert refused.value.code == "rate_limited" and refused.value.retry_after == 50
    with pytest.raises(Refused, match="more than the key's rate") as refused:
        store.reserve(key.id, 7, 1070.0, "h")
    assert refused.value.status == 413
    store.reserve(key.id, 6, 1070.0, "h")  # a new window
    store.reserve(key.id, 6, 1200.0, "h")
    with pytest.raises(Refused) as refused:
        store.reserve(key.id, 5, 2000.0, "h")  # 16 + 5 > 20: refused whole
    assert (refused.value.status, refused.value.code) == (429, "budget_exhausted")
    store.reserve(key.id, 4, 2000.0, "h")
    assert store.key("k").used == 20
    usage = store.usage("k")[0]
    assert usage["images_counted"] == usage["used"] == 20 and usage["refused_requests"] == 3
    assert usage["in_flight"] == 4  # reserved, never finished
    store.close()


def test_a_failed_victim_call_is_refunded(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    key, _ = store.create_key("k", 10)
    r = store.reserve(key.id, 5, time.time(), "h")
    store.finish(r.audit_id, "victim_error", 500, 1.0, refund=True)
    assert store.key("k").used == 0
    row = store.audit("k")[0]
    assert (row["counted"], row["outcome"]) == (0, "victim_error")


# ---------------------------------------------------------------------- the batcher

def test_batcher_gathers_concurrent_requests_and_a_lone_one_waits_at_most_the_delay():
    calls = []

    def run(images):
        calls.append(len(images))
        return images * 2

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=64, max_delay=0.05)
        await batcher.start()
        parts = [torch.full((i + 1, 1), float(i)) for i in range(8)]  # 36 images
        answers = await asyncio.gather(*(batcher.submit(p) for p in parts))
        assert all(torch.equal(a, 2 * p) for a, p in zip(answers, parts, strict=True))
        start = time.perf_counter()
        await batcher.submit(torch.ones(1, 1))
        alone = time.perf_counter() - start
        big = await asyncio.gather(*(batcher.submit(torch.ones(40, 1)) for _ in range(2)))
        await batcher.close()
        return alone, big

    alone, big = asyncio.run(scenario())
    assert calls[0] == 36  # eight concurrent requests, one victim call
    assert 0.04 <= alone < 1.0  # it waited for company, for the delay and not much more
    assert calls[-2:] == [40, 40] and all(len(b) == 40 for b in big)  # max_batch 64: not merged


# ---------------------------------------------------------------------- the HTTP API

def test_predict_answers_what_the_key_may_see(service):
    url, store, victim = service
    _, soft = store.create_key("soft", 1000)
    _, labels = store.create_key("labels", 1000, output="labels")
    _, top2 = store.create_key("top2", 1000, output="top-2")
    images = bars(8)
    expected = BlackBox(BarsVictim()).query(images)

    r = post(url, soft, npy(images.numpy()))
    assert r.status_code == 200 and r.headers["divqat-queries-used"] == "8"
    assert r.headers["divqat-queries-left"] == "992" and r.headers["divqat-query-budget"] == "1000"
    assert torch.equal(torch.tensor(r.json()["posteriors"], dtype=torch.float32), expected)  # JSON is exact
    r = post(url, soft, npy(images.numpy()), accept=NPY)
    answer = from_npy(r.content)
    assert r.headers["content-type"] == NPY and answer.dtype == np.float32
    assert torch.equal(torch.from_numpy(answer), expected)

    r = post(url, labels, npy(images.numpy()))
    assert r.json() == {"output": "labels", "labels": expected.argmax(1).tolist()}
    assert from_npy(post(url, labels, npy(images.numpy()), accept=NPY).content).tolist() == \
        expected.argmax(1).tolist()

    body = post(url, top2, npy(images.numpy())).json()
    order = torch.sort(expected, dim=1, descending=True, stable=True).indices[:, :2]
    assert body["classes"] == order.tolist()
    assert torch.equal(torch.tensor(body["probabilities"]), expected.gather(1, order))
    kept = from_npy(post(url, top2, npy(images.numpy()), accept=NPY).content)
    assert ((kept > 0).sum(axis=1) <= 2).all() and torch.equal(torch.from_numpy(kept).gather(1, order),
                                                                expected.gather(1, order))
    assert victim.seen == 48 == sum(store.key(k).used for k in ("soft", "labels", "top2"))


def test_images_are_adapted_to_the_victim_input(service):
    url, store, _ = service
    _, key = store.create_key("k", 1000, output="soft")
    raw, _ = make_bars(4, seed=3)
    expected = from_npy(post(url, key, npy(raw.astype(np.float32) / 255), accept=NPY).content)
    for body in (npy(raw), npy(raw[:, 0]), npy((raw.astype(np.float32) / 255)[:, 0].astype(">f4"))):
        assert np.array_equal(from_npy(post(url, key, body, accept=NPY).content), expected)
    # RGB 24x24 -> gray 16x16, as divqat.data.adapt makes it.
    rgb = np.random.default_rng(0).random((3, 3, 24, 24), dtype=np.float32)
    fitted = adapt(torch.from_numpy(rgb), 1, (16, 16)).clamp(0, 1)
    assert np.array_equal(from_npy(post(url, key, npy(rgb), accept=NPY).content),
                          BlackBox(BarsVictim()).query(fitted).numpy())
    # PNG files in a multipart form: the same answers as the same pixels in a .npy.
    files = []
    for i, image in enumerate(raw[:, 0]):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(("images", (f"{i}.png", buffer.getvalue(), "image/png")))
    r = httpx.post(f"{url}/v1/predict", files=files, timeout=TIMEOUT,
                   headers={"Authorization": f"Bearer {key}", "Accept": NPY})
    assert r.status_code == 200 and np.array_equal(from_npy(r.content), expected)
    jpeg = io.BytesIO()
    Image.fromarray(np.stack([raw[0, 0]] * 3, axis=-1)).save(jpeg, format="JPEG")
    r = httpx.post(f"{url}/v1/predict", files=[("image", ("a.jpg", jpeg.getvalue(), "image/jpeg"))],
                   headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["posteriors"]) == 1


def _png(side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="GIF")
    return buffer.getvalue()


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _multipart(*parts: tuple[str, bytes]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x", files=[("images", (name, data)) for name, data in parts])
    return request.read(), request.headers["content-type"]


GOOD = npy(np.zeros((2, 1, 16, 16), np.float32))
BAD_INPUTS = {
    # name: (body, content type, status, error code)
    "wrong content type": (GOOD, "application/json", 415, "unsupported_media_type"),
    "no content type": (GOOD, "", 415, "unsupported_media_type"),
    "not npy": (b"\x93NUMPY garbage", NPY, 400, "bad_npy"),
    "truncated npy": (GOOD[:-10], NPY, 400, "bad_npy"),
    "pickled object array": (_pickled(), NPY, 400, "bad_npy"),
    "float64": (npy(np.zeros((2, 1, 16, 16))), NPY, 400, "bad_dtype"),
    "int32": (npy(np.zeros((2, 1, 16, 16), np.int32)), NPY, 400, "bad_dtype"),
    "one image without batch axis": (npy(np.zeros((16,), np.float32)), NPY, 400, "bad_shape"),
    "two channels": (npy(np.zeros((2, 2, 16, 16), np.float32)), NPY, 400, "bad_shape"),
    "too wide": (npy(np.zeros((1, 1, 16, 65), np.uint8)), NPY, 400, "bad_shape"),
    "empty batch": (npy(np.zeros((0, 1, 16, 16), np.float32)), NPY, 400, "empty_batch"),
    "NaN": (npy(np.full((2, 1, 16, 16), np.nan, np.float32)), NPY, 400, "not_finite"),
    "inf": (npy(np.full((2, 1, 16, 16), np.inf, np.float32)), NPY, 400, "not_finite"),
    "above 1": (npy(np.full((2, 1, 16, 16), 1.5, np.float32)), NPY, 400, "out_of_range"),
    "below 0": (npy(np.full((2, 1, 16, 16), -0.1, np.float32)), NPY, 400, "out_of_range"),
    "more images than allowed": (npy(np.zeros((65, 1, 16, 16), np.uint8)), NPY, 413, "too_many_images"),
    "body over the limit": (npy(np.zeros((40, 3, 32, 32), np.float32)), NPY, 413, "body_too_large"),
    "undecodable image": (*_multipart(("a.png", b"\x89PNG not really")), 400, "bad_image"),
    "GIF": (*_multipart(("a.gif", _gif())), 400, "bad_image"),
    "image too large": (*_multipart(("a.png", _png(80))), 400, "bad_image"),
    "more files than allowed": (*_multipart(*[(f"{i}.png", _png()) for i in range(65)]), 413, "too_many_images"),
    "far more files than allowed": (*_multipart(*[(f"{i}.png", _png()) for i in range(70)]), 413,
                                    "too_many_images"),
    "form without files": (b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                           "multipart/form-data; boundary=b", 400, "empty_batch"),
}


def test_every_bad_input_and_key_is_a_documented_4xx_that_counts_nothing(service):
    url, store, victim = service
    _, key = store.create_key("k", 1000)
    _, revoked = store.create_key("gone", 1000)
    store.revoke("gone")
    cases = [(name, key, *case) for name, case in BAD_INPUTS.items()] + [
        ("no key", None, GOOD, NPY, 401, "missing_key"),
        ("unknown key", "dq_000000000000_" + "A" * 43, GOOD, NPY, 401, "unknown_key"),
        ("not a bearer key", "x", GOOD, NPY, 401, "unknown_key"),
        ("revoked key", revoked, GOOD, NPY, 401, "revoked_key"),
    ]
    served = 0
    for name, secret, body, content_type, status, code in cases:
        r = post(url, secret, body, content_type)
        assert (r.status_code, r.json()["error"]) == (status, code), name
        assert r.json()["message"], name
        assert store.key("k").used == served and victim.seen == served, name
        good = post(url, key, GOOD)  # the service keeps serving
        assert good.status_code == 200, name
        served += 2
    assert httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT).json()["error"] == "not_found"
    assert httpx.get(f"{url}/v1/predict", timeout=TIMEOUT).json()["error"] == "method_not_allowed"
    usage = store.usage("k")[0]
    assert usage["refused_requests"] == len(BAD_INPUTS)  # refused inputs are audited, uncounted
    assert usage["images_answered"] == usage["used"] == served


def test_budget_and_rate_refusals_are_429_and_count_nothing(service):
    url, store, victim = service
    _, key = store.create_key("k", 10)
    assert post(url, key, npy(np.zeros((8, 16, 16), np.uint8))).status_code == 200
    r = post(url, key, npy(np.zeros((3, 16, 16), np.uint8)))
    assert (r.status_code, r.json()["error"]) == (429, "budget_exhausted")
    assert "retry-after" not in r.headers and r.headers["divqat-queries-left"] == "2"
    assert post(url, key, npy(np.zeros((2, 16, 16), np.uint8))).status_code == 200
    assert store.key("k").used == 10 == victim.seen

    _, rated = store.create_key("rated", 100, rate=5, window=60)
    r = post(url, rated, npy(np.zeros((5, 16, 16), np.uint8)))
    assert r.status_code == 200 and r.headers["ratelimit-policy"] == '"images";q=5;w=60'
    assert re.fullmatch(r'"images";r=0;t=(59|60)', r.headers["ratelimit"])
    r = post(url, rated, npy(np.zeros((1, 16, 16), np.uint8)))
    assert (r.status_code, r.json()["error"]) == (429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["ratelimit"].startswith('"images";r=0;')
    assert store.key("rated").used == 5 and victim.seen == 15


def test_model_endpoint_tells_what_a_client_may_know_and_nothing_more(service):
    url, store, _ = service
    _, key = store.create_key("k", 50, output="labels")
    assert httpx.get(f"{url}/v1/model", timeout=TIMEOUT).status_code == 401
    info = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT).json()
    assert info["input_shape"] == [1, 16, 16] and info["classes"] == list(TINY_CLASSES)
    assert info["output"] == "labels" and info["key"]["budget"] == 50 and info["dataset"] == TINY
    text = json.dumps(info).lower()
    assert not any(word in text for word in ("defense", "arch", "resnet", "weights", "mean", "std"))
    assert httpx.get(f"{url}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}


def test_metrics_are_prometheus_text_for_the_operator_only(service):
    url, store, _ = service
    _, key = store.create_key("k", 100)
    post(url, key, GOOD)
    post(url, key, b"junk")
    post(url, None, GOOD)
    for headers in ({}, {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer operator-tokeN"}):
        r = httpx.get(f"{url}/metrics", headers=headers, timeout=TIMEOUT)
        assert (r.status_code, r.json()["error"]) == (401, "unknown_key")  # a client's key is no token
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                     timeout=TIMEOUT).text
    for line in ('divqat_requests_total{outcome="ok"} 1.0', 'divqat_images_total{outcome="ok"} 2.0',
                 'divqat_refusals_total{reason="bad_npy"} 1.0', 'divqat_refusals_total{reason="missing_key"} 1.0',
                 "divqat_batch_images_count 1.0", "divqat_request_seconds_count 1.0"):
        assert line in text


def test_remote_black_box_is_the_black_box_over_http(service):
    url, store, victim = service
    _, key = store.create_key("thief", 40)
    _, labels_key = store.create_key("labels", 40, output="labels")
    local = BlackBox(BarsVictim(), budget=40)
    with RemoteBlackBox(url, key) as box:
        assert isinstance(box, QueryBoundary) and check_blackbox(box) is box
        assert (box.input_shape, box.num_classes, box.budget, box.queries_used) == ((1, 16, 16), 4, 40, 0)
        assert not box.label_only and box.classes == TINY_CLASSES and box.dataset == TINY
        images = bars(30, seed=5)
        assert torch.equal(box.query(images), local.query(images))  # bit for bit
        assert torch.equal(box.query_labels(images[:6]), local.query_labels(images[:6]))
        assert (box.queries_used, box.queries_left) == (36, 4)
        with pytest.raises(BudgetExceeded):
            box.query(images[:5])
        with pytest.raises(QueryError):
            box.query(images.double())
        with pytest.raises(QueryError):
            box.query(images * 2)
        assert box.queries_used == store.key("thief").used == 36 and len(box.timings) == 2
        with pytest.raises(AttributeError):
            box.budget = 10**9
        with pytest.raises(TypeError):
            pickle.dumps(box)
    with RemoteBlackBox(url, labels_key) as box:
        assert box.label_only
        with pytest.raises(QueryError, match="label-only"):
            box.query(images[:2])
        assert torch.equal(box.query_labels(images[:3]), local.query_labels(images[:3]))
    # More images than one request may carry (64 here) go in parts.
    _, big = store.create_key("big", 200)
    with RemoteBlackBox(url, big) as box:
        many = bars(150, seed=6)
        assert torch.equal(box.query(many), BlackBox(BarsVictim()).query(many))
        assert box.queries_used == 150
    with pytest.raises(RemoteError, match="refused the API key"):
        RemoteBlackBox(url, "dq_000000000000_" + "A" * 43)
    sock = bind("127.0.0.1", 0)
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there any more
    with pytest.raises(RemoteError, match="cannot reach"):
        RemoteBlackBox(closed, key)


# Small settings per attack, so that each runs in a second or two on the bars victim.
SMALL = {
    "knockoff": ({"batch_size": 32}, 64),
    "knockoff-adaptive": ({"batch_size": 16}, 64),
    "jbda": ({"seed_size": 24, "batch_size": 32}, 72),
    "dfme": ({"batch_size": 8, "generator_width": 8, "nz": 16}, 60),
    "maze": ({"batch_size": 8, "directions": 3, "replay_steps": 2, "generator_width": 8, "nz": 16}, 60),
    "recovery": ({"steps": 20, "batch_size": 32}, 64),
    "fixmatch": ({"mu": 1, "batch_size": 32}, 64),
    "averaging": ({"views": 2, "batch_size": 32}, 64),
    "sybil": ({"keys": 2, "attack_params": "batch_size=32"}, 64),  # two keys of 32
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_attack_steals_through_http_as_through_the_black_box(name, service, one_thread):
    """The same seed: the same queries, answers and surrogate over HTTP as in process."""
    from divqat.attacks import ATTACKS, SurrogateTraining, TransferSet, create_attack

    assert set(SMALL) == set(ATTACKS.names()), "a new attack: give it small settings here"
    url, store, _ = service
    params, budget = SMALL[name]
    images, labels = make_bars(200, seed=2)
    transfer = TransferSet("bars", torch.from_numpy(images), torch.from_numpy(labels))
    training = SurrogateTraining(epochs=1, batch_size=32, progress=False, seed=0)

    from divqat.attacks import KnownDefense
    from divqat.defenses import create_defense

    # The recovery thief assumes reverse sigmoid (served or not, the same on both sides).
    known = {"known": KnownDefense("reverse-sigmoid", {}, lambda images, labels: (
        lambda y, x: create_defense("reverse-sigmoid")(y)))} if name == "recovery" else {}
    keys = create_attack(name, **params).streams

    def steal(boxes):
        torch.manual_seed(0)
        return create_attack(name, **params).steal(boxes if keys > 1 else boxes[0], [budget], training,
                                                   transfer=transfer, **known)[0]

    local = steal([BlackBox(BarsVictim(), budget=budget // keys) for _ in range(keys)])
    boxes = [RemoteBlackBox(url, store.create_key(f"{name}{i}", budget // keys)[1]) for i in range(keys)]
    try:
        remote = steal(boxes)
        used = sum(store.key(f"{name}{i}").used for i in range(keys))
        assert sum(b.queries_used for b in boxes) == used == local.queries_used <= budget
    finally:
        for b in boxes:
            b.close()
    mine, theirs = remote.surrogate.state_dict(), local.surrogate.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_64_concurrent_clients_on_one_key_never_pass_its_budget(tmp_path):
    victim = BarsVictim()
    db = tmp_path / "keys.db"
    app = create_app(DefendedVictim(victim), db, classes=TINY_CLASSES,
                     limits=ServiceLimits(max_images=64, max_delay=0.002))
    server = ThreadServer(app)
    store = KeyStore(db)
    _, key = store.create_key("shared", 10_000)
    deadline = time.monotonic() + 90
    image = npy(np.zeros((64, 1, 16, 16), np.uint8))

    def client(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        answered = requests = 0
        with httpx.Client(timeout=TIMEOUT, headers={"Authorization": f"Bearer {key}",
                                                    "Content-Type": NPY}) as http:
            for _ in range(500):  # bounded in count and time
                if time.monotonic() > deadline:
                    break
                n = rng.randint(1, 64)
                body = npy(np.zeros((n, 1, 16, 16), np.uint8)) if n < 64 else image
                r = http.post(f"{server.url}/v1/predict", content=body)
                if r.status_code == 429:
                    assert r.json()["error"] == "budget_exhausted"
                    break
                assert r.status_code == 200 and len(r.json()["posteriors"]) == n
                answered += n
                requests += 1
        return answered, requests

    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(client, range(64)))
    finally:
        server.stop()
    answered = sum(a for a, _ in results)
    used = store.key("shared").used
    usage = store.usage("shared")[0]
    print(f"\n64 clients, budget 10000: {usage['answered_requests']} requests answered, {answered} images "
          f"answered, {used} counted, {victim.seen} seen by the victim, {usage['refused_requests']} refused")
    assert answered == used == victim.seen == usage["images_counted"] == usage["images_answered"]
    assert 10_000 - 64 < used <= 10_000
    assert usage["answered_requests"] == sum(r for _, r in results) and usage["in_flight"] == 0
    store.close()


# ---------------------------------------------------------------------- the service as a process

def _serve(victim_dir: Path, db: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`divqat serve` in a subprocess on a free loopback port; returns it and its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "divqat.cli", "serve", "--victim", str(victim_dir),
                             "--db", str(db), "--port", "0", "--threads", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = next((re.search(r"http://127\.0\.0\.1:\d+", line) for line in lines), None)
        if match:
            return proc, match.group(0)
        if proc.poll() is not None:
            raise AssertionError(f"divqat serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("divqat serve did not start in 120 s")


def test_kill_9_under_load_loses_no_counted_image_then_sigterm_finishes_requests_in_flight(
        tiny_victims, tmp_path):
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    secrets = [store.create_key(f"k{i}", 10**6)[1] for i in range(2)]
    proc, url = _serve(tiny_victims["fp32"], db)
    received = {0: [0, 0], 1: [0, 0]}  # key -> [images answered, requests answered]
    stop = threading.Event()

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(timeout=TIMEOUT, headers={"Authorization": f"Bearer {secrets[i % 2]}",
                                                    "Content-Type": NPY}) as http:
            for _ in range(2000):  # bounded in count; stopped by the kill
                if stop.is_set():
                    return
                n = rng.randint(1, 32)
                try:
                    r = http.post(f"{url}/v1/predict", content=npy(np.zeros((n, 1, 16, 16), np.uint8)))
                except httpx.TransportError:
                    return
                assert r.status_code == 200
                received[i % 2][0] += n
                received[i % 2][1] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(r[1] for r in received.values()) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sum(r[1] for r in received.values()) >= 40
    for i in range(2):
        usage = store.usage(f"k{i}")[0]
        answered_images, answered_requests = received[i]
        print(f"\nkill -9, key k{i}: clients got {answered_requests} answers ({answered_images} images); "
              f"counted {usage['used']} images; audit rows: {usage['answered_requests']} ok, "
              f"{usage['in_flight']} in flight")
        # Counted before answered: the count covers every answer a client got, and the audit
        # has a row (ok, or in_flight when the kill came between the count and the outcome).
        assert usage["used"] >= answered_images and usage["images_counted"] == usage["used"]
        assert usage["answered_requests"] + usage["in_flight"] >= answered_requests
        assert usage["used"] - answered_images <= 8 * 32  # at most the requests in flight

    # Serving resumes; SIGTERM lets the requests in flight finish (a 1 s batching delay keeps
    # them in flight when it arrives) and answers them before the service exits.
    proc, url = _serve(tiny_victims["fp32"], db, "--max-delay-ms", "1000")
    try:
        before = store.key("k0").used
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, url, secrets[0], npy(np.zeros((3, 1, 16, 16), np.uint8)))
                       for _ in range(4)]
            time.sleep(0.4)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 4
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.key("k0").used == before + 12
    store.close()


# ---------------------------------------------------------------------- CLI and the remote attack

def test_keys_and_audit_commands(tmp_path, capsys):
    db = str(tmp_path / "keys.db")
    assert main(["keys", "create", "thief", "--budget", "500", "--output", "top-2", "--db", db]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert re.fullmatch(r"dq_\w{12}_[\w-]{43}", secret) and "shown only this once" in err
    assert main(["keys", "create", "lab", "--budget", "9", "--rate", "5", "--db", db]) == 0
    capsys.readouterr()
    store = KeyStore(db)
    store.reserve(store.key("thief").id, 7, time.time(), "h")
    assert main(["keys", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert "thief" in listing and "top-2" in listing and "5/60s" in listing and secret not in listing
    assert main(["keys", "usage", "thief", "--db", db]) == 0
    assert re.search(r"thief\s+7\s+500\s+493", capsys.readouterr().out)
    assert main(["keys", "revoke", "lab", "--db", db]) == 0
    assert "revoked key 'lab'" in capsys.readouterr().out
    assert main(["audit", "--db", db, "--key", "thief"]) == 0
    audit = capsys.readouterr().out
    assert re.search(r"thief\s+top-2\s+500\s+7\s+1\s+0\s+0\s+1\s+0", audit) and "in_flight" in audit
    for argv, message in (
            (["keys", "list", "--db", str(tmp_path / "none.db")], "no key database"),
            (["keys", "revoke", "nobody", "--db", db], "no key named 'nobody'"),
            (["keys", "create", "x", "--budget", "1", "--output", "all", "--db", db], "output must be"),
            (["audit", "--db", str(tmp_path / "none.db")], "no key database")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    store.close()


def test_remote_attack_errors_are_one_line(tmp_path, capsys):
    key_file = tmp_path / "thief.key"
    key_file.write_text("dq_000000000000_" + "A" * 43 + "\n")
    sock = bind("127.0.0.1", 0)
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    base = ["attack", "--attack", "knockoff", "--budget", "10", "--out", str(tmp_path / "x")]
    for extra, message in (
            (["--victim", closed], "needs --api-key-file"),
            (["--victim", closed, "--api-key-file", str(tmp_path / "missing.key")], "cannot read the API key"),
            (["--victim", closed, "--api-key-file", str(key_file)], "cannot reach the service"),
            (["--victim", closed, "--api-key-file", str(key_file), "--defense", "dcp"], "the service's"),
            (["--victim", str(tmp_path), "--api-key-file", str(key_file)], "go with --victim http")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_stealing_over_http_matches_the_in_process_attack(tiny_victims, tmp_path, capsys, one_thread):
    """The same seed, transfer set and defense (dcp): the same posteriors, bit for bit, hence the
    same surrogates and the same adversary accuracy. (The fp32 victim, which runs eagerly: the
    int8 one with dcp fused into its program is the serving guide's demonstration, at budget 5000.)"""
    from divqat.attacks import SurrogateTraining
    from divqat.pipelines.attack import AttackRequest, attack_victim
    from divqat.serve.server import load_service

    training = SurrogateTraining(epochs=2, batch_size=32, progress=False)
    local = attack_victim(AttackRequest(tiny_victims["fp32"], "knockoff", [100, 150],
                                        transfer="tiny-bars:train", defense="dcp",
                                        defense_params={"beta": 0.5}, training=training))

    served, meta = load_service(tiny_victims["fp32"], "dcp", {"beta": 0.5})
    db = tmp_path / "keys.db"
    server = ThreadServer(create_app(served, db, classes=meta["classes"], dataset=meta["dataset"]))
    store = KeyStore(db)
    (tmp_path / "thief.key").write_text(store.create_key("thief", 150)[1] + "\n")
    (tmp_path / "eval.key").write_text(store.create_key("eval", 128, output="labels")[1] + "\n")
    try:
        code = main(["attack", "--victim", server.url, "--api-key-file", str(tmp_path / "thief.key"),
                     "--eval-key-file", str(tmp_path / "eval.key"), "--attack", "knockoff",
                     "--transfer", "tiny-bars:train", "--budget", "100", "150", "--epochs", "2",
                     "--batch-size", "32", "--threads", "1", "--no-progress", "--out", str(tmp_path / "out")])
    finally:
        server.stop()
    assert code == 0
    out = capsys.readouterr().out
    assert "left out: agreement_clean" in out
    remote = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for mine, theirs in zip(remote["results"], local["results"], strict=True):
        assert mine["adversary_accuracy"] == theirs["adversary_accuracy"]
        assert mine["agreement"] == theirs["agreement"] and mine["queries_used"] == theirs["queries_used"]
    assert remote["defender_accuracy"] == local["defender_accuracy"]
    assert remote["agreement_clean"] is None and "agreement_clean" in remote["left_out"]
    assert store.usage("thief")[0]["images_answered"] == store.key("thief").used == 150
    assert store.key("eval").used == 128
    store.close()
