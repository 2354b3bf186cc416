"""The prediction service: `divqat serve` (a defended victim behind an HTTP API); its API keys
and audit log are `divqat keys` and `divqat audit` (``divqat.cli.keys``)."""

from __future__ import annotations

import argparse

from divqat.cli import _common as common

SERVE_HELP = """\
Serve a victim behind its defense as an HTTP prediction API (FastAPI + uvicorn): POST
/v1/predict (a .npy batch or PNG/JPEG files -> defended posteriors, labels or top-k, as the API
key allows; JSON or .npy), GET /v1/model, GET /healthz, GET /metrics (Prometheus; only with the
operator's token: `Authorization: Bearer $DIVQAT_METRICS_TOKEN`, set in the service's
environment, else not served). Every request needs an API key (`divqat keys create`); every
image counts against the key's budget, committed to --db before the answer leaves; rate limits
answer 429 with Retry-After and RateLimit fields; every request of a known key is in the audit
log (`divqat audit`), but those refused unread after too many refusals. Concurrent requests are
batched into one victim call (--max-delay-ms). Listens on 127.0.0.1 unless --host names another
address, which needs --tls-cert/--tls-key (HTTPS) or --insecure.
SIGTERM or Ctrl-C finishes the requests in flight, then stops.

Against hostile clients: a request head must arrive within --head-timeout, a body within
--read-timeout; at most --max-concurrent requests at once (503), --max-per-key per key (429);
--max-pixels per request (413); --max-refusals per key and client address a minute (429); a key
with no budget or rate left is refused before its body is read.

example:
  divqat keys create thief --budget 5000 --db keys.db --out thief.key
  divqat serve --victim runs/qat --defense dcp --param beta=0.5 --db keys.db --port 8000
  curl -s -H "Authorization: Bearer $(cat thief.key)" -H "Content-Type: application/x-npy" \\
      --data-binary @batch.npy http://127.0.0.1:8000/v1/predict
"""

# The hostile-client limits: (flag, ServiceLimits field, type, scale, metavar, help). Each help's
# default is ServiceLimits' (tests/test_cli.py checks); an absent flag leaves the field's default.
LIMIT_FLAGS = (
    ("--max-pixels", "max_pixels", common.positive_int, 1, "N",
     "height x width summed over a request's images, read from their headers before decoding; "
     "more: 413 (default: 16777216, one 4096x4096 image)"),
    ("--max-side", "max_side", common.positive_int, 1, "PX", "largest height or width of an image "
     "(default: 4096)"),
    ("--read-timeout", "read_timeout", float, 1, "S", "seconds for a request's body to arrive, else 408 "
     "(default: 30)"),
    ("--head-timeout", "head_timeout", float, 1, "S", "seconds for a request head to arrive, from the "
     "connection's opening or its previous answer, else 408 and the connection closed (default: 10)"),
    ("--max-head-kb", "max_head_bytes", common.positive_int, 1024, "KB", "size of a request head, else "
     "431 and the connection closed (default: 64)"),
    ("--max-concurrent", "max_concurrent", common.positive_int, 1, "N", "prediction requests served at "
     "once, more get 503 busy; with --max-body-mb it bounds the memory held in bodies (default: 256)"),
    ("--max-per-key", "max_per_key", common.positive_int, 1, "N", "requests of one key at once, more get "
     "429 too_many_in_flight (default: 64)"),
    ("--max-refusals", "max_refusals", common.positive_int, 1, "N", "refusals per key and per client "
     "address in a minute; past it their requests get 429 too_many_refusals, unread (default: 120)"),
    ("--decode-threads", "decode_threads", common.positive_int, 1, "N", "threads decoding request "
     "bodies off the event loop (default: 2)"),
)


def register(sub) -> None:
    s = common.described(sub, "serve", "serve a (defended) victim as an HTTP prediction API", SERVE_HELP,
                  parents=[common.runtime_options(progress=False), common.defended_victim(required=False),
                           common.seed_option("seed of a defense's model (default: 0)")])
    add_db(s, "the key database (keys, usage, audit)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; another only when named here)")
    s.add_argument("--port", type=int, default=8000, help="TCP port; 0 takes a free one (default: 8000)")
    s.add_argument("--tls-cert", metavar="PEM", help="certificate (chain) to serve HTTPS with (with --tls-key)")
    s.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    s.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP on a non-loopback --host (behind a TLS proxy on this "
                        "machine); without TLS or this, such a host is refused")
    s.add_argument("--max-images", type=common.positive_int, default=1024, metavar="N",
                   help="images per request (default: 1024)")
    s.add_argument("--max-body-mb", type=common.positive_int, default=64, metavar="MB",
                   help="request body size (default: 64)")
    s.add_argument("--max-batch", type=common.positive_int, default=256, metavar="N",
                   help="most images per batched victim call (default: 256)")
    s.add_argument("--max-delay-ms", type=float, default=2.0, metavar="MS",
                   help="how long a request may wait for others to share its victim call (default: 2)")
    for flag, field, kind, _, metavar, help_text in LIMIT_FLAGS:
        s.add_argument(flag, dest=f"limit_{field}", type=kind, metavar=metavar, help=help_text)
    s.add_argument("--fsync", action="store_true",
                   help="sync every count to disk (survives a power cut, not only a crash; slower)")
    common.add_misinformation_epochs(s)
    s.add_argument("--detector", metavar="NAME",
                   help="an extraction detector watching each key's queries (see `divqat detectors`; "
                        "calibrated with `divqat calibrate`); its alarms and scores go to the audit")
    common.add_detector_param(s, "a detector parameter, repeatable (default: its calibration's; prada's "
                                 "max_set 512, bounding each key's state; max_set=none: unbounded)")
    s.add_argument("--on-alarm", default="flag", choices=("flag", "block", "labels-only"),
                   help="what happens to a key the detector flags: flag (record only), block (403, "
                        "images refunded), labels-only (answer labels only); from the request that "
                        "raised the alarm on, those already in flight included (default: flag)")
    s.add_argument("--detector-save-every", type=float, default=1.0, metavar="S",
                   help="seconds between saves of a key's detector state to --db, off the answers' "
                        "path and paced to at most ~5%% of the time (also at its first alarm and on "
                        "shutdown; 0: after every request) (default: 1)")
    s.add_argument("--watermark", type=float, default=None, metavar="RATE",
                   help="watermark this fraction of each key's answers (DAWN, e.g. 0.005): a wrong "
                        "label chosen by a keyed hash of the image, after the defense; each key's "
                        "secret and marks kept in --db for `divqat verify --marks` (default: none)")
    s.set_defaults(func=cmd_serve)


def add_db(parser: argparse.ArgumentParser, help: str = "the key database") -> None:
    parser.add_argument("--db", required=True, metavar="FILE", help=help)


def cmd_serve(args: argparse.Namespace) -> int:
    from divqat.pipelines.context import RunContext
    from divqat.registry import parse_params
    from divqat.serve.app import ServiceLimits
    from divqat.serve.server import ServiceRequest, run_service

    common.set_threads(args.threads)
    limits = ServiceLimits(max_images=args.max_images, max_body_bytes=args.max_body_mb * 2**20,
                           max_batch=args.max_batch, max_delay=args.max_delay_ms / 1e3,
                           **limits_given(args))
    run_service(ServiceRequest(args.victim, args.db, args.defense, parse_params(args.param),
                               host=args.host, port=args.port, limits=limits, fsync=args.fsync,
                               seed=args.seed, misinformation_epochs=args.misinformation_epochs,
                               detector=args.detector,
                               detector_params=parse_params(args.detector_param),
                               on_alarm=args.on_alarm, save_every=args.detector_save_every,
                               tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure,
                               watermark=args.watermark),
                RunContext(data_root=args.data_root, device=args.device))
    return 0


def limits_given(args: argparse.Namespace) -> dict:
    """The ServiceLimits fields of the LIMIT_FLAGS given on the command line."""
    return {field: getattr(args, f"limit_{field}") * scale for _, field, _, scale, _, _ in LIMIT_FLAGS
            if getattr(args, f"limit_{field}") is not None}
