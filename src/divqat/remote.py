"""The thief's side of ``divqat serve``: ``RemoteBlackBox``, the query boundary over HTTP.

It implements ``divqat.blackbox.QueryBoundary``, so every attack runs through it unchanged; the
victim, the defense and the counter live in another process, and the counts come from the
service's answers (``Divqat-Queries-Used``), not from this object.

Queries travel as float32 ``.npy`` both ways, so the posteriors a remote thief trains on are
bit for bit those an in-process ``BlackBox`` would return for the same batches.

    >>> box = RemoteBlackBox("http://127.0.0.1:8000", Path("thief.key").read_text())
    >>> posteriors = box.query(images)      # (N, K) float32; box.queries_used from the service
"""

from __future__ import annotations

import io
import ipaddress
import math
import re
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from divqat.boundary import BudgetExceeded, QueryBoundary, QueryError
from divqat.checks import check_number
from divqat.errors import ConfigError, DivqatError

NPY = "application/x-npy"
# The header numpy writes (format 1.0-3.0): read with a regular expression, not numpy's
# ast.literal_eval, which alone costs more than a one-image request's victim call.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-zA-Z][0-9]*)', 'fortran_order': (True|False), "
                         r"'shape': \(((?:[0-9]+, ?)*[0-9]*)\), ?\} *\n?\Z")


def read_npy(body: bytes | bytearray) -> np.ndarray:
    """The array of a ``.npy`` file held in memory, without copying it (read-only over
    ``bytes``, writable over a ``bytearray``). ``ValueError`` when the body is not one, or when
    it declares another size than it holds; object arrays are refused (they would be pickles).
    The wire format of ``divqat serve`` both ways."""
    if bytes(body[:6]) != b"\x93NUMPY" or len(body) < 10:
        raise ValueError("no .npy magic string")
    major = body[6]
    if major == 1:
        start, size = 10, int.from_bytes(body[8:10], "little")
    elif major in (2, 3):
        start, size = 12, int.from_bytes(body[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    header = bytes(body[start:start + size]).decode("utf8" if major == 3 else "latin1")
    match = _NPY_HEADER.match(header)
    if match is not None:
        dtype, fortran = np.dtype(match.group(1)), match.group(2) == "True"
        shape = tuple(int(d) for d in match.group(3).replace(" ", "").split(",") if d)
    else:  # written by something other than numpy's own writer: numpy's parser
        from numpy.lib import format as npy_format

        stream = io.BytesIO(body)
        npy_format.read_magic(stream)
        read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not images")
    count = math.prod(shape)
    offset = start + size
    if len(body) - offset != count * dtype.itemsize:
        raise ValueError(f"the header declares {shape} {dtype} ({count * dtype.itemsize} bytes) but "
                         f"{len(body) - offset} bytes follow")
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a ``.npy`` file (format 1.0, C order), byte for byte what ``np.save`` writes."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be sent")
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {tuple(array.shape)!r}, }}"
    # Padded with spaces and a newline so that the data starts on a 64-byte boundary, as numpy does.
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + array.tobytes()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): traffic to them never
    leaves the machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str, insecure: bool = False) -> None:
    """``ConfigError`` for a plain ``http://`` URL whose host is not loopback, unless
    ``insecure``: every request carries the API key, which would cross the network in clear."""
    parts = urlsplit(url)
    if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname or ""):
        raise ConfigError(f"{url} is plain HTTP to another machine: the API key would cross the network "
                          "in clear; use https://, or pass insecure=True (--insecure) if the path is "
                          "trusted (a tunnel, a private network)")


class RemoteError(DivqatError):
    """The prediction service cannot be reached, refused the API key, failed, or answered
    something that is not a divqat answer."""


def read_key_file(path: Any) -> str:
    """The API key in a file written by ``divqat keys create NAME ... > FILE``."""
    from pathlib import Path

    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the API key file {path}: {e.strerror}") from None
    if not key or len(key.split()) != 1:
        raise ConfigError(f"{path} does not hold one API key (expected the line `divqat keys create` printed)")
    return key


class RemoteBlackBox(QueryBoundary):
    """A ``divqat serve`` prediction API as a black box: the ``BlackBox`` interface over HTTP.

    Arguments:
        url (str): the service, e.g. ``http://127.0.0.1:8000``.
        api_key (str): the key's secret (``divqat keys create``).
        label_only (bool, optional): refuse ``query`` even if the key receives posteriors.
            (Default: None, as the key's output level says: label-only for a ``labels`` key.)
        timeout (float): seconds per HTTP request. (Default: 120.)
        max_wait (float): most seconds spent in all waits a rate limit or a busy service (503
            ``busy``) asks for (``Retry-After``) before giving up with ``RemoteError``.
            (Default: 600.)
        insecure (bool): send the key over plain ``http://`` to a host that is not loopback;
            without it such a URL is a ``ConfigError`` before anything is sent. (Default: False.)
        transport (httpx transport, optional): for tests.

    ``query`` / ``query_labels`` as ``BlackBox``: float32 (N, C, H, W) in [0, 1] of
    ``input_shape``; ``BudgetExceeded`` when the service says the budget would be passed,
    ``QueryError`` for images it (or this client, before sending) refuses. A top-K key's answers
    come back as (N, K) rows holding its K probabilities, renormalized, zero elsewhere (what the
    top-k defense serves). ``queries_used`` is the service's count after the last answer.
    Queries over the service's per-request limit are sent in parts (each counted as it is
    answered; a budget check first refuses what the budget cannot take).
    """

    __slots__ = ("__client", "__url", "__info", "__state", "__label_only", "__max_wait")

    def __init__(self, url: str, api_key: str, *, label_only: bool | None = None,
                 timeout: float = 120.0, max_wait: float = 600.0, insecure: bool = False,
                 transport: Any = None) -> None:
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"the service URL must start with http:// or https://, got {url!r}")
        check_transport(url, insecure)
        if not isinstance(api_key, str) or not api_key.strip():
            raise ConfigError("the API key is empty")
        check_number("remote", "timeout", timeout, low=0, low_open=True)
        check_number("remote", "max_wait", max_wait, low=0)
        if label_only is not None and not isinstance(label_only, bool):
            raise ConfigError(f"label_only must be true, false or None, got {label_only!r}")
        url = url.rstrip("/")
        if transport is None:
            # httpx sends a request's head and body in two writes; without TCP_NODELAY the body
            # waits for the server's delayed ACK of the head (measured: 0.44x -> 0.7x of the
            # in-process throughput at batch 256 over loopback).
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        client = httpx.Client(base_url=url, timeout=timeout, transport=transport,
                              headers={"Authorization": f"Bearer {api_key.strip()}"})
        for slot, value in (("client", client), ("url", url), ("max_wait", float(max_wait)),
                            ("state", {"used": 0, "timings": []})):
            object.__setattr__(self, f"_RemoteBlackBox__{slot}", value)
        try:
            info = self.__json(self.__request("GET", "/v1/model"))
            shape, k = tuple(int(s) for s in info["input_shape"]), int(info["num_classes"])
            budget, used, output = info["key"]["budget"], int(info["key"]["used"]), str(info["output"])
        except (KeyError, TypeError, ValueError) as e:
            client.close()
            raise RemoteError(f"{url} is not a divqat prediction service (/v1/model: {e!r})") from None
        except BaseException:
            client.close()
            raise
        self.__state["used"] = used
        object.__setattr__(self, "_RemoteBlackBox__info", {
            "input_shape": shape, "num_classes": k, "budget": budget, "output": output,
            "classes": tuple(info.get("classes") or ()), "dataset": info.get("dataset"),
            "max_images": int(info.get("max_images") or 1024)})
        object.__setattr__(self, "_RemoteBlackBox__label_only",
                           output == "labels" if label_only is None else label_only or output == "labels")

    # ------------------------------------------------------------------ HTTP

    def __request(self, method: str, path: str, **kwargs: Any):
        import httpx

        try:
            response = self.__client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise RemoteError(f"the service at {self.__url} did not answer in time") from None
        except httpx.TransportError as e:
            raise RemoteError(f"cannot reach the service at {self.__url}: {e}") from None
        if response.status_code == 401:
            raise RemoteError(f"the service at {self.__url} refused the API key: {_message(response)}")
        if response.status_code == 404 and path == "/v1/model":
            raise RemoteError(f"{self.__url} is not a divqat prediction service (no /v1/model)")
        return response

    @staticmethod
    def __json(response) -> dict:
        if response.status_code != 200:
            raise RemoteError(f"the service answered {response.status_code}: {_message(response)}")
        try:
            return response.json()
        except ValueError:
            raise RemoteError("the service's answer is not JSON") from None

    def __post(self, images: Tensor, labels: bool) -> Tensor:
        """One request: the answers for ``images``, waiting out rate limits."""
        body = npy_bytes(images.numpy())
        waited = 0.0
        while True:
            start = time.perf_counter()
            response = self.__request("POST", "/v1/predict", content=body,
                                      headers={"Content-Type": NPY, "Accept": NPY})
            if response.status_code == 200:
                break
            code = _code(response)
            # Both say "not now": the key's rate limit, or the service at its cap of requests
            # served at once (nothing was charged for either).
            if code in ("rate_limited", "busy"):
                wait = float(response.headers.get("retry-after") or 1)
                if waited + wait > self.__max_wait:
                    what = "rate limited" if code == "rate_limited" else "the service was busy"
                    raise RemoteError(f"{what} for more than {self.__max_wait:g} s: {_message(response)}")
                time.sleep(wait)
                waited += wait
                continue
            self.__count(response)
            if code == "budget_exhausted":
                raise BudgetExceeded(_message(response))
            if 400 <= response.status_code < 500:
                raise QueryError(f"the service refused the query ({code}): {_message(response)}")
            raise RemoteError(f"the service failed ({response.status_code} {code}): {_message(response)}")
        seconds = time.perf_counter() - start
        self.__count(response)
        try:
            answer = read_npy(bytearray(response.content))  # writable: torch will own it
        except ValueError:
            raise RemoteError("the service's answer is not a .npy array") from None
        n, k = len(images), self.__info["num_classes"]
        output = self.__info["output"]
        if output == "labels":
            if answer.shape != (n,) or answer.dtype.kind not in "iu":
                raise RemoteError(f"expected {n} labels, got an array {answer.dtype} {answer.shape}")
            result = torch.from_numpy(answer.astype(np.int64))
        else:
            if answer.shape != (n, k) or answer.dtype != np.float32:
                raise RemoteError(f"expected posteriors float32 ({n}, {k}), got {answer.dtype} {answer.shape}")
            result = torch.from_numpy(answer)
            if output != "soft":  # top-K: the K probabilities, renormalized, as the top-k defense
                result = result / result.sum(dim=1, keepdim=True)
            if labels:
                result = result.argmax(dim=1)
        self.__state["timings"].append((n, seconds))
        return result

    def __count(self, response) -> None:
        used = response.headers.get("divqat-queries-used")
        if used is not None and used.isdigit():
            self.__state["used"] = int(used)

    # ------------------------------------------------------------------ the QueryBoundary

    def _check(self, images: Any) -> Tensor:
        shape = self.__info["input_shape"]
        if not isinstance(images, Tensor):
            raise QueryError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype != torch.float32:
            raise QueryError(f"images must be float32 in [0, 1], got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise QueryError(f"images must have shape (N, {', '.join(map(str, shape))}), got {tuple(images.shape)}")
        images = images.detach().cpu().contiguous()
        if images.numel():  # NaN fails both comparisons
            x = images.numpy()
            if not (x.min() >= 0 and x.max() <= 1):
                raise QueryError("images must be finite and in [0, 1]")
        return images

    def __answer(self, images: Any, labels: bool) -> Tensor:
        images = self._check(images)
        n = len(images)
        if n == 0:
            return (torch.empty(0, dtype=torch.long) if labels or self.__info["output"] == "labels"
                    else torch.empty(0, self.__info["num_classes"]))
        left = self.queries_left
        if left is not None and n > left:  # the service would refuse it too; nothing is sent
            raise BudgetExceeded(f"query of {n} images refused: it would exceed the query budget "
                                 f"({self.queries_used} of {self.budget} used, {left} left); nothing counted")
        step = self.__info["max_images"]
        parts = [self.__post(images[i:i + step], labels) for i in range(0, n, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def query(self, images: Tensor) -> Tensor:
        """Defended posteriors (N, K) float32 on the CPU for images (N, C, H, W)."""
        if self.__label_only:
            raise QueryError("this black box is label-only: use query_labels(images)")
        return self.__answer(images, labels=False)

    def query_labels(self, images: Tensor) -> Tensor:
        """Predicted labels (N,) int64: the argmax of the defended posteriors."""
        return self.__answer(images, labels=True)

    @property
    def queries_used(self) -> int:
        return self.__state["used"]

    @property
    def budget(self) -> int | None:
        return self.__info["budget"]

    @property
    def queries_left(self) -> int | None:
        budget = self.__info["budget"]
        return None if budget is None else max(0, budget - self.queries_used)

    @property
    def label_only(self) -> bool:
        return self.__label_only

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.__info["input_shape"]

    @property
    def num_classes(self) -> int:
        return self.__info["num_classes"]

    @property
    def timings(self) -> list[tuple[int, float]]:
        return list(self.__state["timings"])

    @property
    def classes(self) -> tuple[str, ...]:
        return self.__info["classes"]

    @property
    def dataset(self) -> str | None:
        """The task's dataset name as the service publishes it (None if it does not)."""
        return self.__info["dataset"]

    @property
    def output(self) -> str:
        """The key's output level: ``soft``, ``labels`` or ``top-K``."""
        return self.__info["output"]

    @property
    def url(self) -> str:
        return self.__url

    def close(self) -> None:
        self.__client.close()

    def __enter__(self) -> RemoteBlackBox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RemoteBlackBox attributes are read-only (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RemoteBlackBox attributes are read-only (tried to delete {name!r})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a RemoteBlackBox cannot be copied or pickled")

    def __repr__(self) -> str:
        return (f"RemoteBlackBox({self.__url}, input_shape={self.input_shape}, num_classes="
                f"{self.num_classes}, budget={self.budget}, queries_used={self.queries_used}, "
                f"label_only={self.label_only})")


def _body(response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {}
    except ValueError:
        return {}


def _code(response) -> str:
    return str(_body(response).get("error") or f"http_{response.status_code}")


def _message(response) -> str:
    return str(_body(response).get("message") or response.text[:200] or response.reason_phrase)
