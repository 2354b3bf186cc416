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
- ``GET /healthz``: ``{"status": "ok"}``, or 503 ``{"status": "unhealthy", "problem": ...}``
  when the batcher's worker is dead or a victim call has run past ``stuck_after`` seconds.
- ``GET /metrics`` (Prometheus text format): only with the operator's token (``metrics_token``,
  sent as ``Authorization: Bearer TOKEN``); without a token configured it is not served (404).

Errors are JSON ``{"error": CODE, "message": ...}``: 401 ``missing_key`` / ``unknown_key`` /
``revoked_key``; 429 ``budget_exhausted`` / ``rate_limited`` (with ``Retry-After``) /
``too_many_in_flight`` (the key's cap on requests at once) / ``too_many_refusals`` (the key or
the client address was refused too often in the last minute); 503 ``busy`` (the service's cap
on requests at once); 408 ``read_timeout`` (the body did not arrive within ``read_timeout``);
413 ``body_too_large`` / ``too_many_images`` / ``too_many_pixels`` / ``batch_over_rate``; 415
``unsupported_media_type``; 400 ``bad_npy`` / ``bad_dtype`` / ``bad_shape`` / ``not_finite`` /
``out_of_range`` / ``empty_batch`` / ``bad_image`` / ``bad_form``; 403 ``key_blocked`` (the key
was flagged, ``--on-alarm block``); 500 ``victim_error`` (refunded). None of them counts an
image (see ``divqat.serve.store`` for the accounting). Before a request reaches the app, the HTTP
protocol ``divqat.serve.server`` gives uvicorn answers 408 ``head_timeout`` (the request head did
not arrive within ``head_timeout``) and 431 ``head_too_large`` (past ``max_head_bytes``), and
closes the connection.

What a request costs before it is counted, in order: the service's concurrency cap (503, nothing
read), the refusal limits (429, nothing read or written), the key (401), its flag (403), its
budget and rate window (429: a key with nothing left is refused before its body is read, so a
refusal costs no decode), its cap on requests in flight (429), then the body, read within
``read_timeout`` seconds, and its decoding, in a pool of ``decode_threads`` threads off the event
loop (a ``.npy`` body is checked against the image limits from its header, before any pixel is
converted; PNG / JPEG sizes from their headers, before any is decoded). The memory held in
request bodies is at most ``max_concurrent * max_body_bytes``.

With an extraction detector (``create_app(..., watch=KeyWatch(...))``, ``divqat serve --detector``)
every answered request's images and answers go through the key's own detector (its state kept
in the key database across restarts, ``divqat.serve.watch``); its score and alarm are written
to the request's audit row, and a key it flags is flagged in the database (``divqat keys
usage``). Then ``--on-alarm`` decides: ``flag`` only records, ``block`` refuses the key's later
requests (403), ``labels-only`` answers them with labels only. The alarm acts at once, on the
requests already admitted too: each request's answer leaves only after the key's detector has
watched it (in the order the answers were computed), and a request whose verdict is an alarm
(the one that raised it, and every later one) gets what ``--on-alarm`` says: with ``block`` a
403, its images refunded (the victim saw them, the client gets nothing of them). So no soft
answer leaves after the alarm; at most the requests whose observation finished before it.

With a watermark (``create_app(..., watermark=KeyedWatermarks(...))``, ``divqat serve
--watermark RATE``; DAWN, ``divqat.ownership.watermark``) each key's answers are marked after
the defense and after the detector has watched them: a keyed fraction of its images is answered
with a deterministic wrong label (the defended posteriors rearranged so it is their argmax; top-k
and labels follow), the key's secret and its marked inputs kept in the key database, never sent
to a client. ``divqat verify --marks DB`` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
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

from divqat.blackbox import DefendedBatch, DefendedVictim
from divqat.checks import check_int, check_number
from divqat.data import adapt, to_float
from divqat.ownership import KeyedWatermarks
from divqat.remote import npy_bytes, read_npy
from divqat.serve.batcher import DynamicBatcher
from divqat.serve.store import KeyInfo, KeyStore, Refused
from divqat.serve.watch import KeyWatch

NPY = "application/x-npy"
MULTIPART = "multipart/form-data"
IMAGE_FORMATS = ("PNG", "JPEG")
INLINE_NPY_BYTES = 64 * 1024  # smaller .npy bodies are decoded on the event loop: cheaper than a hop
log = logging.getLogger("divqat.serve")


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may carry, how long it may take to arrive, how many are served at once,
    and how requests are batched.

    max_images: images per request (more: 413 ``too_many_images``). max_body_bytes: request
    body size (413 ``body_too_large``). max_side: largest height or width of an image before
    adaptation. max_pixels: height x width summed over a request's images, before adaptation
    (413 ``too_many_pixels``; 2**24: one 4096 x 4096 image, or 1024 of 128 x 128).
    read_timeout: seconds for the whole body to arrive (408 ``read_timeout``). head_timeout:
    seconds a connection has, from its opening and from each answer, to send a complete request
    head (408 ``head_timeout``, the connection closed). max_head_bytes: size of a request head
    (431 ``head_too_large``); both enforced by the HTTP protocol ``divqat.serve.server`` gives
    uvicorn. max_concurrent:
    prediction requests served at once (more: 503 ``busy``); with max_body_bytes it bounds the
    memory held in bodies. max_per_key: requests of one key at once (429 ``too_many_in_flight``).
    max_refusals: refusals per key and per client address in a minute before their requests are
    refused unread and unaudited (429 ``too_many_refusals``). decode_threads: threads decoding
    bodies off the event loop. max_batch, max_delay: the dynamic batcher's (``DynamicBatcher``).
    stuck_after: seconds a victim call may run before ``/healthz`` reports the batcher stuck.
    """

    max_images: int = 1024
    max_body_bytes: int = 64 * 2**20
    max_side: int = 4096
    max_pixels: int = 2**24
    read_timeout: float = 30.0
    head_timeout: float = 10.0
    max_head_bytes: int = 64 * 1024
    max_concurrent: int = 256
    max_per_key: int = 64
    max_refusals: int = 120
    decode_threads: int = 2
    max_batch: int = 256
    max_delay: float = 0.002
    stuck_after: float = 60.0

    def __post_init__(self) -> None:
        check_int("serve", "max_images", self.max_images, low=1)
        check_int("serve", "max_body_bytes", self.max_body_bytes, low=1024)
        check_int("serve", "max_side", self.max_side, low=1)
        check_int("serve", "max_pixels", self.max_pixels, low=1)
        check_number("serve", "read_timeout", self.read_timeout, low=0.01)
        check_number("serve", "head_timeout", self.head_timeout, low=0.01)
        check_int("serve", "max_head_bytes", self.max_head_bytes, low=1024)
        check_int("serve", "max_concurrent", self.max_concurrent, low=1)
        check_int("serve", "max_per_key", self.max_per_key, low=1)
        check_int("serve", "max_refusals", self.max_refusals, low=1)
        check_int("serve", "decode_threads", self.decode_threads, low=1)
        check_int("serve", "max_batch", self.max_batch, low=1)
        check_number("serve", "max_delay", self.max_delay, low=0, high=10)
        check_number("serve", "stuck_after", self.stuck_after, low=0)


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
        self.body_bytes = Gauge("divqat_body_bytes", "Bytes of request bodies held", registry=r)
        self.body_bytes_now = self.body_bytes_peak = 0
        self.in_flight_peak = 0  # most prediction requests served at once (for tests and probes)

    def hold(self, nbytes: int) -> None:
        """``nbytes`` more (or, negative, fewer) bytes of request bodies in memory."""
        self.body_bytes_now += nbytes
        self.body_bytes_peak = max(self.body_bytes_peak, self.body_bytes_now)
        self.body_bytes.set(self.body_bytes_now)

    def observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        self.victim_seconds.observe(seconds)

    def refused(self, reason: str) -> None:
        """A connection refused before any route ran (the request head's limits: 408
        ``head_timeout``, 431 ``head_too_large``): counted among the refusals only, since no
        prediction request was read."""
        self.refusals.labels(reason).inc()

    def outcome(self, outcome: str, images: int, seconds: float | None = None) -> None:
        self.requests.labels(outcome).inc()
        self.images.labels(outcome).inc(images)
        if outcome != "ok":
            self.refusals.labels(outcome).inc()
        if seconds is not None:
            self.latency.observe(seconds)


class RefusalLimit:
    """Refusals counted per key and per client address in fixed windows of ``window`` seconds:
    past ``limit`` in a window, ``over`` says for how many seconds more they are refused at once
    (nothing read, no audit row). Forgets windows that ended once it tracks ``keep`` of them."""

    def __init__(self, limit: int, window: float = 60.0, keep: int = 100_000) -> None:
        self.limit, self.window, self.keep = limit, window, keep
        self._windows: dict[object, list[float]] = {}  # who -> [window start, refusals]

    def over(self, who: object, now: float) -> int | None:
        w = self._windows.get(who)
        if w is None or now >= w[0] + self.window or w[1] < self.limit:
            return None
        return max(1, math.ceil(w[0] + self.window - now))

    def add(self, who: object, now: float) -> None:
        w = self._windows.get(who)
        if w is None or now >= w[0] + self.window:
            if len(self._windows) >= self.keep:
                self._windows = {k: v for k, v in self._windows.items() if now < v[0] + self.window}
            self._windows[who] = [now, 1]
        else:
            w[1] += 1


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
    # The shape is checked whole before its image count is believed (a header may declare
    # 2**63 images of zero pixels): only then is the count written anywhere.
    if not (0 < h <= limits.max_side and 0 < w <= limits.max_side):
        raise BadRequest(400, "bad_shape", f"images must be 1 to {limits.max_side} pixels high and wide, "
                         f"got {h}x{w}")
    if n == 0:
        raise BadRequest(400, "empty_batch", "the batch holds no images")
    if n > limits.max_images:
        raise BadRequest(413, "too_many_images", f"{n} images in one request; at most {limits.max_images}",
                         images=n)
    if n * h * w > limits.max_pixels:
        raise BadRequest(413, "too_many_pixels", f"{n} images of {h}x{w} pixels; at most {limits.max_pixels} "
                         f"pixels in one request", images=n)
    return x


def decode_npy(body: bytes | bytearray, limits: ServiceLimits) -> Tensor:
    """A ``.npy`` body -> float32 (N, C, H, W) in [0, 1] (not yet adapted). A ``bytearray``
    body is used in place (a batch of 256 float32 28x28 images is 800 kB, and a copy of it
    costs as much as decoding it)."""
    try:
        x = read_npy(body)
    except Exception as e:  # whatever numpy's header parser or dtype raises: the client's error
        raise BadRequest(400, "bad_npy", f"the body is not a .npy array ({type(e).__name__}: {e})"[:500]) from None
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


def _open_image(data: bytes, limits: ServiceLimits):
    """A PNG or JPEG file opened (its header read, no pixel decoded yet)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.format not in IMAGE_FORMATS:
        img.close()
        raise BadRequest(400, "bad_image", f"images must be PNG or JPEG, got {img.format}")
    w, h = img.size
    if not (0 < h <= limits.max_side and 0 < w <= limits.max_side):
        img.close()
        raise BadRequest(400, "bad_image", f"images must be 1 to {limits.max_side} pixels high "
                         f"and wide, got {h}x{w}")
    return img


def _image_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: bytes, limits: ServiceLimits) -> Tensor:
    """One PNG or JPEG file -> float32 (1, C, H, W) in [0, 1], C = 1 for gray images, else 3."""
    try:
        with _open_image(data, limits) as img:
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F") or (
                img.mode == "P" and img.palette is not None and img.palette.mode == "L")
            pixels = np.array(img.convert("L" if gray else "RGB"), dtype=np.uint8)  # writable
    except BadRequest:
        raise
    except _image_errors() as e:
        raise BadRequest(400, "bad_image", f"an image could not be decoded ({type(e).__name__}: {e})") from None
    pixels = pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None]
    return to_float(np.ascontiguousarray(pixels))


def decode_files(files: Sequence[bytes], shape: tuple[int, int, int], limits: ServiceLimits) -> Tensor:
    """PNG / JPEG files -> the victim's input (N, *shape). Every file's size is read from its
    header first, and the request refused (413 ``too_many_pixels``) before any is decoded when
    they pass ``max_pixels`` together."""
    pixels = 0
    for data in files:
        try:
            with _open_image(data, limits) as img:
                pixels += img.size[0] * img.size[1]
        except BadRequest:
            raise
        except _image_errors() as e:
            raise BadRequest(400, "bad_image", f"an image could not be read ({type(e).__name__}: {e})") from None
    if pixels > limits.max_pixels:
        raise BadRequest(413, "too_many_pixels", f"the images hold {pixels} pixels; at most "
                         f"{limits.max_pixels} in one request", images=len(files))
    # Each image adapted on its own: the files of one request may differ in size and colour.
    return torch.cat([_fit(decode_image(data, limits), shape) for data in files])


def decode_npy_fitted(body: bytes | bytearray, shape: tuple[int, int, int], limits: ServiceLimits) -> Tensor:
    return _fit(decode_npy(body, limits), shape)


class _Form:
    """python-multipart's callbacks collecting a form's files (parts with a filename) in order,
    within the request's limits: more than ``max_images`` files is 413 ``too_many_images`` at
    once, more than ``max_fields`` other fields or one over ``max_field_bytes`` is ``bad_form``."""

    def __init__(self, limits: ServiceLimits, max_fields: int = 64, max_field_bytes: int = 2**20) -> None:
        self.limits, self.max_fields, self.max_field_bytes = limits, max_fields, max_field_bytes
        self.files: list[bytes] = []
        self.fields = 0
        self._header = [b"", b""]
        self._disposition: bytes | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._is_file = False

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished}

    def part_begin(self) -> None:
        self._disposition, self._chunks, self._size, self._is_file = None, [], 0, False

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest(400, "bad_form", 'a form part has no Content-Disposition "name"')
        self._is_file = b"filename" in options
        if self._is_file and len(self.files) >= self.limits.max_images:
            raise BadRequest(413, "too_many_images", f"more than {self.limits.max_images} images in one request")
        if not self._is_file:
            self.fields += 1
            if self.fields > self.max_fields:
                raise BadRequest(400, "bad_form", f"more than {self.max_fields} form fields")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if not self._is_file and self._size > self.max_field_bytes:
            raise BadRequest(400, "bad_form", f"a form field passes {self.max_field_bytes} bytes")
        if self._is_file:
            self._chunks.append(bytes(data[start:end]))

    def part_end(self) -> None:
        if self._is_file:
            self.files.append(b"".join(self._chunks))
        self._chunks = []


def form_files(body: bytes | bytearray, content_type: str, limits: ServiceLimits) -> list[bytes]:
    """The files of a ``multipart/form-data`` body (any field name), in order. Parsed in memory,
    in the caller's thread (the body is in memory already: nothing is spooled to disk)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    if not options.get(b"boundary"):
        raise BadRequest(400, "bad_form", "the multipart body could not be read: it names no boundary")
    form = _Form(limits)
    try:
        parser = MultipartParser(options[b"boundary"], form.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise BadRequest(400, "bad_form", f"the multipart body could not be read: {e}") from None
    if not form.files:
        raise BadRequest(400, "empty_batch", "the form holds no image files")
    return form.files


def decode_form(body: bytes | bytearray, content_type: str, shape: tuple[int, int, int],
                limits: ServiceLimits) -> Tensor:
    """A ``multipart/form-data`` body of PNG / JPEG files -> the victim's input (N, *shape)."""
    return decode_files(form_files(body, content_type, limits), shape, limits)


async def read_body(request: Request, limit: int, timeout: float = math.inf,
                    hold: Callable[[int], None] | None = None) -> bytearray:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, and (408) when it
    has not all arrived within ``timeout`` seconds; ``hold`` is told each chunk's size."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "body_too_large", f"the body has {int(declared)} bytes; at most {limit}")
    body = bytearray()  # writable, so that decode_npy can use it in place
    try:
        async with asyncio.timeout(None if math.isinf(timeout) else timeout):
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise BadRequest(413, "body_too_large", f"the body passes {limit} bytes")
                body += chunk
                if hold is not None:
                    hold(len(chunk))
    except TimeoutError:
        raise BadRequest(408, "read_timeout", f"the body did not arrive within {timeout:g} s "
                         f"({len(body)} bytes came)") from None
    return body


async def read_images(request: Request, shape: tuple[int, int, int], limits: ServiceLimits,
                      pool: Executor | None = None, hold: Callable[[int], None] | None = None) -> Tensor:
    """The request's images at the victim's input: float32 (N, *shape) in [0, 1]; decoded in
    ``pool`` (default: the event loop's), but for a small ``.npy`` body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (NPY, MULTIPART):
        raise BadRequest(415, "unsupported_media_type",
                         f"send images as {NPY} or {MULTIPART} (PNG / JPEG files), not {media or 'nothing'!r}")
    body = await read_body(request, limits.max_body_bytes, limits.read_timeout, hold)
    if media == NPY:
        if len(body) <= INLINE_NPY_BYTES:
            return decode_npy_fitted(body, shape, limits)
        return await asyncio.get_running_loop().run_in_executor(pool, decode_npy_fitted, body, shape, limits)
    # The form is parsed in the pool too: python-multipart reads it in Python, which on tens of
    # MiB would hold the event loop.
    return await asyncio.get_running_loop().run_in_executor(
        pool, decode_form, body, request.headers.get("content-type", ""), shape, limits)


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
               fsync: bool = False, watch: KeyWatch | None = None,
               metrics_token: str | None = None, watermark: KeyedWatermarks | None = None) -> FastAPI:
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
        metrics_token (str, optional): the operator's token for ``/metrics`` (``Authorization:
            Bearer TOKEN``); None: ``/metrics`` is not served. (Default: None.)
        watermark (KeyedWatermarks, optional): DAWN's watermark per key, its state in the key
            database (opened and closed with it). (Default: None.)

    ``app.state`` holds the ``batcher``, the ``metrics`` and the ``watch`` (for tests and
    operators' probes).
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

    def run(images: Tensor) -> Tensor:
        """The defended posteriors (N, K); with a watermark (N, 2, K), the clean ones beside
        them, whose argmax the mark labels are chosen against."""
        batch: DefendedBatch = served(images)
        return batch.defended if watermark is None else torch.stack((batch.defended, batch.clean), dim=1)

    batcher = DynamicBatcher(run, max_batch=limits.max_batch,
                             max_delay=limits.max_delay, observe=metrics.observe_batch,
                             stuck_after=limits.stuck_after)
    decoders = ThreadPoolExecutor(max_workers=limits.decode_threads, thread_name_prefix="divqat-decode")
    refusals = RefusalLimit(limits.max_refusals)
    in_flight = {"all": 0}  # and per key id

    if watch is not None:
        watch.open(store)
    if watermark is not None:
        watermark.open()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:  # after the server has finished the requests in flight (SIGTERM, Ctrl-C)
            await batcher.close()
            decoders.shutdown(wait=True)
            if watch is not None:
                watch.close()  # every key's detector state saved
            if watermark is not None:
                watermark.close()  # every key's answer counters written
            store.close()

    app = FastAPI(title="divqat prediction API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.watch = batcher, metrics, watch
    app.state.limits = limits

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.get("/healthz")
    async def healthz() -> Response:
        problem = batcher.health()
        if problem is not None:
            return Response(json.dumps({"status": "unhealthy", "problem": problem}), status_code=503,
                            media_type="application/json")
        return Response(json.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        token = _bearer(request)
        if metrics_token is None:
            return _error(404, "not_found", "Not Found")
        if token is None or not hmac.compare_digest(token.encode(), metrics_token.encode()):
            return _error(401, "unknown_key", "/metrics needs the operator's token")
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
        if in_flight["all"] >= limits.max_concurrent:  # nothing read: costs no memory
            metrics.outcome("busy", 0)
            return _error(503, "busy", f"the service is serving {limits.max_concurrent} requests at once; "
                          "retry shortly", {"Retry-After": "1"})
        in_flight["all"] += 1
        metrics.in_flight_peak = max(metrics.in_flight_peak, in_flight["all"])
        metrics.in_flight.inc()
        held = [0]

        def hold(nbytes: int) -> None:
            held[0] += nbytes
            metrics.hold(nbytes)

        try:
            return await _predict(request, hold)
        finally:
            in_flight["all"] -= 1
            metrics.in_flight.dec()
            metrics.hold(-held[0])

    # A plain route: the handler reads the request itself, so FastAPI's per-request dependency
    # solving would only add its cost (it is a tenth of a one-image request's time here).
    app.add_route("/v1/predict", predict, methods=["POST"])

    blocked_message = "the API key {!r} was flagged for extraction-like querying; its requests are refused"

    async def _predict(request: Request, hold: Callable[[int], None]) -> Response:
        start, now = time.perf_counter(), time.time()
        address = ("address", request.client.host if request.client is not None else None)
        retry = refusals.over(address, now)
        if retry is not None:
            metrics.outcome("too_many_refusals", 0)
            return _error(429, "too_many_refusals", f"too many refused requests from this address; retry in "
                          f"{retry} s", {"Retry-After": str(retry)})
        try:
            key = store.authenticate(_bearer(request))
        except Refused as r:
            refusals.add(address, now)
            metrics.outcome(r.code, 0)
            return _error(r.status, r.code, r.message)
        retry = refusals.over(key.id, now)
        if retry is not None:
            metrics.outcome("too_many_refusals", 0)
            return _error(429, "too_many_refusals", f"too many refused requests of the API key {key.name!r}; "
                          f"retry in {retry} s", {"Retry-After": str(retry)})

        def refuse(status: int, code: str, message: str, headers: dict[str, str], images: int = 0,
                   audited: bool = True) -> Response:
            refusals.add(key.id, now)
            refusals.add(address, now)
            metrics.outcome(code, images)
            if audited:
                store.record(key.id, now, images, code, status, (time.perf_counter() - start) * 1e3)
            return _error(status, code, message, headers)

        labels_only = False
        if watch is not None and watch.on_alarm != "flag" and store.is_flagged(key.id):
            if watch.on_alarm == "block":
                return refuse(403, "key_blocked", blocked_message.format(key.name), usage_headers(key))
            labels_only = True
        try:  # before the body is read: a key with nothing left costs no read and no decode
            store.check_room(key.id, now)
        except Refused as r:
            headers = usage_headers(r.key or key, r.window)
            if r.retry_after is not None:
                headers["Retry-After"] = str(r.retry_after)
            return refuse(r.status, r.code, r.message, headers)
        if in_flight.get(key.id, 0) >= limits.max_per_key:
            return refuse(429, "too_many_in_flight", f"the API key {key.name!r} has {limits.max_per_key} "
                          "requests in flight already; wait for their answers", {**usage_headers(key),
                                                                                  "Retry-After": "1"})
        in_flight[key.id] = in_flight.get(key.id, 0) + 1
        try:
            return await _admitted(request, key, labels_only, start, now, address, hold)
        finally:
            in_flight[key.id] -= 1
            if not in_flight[key.id]:
                del in_flight[key.id]

    async def _admitted(request: Request, key: KeyInfo, labels_only: bool, start: float, now: float,
                        address: tuple, hold: Callable[[int], None]) -> Response:
        try:
            images = await read_images(request, shape, limits, decoders, hold)
        except BadRequest as e:
            refusals.add(key.id, now)
            refusals.add(address, now)
            metrics.outcome(e.code, e.images)
            store.record(key.id, now, e.images, e.code, e.status, (time.perf_counter() - start) * 1e3)
            return _error(e.status, e.code, e.message, usage_headers(key))
        n = len(images)
        try:
            reservation = store.reserve(key.id, n, now, _digest(images))
        except Refused as r:  # audited by reserve
            refusals.add(key.id, now)
            refusals.add(address, now)
            metrics.outcome(r.code, n)
            headers = usage_headers(r.key or key, r.window)
            if r.retry_after is not None:
                headers["Retry-After"] = str(r.retry_after)
            return _error(r.status, r.code, r.message, headers)
        # Counted and committed: from here on the images count whatever happens to the answer.
        try:
            defended = clean = await batcher.submit(images)
            if watermark is not None:
                defended, clean = defended[:, 0], defended[:, 1]
        except Exception:
            log.exception("the victim failed on a batch; the request's images are refunded")
            seconds = time.perf_counter() - start
            store.finish(reservation.audit_id, "victim_error", 500, seconds * 1e3, refund=True)
            metrics.outcome("victim_error", n, seconds)
            return _error(500, "victim_error", "the victim failed on this batch; nothing was counted")
        verdict = None
        if watch is not None:
            # Before the answer leaves, in the order the answers were computed: a request whose
            # verdict is an alarm (its own, or an earlier request's) gets what --on-alarm says;
            # a detector failure never costs the client its answer.
            try:
                verdict = await watch.observe(key.id, images, defended)
            except Exception:
                log.exception("the extraction detector failed on a request of key %r", key.name)
        score = None if verdict is None else verdict.score
        alarm = None if verdict is None else verdict.alarm
        if verdict is not None and verdict.flagged and watch.on_alarm != "flag":
            if watch.on_alarm == "block":
                seconds = time.perf_counter() - start
                store.finish(reservation.audit_id, "key_blocked", 403, seconds * 1e3, refund=True,
                             detector_score=score, alarm=alarm)
                metrics.outcome("key_blocked", n, seconds)
                refunded = dataclasses.replace(reservation.key, used=reservation.key.used - n)
                return _error(403, "key_blocked", blocked_message.format(key.name), usage_headers(refunded))
            labels_only = True
        if watermark is not None:
            try:  # after the defense and the detector; a failure to record costs no answer
                defended = watermark.apply(key.id, key.name, defended, images, clean.argmax(dim=1), now)
            except Exception:
                log.exception("watermarking the answers of key %r failed; they leave unmarked", key.name)
        try:
            shown = dataclasses.replace(reservation.key, output="labels") if labels_only else reservation.key
            body, media = encode_answer(defended, shown, NPY in request.headers.get("accept", ""))
        except Exception:
            log.exception("encoding an answer failed; the request's images are refunded")
            seconds = time.perf_counter() - start
            store.finish(reservation.audit_id, "victim_error", 500, seconds * 1e3, refund=True)
            metrics.outcome("victim_error", n, seconds)
            return _error(500, "victim_error", "the victim failed on this batch; nothing was counted")
        seconds = time.perf_counter() - start
        store.finish(reservation.audit_id, "ok", 200, seconds * 1e3, detector_score=score, alarm=alarm)
        metrics.outcome("ok", n, seconds)
        return Response(body, media_type=media, headers=usage_headers(reservation.key, reservation.window))

    return app
