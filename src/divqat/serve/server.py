"""``divqat serve``: load a victim, put its defense in front, warm it up, and run the API under
uvicorn until SIGTERM or Ctrl-C (both finish the requests in flight first).

Clients send their API key with every request: on any address but loopback the service speaks
HTTPS (``tls_cert`` / ``tls_key``, handed to uvicorn), or refuses to start unless told
``insecure`` (behind a TLS-terminating proxy on the same machine, say).

Each connection must deliver a complete request head (request line and headers) within
``ServiceLimits.head_timeout`` seconds of opening, or of its previous answer, and in at most
``max_head_bytes`` bytes (``head_limited``): uvicorn alone waits for a head forever and reads
headers of any size, so a client sending a byte now and then (slowloris) or megabytes of headers
would hold a connection and its memory for as long as it likes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from divqat.blackbox import DefendedVictim
from divqat.errors import ConfigError
from divqat.pipelines.context import RunContext
from divqat.remote import is_loopback
from divqat.serve.app import ServiceLimits, create_app
from divqat.serve.store import KeyStore

LOOPBACK = "127.0.0.1"
METRICS_TOKEN_ENV = "DIVQAT_METRICS_TOKEN"


def _refusal(status: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def head_limited(timeout: float, max_bytes: int, protocol: type[asyncio.Protocol] | None = None,
                 on_refuse: Callable[[str], None] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (``protocol``, default the one uvicorn picks: httptools, else h11)
    with a deadline and a size cap on each request head.

    A connection has ``timeout`` seconds from its opening, and from each answer it was sent, to
    deliver a complete head; then it gets 408 ``head_timeout`` and is closed (without an answer
    when it sent nothing at all: an idle connection, closed as uvicorn's keep-alive timeout
    closes them). A head passing ``max_bytes`` (counted in the chunks read, of at most 256 KiB
    each) gets 431 ``head_too_large`` and the connection is closed. Bodies are the app's
    (``read_timeout``, ``max_body_bytes``). A head is complete when uvicorn starts its request
    (a new ``cycle``), in both of its HTTP implementations (httptools and h11, both checked).
    ``on_refuse`` is called with the code of each refusal answered (the service's metrics)."""
    if protocol is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        protocol = AutoHTTPProtocol

    class HeadLimited(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._arm()

        def _arm(self) -> None:
            self._waiting = self.cycle  # the head is in once uvicorn has made another cycle
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(timeout, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: str, code: str, message: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_refusal(status, code, message))
                self.transport.close()
                if on_refuse is not None:
                    on_refuse(code)

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is not self._waiting or self.transport.is_closing():
                return
            if self._head_bytes == 0:  # idle, as a keep-alive connection: closed without a word
                self.transport.close()
                return
            self._refuse("408 Request Timeout", "head_timeout",
                         f"the request head did not arrive within {timeout:g} s")

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None:
                super().data_received(data)
                return
            self._head_bytes += len(data)
            super().data_received(data)
            if self.cycle is not self._waiting:
                self._disarm()
            elif self._head_bytes > max_bytes:
                self._refuse("431 Request Header Fields Too Large", "head_too_large",
                             f"the request head passes {max_bytes} bytes")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._disarm()
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeadLimited.__name__ = HeadLimited.__qualname__ = f"HeadLimited{protocol.__name__}"
    return HeadLimited


def uvicorn_config(app, limits: ServiceLimits | None = None, **settings: Any):
    """The uvicorn ``Config`` serving ``app`` (``create_app``) with the head limits of
    ``limits`` (default: the app's own, ``app.state.limits``); ``settings`` go to uvicorn."""
    import uvicorn

    limits = limits or app.state.limits
    settings = {"log_level": "warning", "access_log": False, **settings}
    metrics = getattr(app.state, "metrics", None)
    # A head refused before any route ran still shows in /metrics, among the refusals.
    on_refuse = None if metrics is None else metrics.refused
    return uvicorn.Config(app, http=head_limited(limits.head_timeout, limits.max_head_bytes, on_refuse=on_refuse),
                          **settings)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 takes a free one (read it back with
    ``getsockname``). ``ConfigError`` for a host that does not resolve or a port in use."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0-65535, got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def warm_up(served: DefendedVictim, sizes: tuple[int, ...] = (1, 64, 256)) -> None:
    """One call at each compiled batch bucket (victim.BUCKETS: 16, 64, 256), so that no client
    waits for a compilation."""
    for n in sizes:
        served(torch.zeros(n, *served.input_shape))


def load_service(victim_dir: str | Path, defense: str = "none", params: dict[str, Any] | None = None,
                 *, seed: int = 0, data_root: str | Path | None = None, device: str = "cpu",
                 misinformation_epochs: int = 5, log: Callable[[str], None] | None = None
                 ) -> tuple[DefendedVictim, dict]:
    """The victim in ``victim_dir`` behind ``defense`` (built as ``divqat defend`` and ``divqat
    attack`` build it), warmed up; and the victim's metadata."""
    from divqat.pipelines.defense_models import build_defense
    from divqat.victim import load_victim, victim_metadata

    meta = victim_metadata(victim_dir)
    built = build_defense(defense, params, victim_dir, seed=seed, data_root=data_root, device=device,
                          misinformation_epochs=misinformation_epochs, progress=False, log=log)
    served = DefendedVictim(load_victim(victim_dir, device=device), built)
    warm_up(served)
    return served, meta


@dataclass(frozen=True)
class ServiceRequest:
    """What ``divqat serve`` is asked: a victim behind a defense, as an HTTP prediction API.

    Arguments:
        victim: the victim directory (``divqat train``).
        db: the API keys' database (``divqat keys``).
        defense, params: the defense in front of the victim and its parameters.
            (Default: none.)
        host, port: where to listen; port 0 takes a free one. (Default: 127.0.0.1:8000.)
        limits: images per request, body size, dynamic batching. (Default: None,
            ``ServiceLimits()``.)
        fsync: commit every key's counter to disk before answering. (Default: False.)
        seed, misinformation_epochs: for a defense that builds a model (``build_defense``).
            (Defaults: 0, 5.)
        detector, detector_params: an extraction detector watching each key's stream (built
            for the victim, with its calibration from ``divqat calibrate``). (Default: None.)
        on_alarm: what happens to a key it flags: flag, block or labels-only. (Default: flag.)
        save_every: seconds between saves of a key's detector state (``divqat.serve.watch``).
            (Default: 1.0.)
        tls_cert, tls_key: PEM certificate (chain) and private key: serve HTTPS. (Default: None.)
        insecure: listen on a non-loopback address without TLS (the keys cross the network in
            clear). (Default: False.)
        watermark: DAWN's rate of watermarked answers per key (``divqat.ownership``), its
            secrets and marks kept in ``db``. (Default: None, no watermark.)
        metrics_token: the operator's token for ``/metrics``; None: read from the environment
            variable DIVQAT_METRICS_TOKEN, and without it ``/metrics`` is not served.
    """

    victim: str | Path
    db: str | Path
    defense: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    host: str = LOOPBACK
    port: int = 8000
    limits: ServiceLimits | None = None
    fsync: bool = False
    seed: int = 0
    misinformation_epochs: int = 5
    detector: str | None = None
    detector_params: dict[str, Any] = field(default_factory=dict)
    on_alarm: str = "flag"
    save_every: float = 1.0
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    insecure: bool = False
    metrics_token: str | None = None
    watermark: float | None = None


def check_transport(request: ServiceRequest) -> dict[str, str]:
    """uvicorn's TLS settings for the request; ``ConfigError`` for half a TLS pair, a missing
    file, or a non-loopback address without TLS and without ``insecure``."""
    if (request.tls_cert is None) != (request.tls_key is None):
        raise ConfigError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
    if request.tls_cert is None:
        if not is_loopback(request.host) and not request.insecure:
            raise ConfigError(f"{request.host} is reachable from other machines, and without TLS the API "
                              "keys would cross the network in clear: give --tls-cert and --tls-key, or "
                              "--insecure (behind a TLS proxy on this machine)")
        return {}
    for name, path in (("certificate", request.tls_cert), ("private key", request.tls_key)):
        if not Path(path).is_file():
            raise ConfigError(f"no TLS {name} at {path}")
    return {"ssl_certfile": str(request.tls_cert), "ssl_keyfile": str(request.tls_key)}


def run_service(request: ServiceRequest, context: RunContext | None = None) -> None:
    """Serve the defended victim on http://host:port until SIGTERM / Ctrl-C. Prints one line with
    the URL once it listens (``port=0``: a free port, shown there). ``context``: where the data
    are, the device, and the log (default: lines on stderr)."""
    import uvicorn

    context = context or RunContext()
    victim_dir, db, defense, detector = request.victim, request.db, request.defense, request.detector
    say = context.log or (lambda message: print(message, file=sys.stderr, flush=True))
    tls = check_transport(request)
    metrics_token = request.metrics_token or os.environ.get(METRICS_TOKEN_ENV) or None
    sock = bind(request.host, request.port)  # first: a port in use is found before minutes of loading
    try:
        store = KeyStore(db, fsync=request.fsync)  # and a file that is no key database
        if not any(key.revoked is None for key in store.keys()):
            say(f"divqat serve: {db} holds no usable API key yet; every request gets 401 until one is "
                f"created: divqat keys create NAME --budget N --db {db}")
        store.close()
        watch = None
        if detector is not None:
            from divqat.pipelines.detect import detector_factory
            from divqat.serve.watch import KeyWatch

            make, settings = detector_factory(detector, request.detector_params, victim_dir, service=True,
                                              log=say)
            watch = KeyWatch(make, settings, on_alarm=request.on_alarm, save_every=request.save_every)
            shown = ", ".join(f"{k}={v}" for k, v in settings["params"].items())
            say(f"divqat serve: every key watched by {detector} ({shown}; "
                f"{'calibrated' if settings['calibrated'] else 'not calibrated'}), "
                f"on alarm: {request.on_alarm}")
        marks = None
        if request.watermark is not None:
            from divqat.ownership import KeyedWatermarks
            from divqat.victim import victim_metadata

            meta = victim_metadata(victim_dir)  # the rate checked before minutes of loading
            marks = KeyedWatermarks(db, request.watermark, len(meta["classes"]), meta["input_shape"])
            say(f"divqat serve: each key's answers watermarked at rate {request.watermark:g}, "
                f"its marks kept in {db}")
        served, meta = load_service(victim_dir, defense, request.params, seed=request.seed,
                                    data_root=context.data_root, device=context.device,
                                    misinformation_epochs=request.misinformation_epochs, log=say)
        app = create_app(served, db, classes=meta["classes"], dataset=meta.get("dataset"),
                         limits=request.limits, fsync=request.fsync, watch=watch,
                         metrics_token=metrics_token, watermark=marks)
        config = uvicorn_config(app, lifespan="on", timeout_graceful_shutdown=60, server_header=False, **tls)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if not is_loopback(bound_host):
            say(f"divqat serve: listening on {bound_host}, reachable from other machines")
        say(f"divqat serve: {meta.get('mode')} {meta.get('arch')} victim {victim_dir} behind {defense}"
            f"{' (fused)' if served.fused else ''}, keys in {db}")
        print(f"listening on {'https' if tls else 'http'}://{shown}:{bound_port}", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
