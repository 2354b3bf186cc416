"""The prediction API: a FastAPI app serving a ``DefendedVictim`` behind API keys.

Endpoints (the serving guide, docs/guides/serving.md, shows a session):

- ``POST /v1/predict`` (key): a batch of images, as a ``.npy`` array (``Content-Type:
  application/x-npy``; uint8, or float32 in [0, 1]; (N, C, H, W) or (N, H, W)) or as PNG / JPEG
  files (``multipart/form-data``, any field name, in order). Images are adapted to the victim's
  input as ``divqat.data.adapt`` does. Answers what the key's output level allows: ``soft`` the
  defended posteriors, ``labels`` their argmax, ``top-K`` the K largest defended probabilities
  (the rest 0) and their classes; JSON, or ``.npy`` with ``Accept: application/x-npy`` (float32
  (N, K), int64 (N,) for labels). Headers: ``Divqat-Query-Budget``, ``Divqat-Queries-Used``,
  ``Divqat-Queries-Left`` and, for a key with a rate limit, ``RateLimit-Policy`` / ``RateLimit``
  (draft-ietf-httpapi-ratelimit-headers; the quota unit is images).
- ``GET /v1/model`` (key): input shape, class names, dataset, what the key receives, limits.
  Never the defense, the architecture or the weights.
- ``GET /healthz``, ``GET /metrics`` (Prometheus text format).

Errors are JSON ``{"error": CODE, "message": ...}``: 401 ``missing_key`` / ``unknown_key`` /
``revoked_key``; 429 ``budget_exhausted`` / ``rate_limited`` (with ``Retry-After``); 413
``body_too_large`` / ``too_many_images`` / ``batch_over_rate``; 415 ``unsupported_media_type``;
400 ``bad_npy`` / ``bad_dtype`` / ``bad_shape`` / ``not_finite`` / ``out_of_range`` /
``empty_batch`` / ``bad_image`` / ``bad_form``; 403 ``key_blocked`` (an extraction detector
flagged the key, ``--on-alarm block``); 500 ``victim_error`` (refunded). None of them counts an
image (see ``divqat.serve.store`` for the accounting).

With an extraction detector (``create_app(..., watch=KeyWatch(...))``, ``divqat serve --detector``)
every answered request's images and answers go through the key's own detector (its state kept
in the key database across restarts, ``divqat.serve.watch``); its score and alarm are written
to the request's audit row, and a key it flags is flagged in the database (``divqat keys
usage``). Then ``--on-alarm`` decides: ``flag`` only records, ``block`` refuses the key's later
requests (403), ``labels-only`` answers them with labels only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from divqat.blackbox import DefendedVictim
from divqat.checks import check_int, check_number
from divqat.data import adapt, to_float
from divqat.remote import npy_bytes, read_npy
from divqat.serve.batcher import DynamicBatcher
from divqat.serve.store import KeyInfo, KeyStore, Refused
from divqat.serve.watch import KeyWatch

NPY = "application/x-npy"
MULTIPART = "multipart/form-data"
IMAGE_FORMATS = ("PNG", "JPEG")
log = logging.getLogger("divqat.serve")


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may carry and how requests are batched.

    max_images: images per request (more: 413 ``too_many_images``). max_body_bytes: request
    body size (413 ``body_too_large``). max_side: largest height or width of an image before
    adaptation. max_batch, max_delay: the dynamic batcher's (``DynamicBatcher``).
    """

    max_images: int = 1024
    max_body_bytes: int = 64 * 2**20
    max_side: int = 4096
    max_batch: int = 256
    max_delay: float = 0.002

    def __post_init__(self) -> None:
        check_int("serve", "max_images", self.max_images, low=1)
        check_int("serve", "max_body_bytes", self.max_body_bytes, low=1024)
        check_int("serve", "max_side", self.max_side, low=1)
        check_int("serve", "max_batch", self.max_batch, low=1)
        check_number("serve", "max_delay", self.max_delay, low=0, high=10)


class BadRequest(Exception):
    """Input the service refuses before counting anything."""

    def __init__(self, status: int, code: str, message: str, images: int = 0) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.images = status, code, message, images


class ServiceMetrics:
    """The Prometheus series of one app (its own registry, so apps in one process don't mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("divqat_requests", "Prediction requests by outcome (ok or the error code)",
                                ["outcome"], registry=r)
        self.images = Counter("divqat_images", "Images in prediction requests by outcome", ["outcome"],
                              registry=r)
        self.refusals = Counter("divqat_refusals", "Refused prediction requests by reason", ["reason"],
                                registry=r)
        self.latency = Histogram("divqat_request_seconds", "Prediction latency, request read to answer ready",
                                 buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10), registry=r)
        self.batch_images = Histogram("divqat_batch_images", "Images per victim call",
                                      buckets=tuple(2.0**i for i in range(11)), registry=r)
        self.batch_requests = Histogram("divqat_batch_requests", "Requests per victim call",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.victim_seconds = Histogram("divqat_victim_seconds", "Victim (and defense) time per call",
                                        buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5, 1), registry=r)
        self.in_flight = Gauge("divqat_requests_in_flight", "Prediction requests being served", registry=r)

    def observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        self.victim_seconds.observe(seconds)

    def outcome(self, outcome: str, images: int, seconds: float | None = None) -> None:
        self.requests.labels(outcome).inc()
        self.images.labels(outcome).inc(images)
        if outcome != "ok":
            self.refusals.labels(outcome).inc()
        if seconds is not None:
            self.latency.observe(seconds)


# ---------------------------------------------------------------------- decoding the images

def _fit(x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """float32 (N, C, H, W) in [0, 1] -> the victim's input, as ``divqat.data.adapt`` does;
    resizing can overshoot [0, 1] by a rounding error, which is clamped away."""
    fitted = adapt(x, shape[0], shape[1:])
    return fitted if fitted is x else fitted.clamp_(0.0, 1.0)


def _check_array(x: np.ndarray, limits: ServiceLimits) -> np.ndarray:
    """A decoded array as (N, C, H, W), uint8 or float32; BadRequest otherwise."""
    if x.dtype != np.uint8:
        if x.dtype.kind != "f" or x.dtype.itemsize != 4:
            raise BadRequest(400, "bad_dtype", f"images must be uint8 or float32, got {x.dtype}")
        x = x.astype(np.float32, copy=False)  # a big-endian float32 becomes native
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise BadRequest(400, "bad_shape", f"images must be (N, C, H, W) with C = 1 or 3, or (N, H, W); "
                         f"got shape {x.shape}")
    n, _, h, w = x.shape
    if n == 0:
        raise BadRequest(400, "empty_batch", "the batch holds no images")
    if n > limits.max_images:
        raise BadRequest(413, "too_many_images", f"{n} images in one request; at most {limits.max_images}",
                         images=n)
    if not (0 < h <= limits.max_side and 0 < w <= limits.max_side):
        raise BadRequest(400, "bad_shape", f"images must be 1 to {limits.max_side} pixels high and wide, "
                         f"got {h}x{w}", images=n)
    return x


def decode_npy(body: bytes | bytearray, limits: ServiceLimits) -> Tensor:
    """A ``.npy`` body -> float32 (N, C, H, W) in [0, 1] (not yet adapted). A ``bytearray``
    body is used in place (a batch of 256 float32 28x28 images is 800 kB, and a copy of it
    costs as much as decoding it)."""
    try:
        x = read_npy(body)
    except ValueError as e:
        raise BadRequest(400, "bad_npy", f"the body is not a .npy array ({e})") from None
    x = _check_array(x, limits)
    if not x.flags.writeable:  # a bytes body: torch wants memory it may write
        x = x.copy()
    if x.dtype == np.uint8:
        return to_float(np.ascontiguousarray(x))
    x = np.ascontiguousarray(x)
    # NaN fails both comparisons (numpy's min and max propagate it); cheaper than one torch op
    # on the small batches most requests carry.
    low, high = float(x.min()), float(x.max())
    images = torch.from_numpy(x)
    if not (low >= 0 and high <= 1):
        if not bool(np.isfinite(x).all()):
            raise BadRequest(400, "not_finite", "images hold NaN or infinite values", images=len(x))
        raise BadRequest(400, "out_of_range", f"float32 images must be in [0, 1] (got values in "
                         f"[{low:g}, {high:g}]); send uint8 for 0-255 pixels", images=len(x))
    return images


def decode_image(data: bytes, limits: ServiceLimits) -> Tensor:
    """One PNG or JPEG file -> float32 (1, C, H, W) in [0, 1], C = 1 for gray images, else 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise BadRequest(400, "bad_image", f"images must be PNG or JPEG, got {img.format}")
            w, h = img.size
            if not (0 < h <= limits.max_side and 0 < w <= limits.max_side):
                raise BadRequest(400, "bad_image", f"images must be 1 to {limits.max_side} pixels high "
                                 f"and wide, got {h}x{w}")
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F") or (
                img.mode == "P" and img.palette is not None and img.palette.mode == "L")
            pixels = np.array(img.convert("L" if gray else "RGB"), dtype=np.uint8)  # writable
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(400, "bad_image", f"an image could not be decoded ({type(e).__name__}: {e})") from None
    pixels = pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None]
    return to_float(np.ascontiguousarray(pixels))


async def _stream(body: bytes | bytearray) -> AsyncIterator[bytes]:
    yield bytes(body)
    yield b""


async def decode_multipart(request: Request, body: bytes | bytearray, shape: tuple[int, int, int],
                           limits: ServiceLimits) -> Tensor:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    parser = MultiPartParser(request.headers, _stream(body), max_files=limits.max_images + 1,
                             max_fields=64)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "too many files" in str(e).lower():
            raise BadRequest(413, "too_many_images", f"more than {limits.max_images} images in one request") from None
        raise BadRequest(400, "bad_form", f"the multipart body could not be read: {e}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest(400, "empty_batch", "the form holds no image files")
        if len(files) > limits.max_images:
            raise BadRequest(413, "too_many_images", f"more than {limits.max_images} images in one request",
                             images=len(files))
        # Each image adapted on its own: the files of one request may differ in size and colour.
        return torch.cat([_fit(decode_image(await f.read(), limits), shape) for f in files])
    finally:
        await form.close()


async def read_body(request: Request, limit: int) -> bytearray:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "body_too_large", f"the body has {int(declared)} bytes; at most {limit}")
    body = bytearray()  # writable, so that decode_npy can use it in place
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise BadRequest(413, "body_too_large", f"the body passes {limit} bytes")
        body += chunk
    return body


async def read_images(request: Request, shape: tuple[int, int, int], limits: ServiceLimits) -> Tensor:
    """The request's images at the victim's input: float32 (N, *shape) in [0, 1]."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (NPY, MULTIPART):
        raise BadRequest(415, "unsupported_media_type",
                         f"send images as {NPY} or {MULTIPART} (PNG / JPEG files), not {media or 'nothing'!r}")
    body = await read_body(request, limits.max_body_bytes)
    if media == NPY:
        return _fit(decode_npy(body, limits), shape)
    return await decode_multipart(request, body, shape, limits)


# ---------------------------------------------------------------------- answers

def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": code, "message": message}), status_code=status,
                    media_type="application/json", headers=headers)


def usage_headers(key: KeyInfo | None, window: tuple[int, int] | None = None) -> dict[str, str]:
    """The key's budget and, with a rate limit, the IETF draft's RateLimit fields."""
    if key is None:
        return {}
    headers = {"Divqat-Query-Budget": str(key.budget), "Divqat-Queries-Used": str(key.used),
               "Divqat-Queries-Left": str(key.left)}
    if key.rate is not None:
        headers["RateLimit-Policy"] = f'"images";q={key.rate};w={math.ceil(key.window)}'
        if window is not None:
            headers["RateLimit"] = f'"images";r={max(0, window[0])};t={window[1]}'
    return headers


def top_k(rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Classes (N, k) of the k largest entries per row, ties to the lowest index (the order of
    the top-k defense), and their values."""
    k = min(k, rows.shape[1])
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
    return order, rows.gather(1, order)


def encode_answer(defended: Tensor, key: KeyInfo, npy: bool) -> tuple[bytes, str]:
    """What the key may receive of the defended posteriors (N, K), as JSON or .npy."""
    k = key.top_k
    if key.label_only:
        labels = defended.argmax(dim=1)
        if npy:
            return npy_bytes(labels.numpy()), NPY
        return json.dumps({"output": "labels", "labels": labels.tolist()}).encode(), "application/json"
    if k is not None:
        classes, values = top_k(defended, k)
        if npy:
            kept = torch.zeros_like(defended).scatter_(1, classes, values)
            return npy_bytes(kept.numpy()), NPY
        return json.dumps({"output": key.output, "classes": classes.tolist(),
                           "probabilities": values.tolist()}).encode(), "application/json"
    if npy:
        return npy_bytes(defended.numpy()), NPY
    # float32 -> Python float is exact, and JSON keeps all 17 digits: the client can round-trip.
    return json.dumps({"output": "soft", "posteriors": defended.tolist()}).encode(), "application/json"


def _digest(images: Tensor) -> str:
    """SHA-256 of the images as the victim sees them (float32, C order): the audit's batch hash."""
    return hashlib.sha256(images.contiguous().numpy().data).hexdigest()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---------------------------------------------------------------------- the app

def create_app(served: DefendedVictim, db: str | Path, *, classes: Sequence[str],
               dataset: str | None = None, limits: ServiceLimits | None = None,
               fsync: bool = False, watch: KeyWatch | None = None) -> FastAPI:
    """The prediction API for ``served`` (the victim behind its defense), keys and audit in
    the SQLite file ``db`` (``divqat keys`` writes the keys).

    Arguments:
        served (DefendedVictim): the defended victim, already warmed up (compiled).
        db (path): the key database (created if missing).
        classes (sequence of str): the class names clients see, one per output.
        dataset (str, optional): the task's dataset name, published in ``/v1/model`` (the class
            names tell as much; the remote attack measures on its test split).
        limits (ServiceLimits): request limits and batching. (Default: ``ServiceLimits()``.)
        fsync (bool): SQLite ``synchronous=FULL``: counts survive a power cut too, not only a
            crash of the service. (Default: False.)
        watch (KeyWatch, optional): an extraction detector per key and the policy on its alarm
            (not started; the app opens and closes it with the key database). (Default: None.)
    """
    limits = limits or ServiceLimits()
    if len(classes) != served.num_classes:
        raise ValueError(f"{len(classes)} class names for a victim with {served.num_classes} outputs")
    classes = [str(c) for c in classes]
    shape = served.input_shape
    metrics = ServiceMetrics()
    # The key database is used from the event loop itself: a WAL transaction here takes tens of
    # microseconds (no fsync), less than handing it to a thread, which on a busy machine waits
    # for a time slice twice per request. Only another process's write (`divqat keys`) can
    # make it wait, for as long as that write takes.
    store = KeyStore(db, fsync=fsync)
    batcher = DynamicBatcher(lambda images: served(images).defended, max_batch=limits.max_batch,
                             max_delay=limits.max_delay, observe=metrics.observe_batch)

    if watch is not None:
        watch.open(store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:  # after the server has finished the requests in flight (SIGTERM, Ctrl-C)
            await batcher.close()
            if watch is not None:
                watch.close()  # every key's detector state saved
            store.close()

    app = FastAPI(title="divqat prediction API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(json.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def model(request: Request) -> Response:
        try:
            key = store.authenticate(_bearer(request))
        except Refused as r:
            return _error(r.status, r.code, r.message)
        receives = {"soft": "the defended posteriors (N, K) float32",
                    "labels": "the predicted labels (N,) int64"}.get(
            key.output, f"the {key.top_k} largest defended probabilities per image and their classes")
        return Response(json.dumps({
            "input_shape": list(shape), "num_classes": len(classes), "classes": classes,
            "dataset": dataset, "output": key.output, "receives": receives,
            "accepts": {NPY: "uint8 (0-255) or float32 in [0, 1]; (N, C, H, W) with C = 1 or 3, or "
                             "(N, H, W); adapted to input_shape",
                        MULTIPART: "PNG or JPEG files, adapted to input_shape"},
            "answers": ["application/json", NPY],
            "max_images": limits.max_images, "max_body_bytes": limits.max_body_bytes,
            "key": {"name": key.name, "budget": key.budget, "used": key.used, "left": key.left,
                    "rate": key.rate, "window": key.window},
        }), media_type="application/json", headers=usage_headers(key))

    async def predict(request: Request) -> Response:
        metrics.in_flight.inc()
        try:
            return await _predict(request)
        finally:
            metrics.in_flight.dec()

    # A plain route: the handler reads the request itself, so FastAPI's per-request dependency
    # solving would only add its cost (it is a tenth of a one-image request's time here).
    app.add_route("/v1/predict", predict, methods=["POST"])

    async def _predict(request: Request) -> Response:
        start, now = time.perf_counter(), time.time()
        try:
            key = store.authenticate(_bearer(request))
        except Refused as r:
            metrics.outcome(r.code, 0)
            return _error(r.status, r.code, r.message)
        labels_only = False
        if watch is not None and watch.on_alarm != "flag" and store.is_flagged(key.id):
            if watch.on_alarm == "block":
                message = (f"the API key {key.name!r} was flagged by the extraction detector "
                           f"({watch.name}); its requests are refused")
                metrics.outcome("key_blocked", 0)
                store.record(key.id, now, 0, "key_blocked", 403, (time.perf_counter() - start) * 1e3)
                return _error(403, "key_blocked", message, usage_headers(key))
            labels_only = True
        try:
            images = await read_images(request, shape, limits)
        except BadRequest as e:
            metrics.outcome(e.code, e.images)
            store.record(key.id, now, e.images, e.code, e.status, (time.perf_counter() - start) * 1e3)
            return _error(e.status, e.code, e.message, usage_headers(key))
        n = len(images)
        try:
            reservation = store.reserve(key.id, n, now, _digest(images))
        except Refused as r:
            metrics.outcome(r.code, n)
            headers = usage_headers(r.key or key, r.window)
            if r.retry_after is not None:
                headers["Retry-After"] = str(r.retry_after)
            return _error(r.status, r.code, r.message, headers)
        # Counted and committed: from here on the images count whatever happens to the answer.
        try:
            defended = await batcher.submit(images)
            shown = dataclasses.replace(reservation.key, output="labels") if labels_only else reservation.key
            body, media = encode_answer(defended, shown, NPY in request.headers.get("accept", ""))
        except Exception:
            log.exception("the victim failed on a batch; the request's images are refunded")
            seconds = time.perf_counter() - start
            store.finish(reservation.audit_id, "victim_error", 500, seconds * 1e3, refund=True)
            metrics.outcome("victim_error", n, seconds)
            return _error(500, "victim_error", "the victim failed on this batch; nothing was counted")
        verdict = None
        if watch is not None:
            # Before the answer leaves, so that a key flagged by this request is blocked from its
            # next one on; a detector failure never costs the client its answer.
            try:
                verdict = await watch.observe(key.id, images, defended)
            except Exception:
                log.exception("the extraction detector failed on a request of key %r", key.name)
        seconds = time.perf_counter() - start
        store.finish(reservation.audit_id, "ok", 200, seconds * 1e3,
                     detector_score=None if verdict is None else verdict.score,
                     alarm=None if verdict is None else verdict.alarm)
        metrics.outcome("ok", n, seconds)
        return Response(body, media_type=media, headers=usage_headers(reservation.key, reservation.window))

    return app
