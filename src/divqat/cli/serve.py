"""The prediction service: `divqat serve` (a defended victim behind an HTTP API), `divqat keys`
(its API keys) and `divqat audit` (what each key asked)."""

from __future__ import annotations

import argparse
import sys

from divqat.cli import _common as common

SERVE_HELP = """\
Serve a victim behind its defense as an HTTP prediction API (FastAPI + uvicorn): POST
/v1/predict (a .npy batch or PNG/JPEG files -> defended posteriors, labels or top-k, as the API
key allows; JSON or .npy), GET /v1/model, GET /healthz, GET /metrics (Prometheus; only with the
operator's token: `Authorization: Bearer $DIVQAT_METRICS_TOKEN`, set in the service's
environment, else not served). Every request
needs an API key (`divqat keys create`); every image counts against the key's budget, committed
to --db before the answer leaves; rate limits answer 429 with Retry-After and RateLimit fields;
every request is in the audit log (`divqat audit`). Concurrent requests are batched into one
victim call (--max-delay-ms). Listens on 127.0.0.1 unless --host names another address, which
needs --tls-cert/--tls-key (HTTPS) or --insecure.
SIGTERM or Ctrl-C finishes the requests in flight, then stops.

example:
  divqat keys create thief --budget 5000 --db keys.db > thief.key
  divqat serve --victim runs/qat --defense dcp --param beta=0.5 --db keys.db --port 8000
  curl -s -H "Authorization: Bearer $(cat thief.key)" -H "Content-Type: application/x-npy" \\
      --data-binary @batch.npy http://127.0.0.1:8000/v1/predict
"""

KEYS_HELP = """\
Manage the API keys of `divqat serve` in its key database (SQLite). The secret is printed once,
on stdout, and stored only as a hash: `divqat keys create NAME ... > NAME.key`.

  create NAME --budget N [--rate R --window S] [--output soft|labels|top-K]
  list             every key, its output level, budget and rate
  usage [NAME]     images counted against each budget, what is left, and the keys an
                   extraction detector flagged (`divqat serve --detector`)
  revoke NAME      the key is refused (401) from its next request on
  unflag NAME      clear a key's detector flag and forget its detector state
"""


def register(sub) -> None:
    s = common.described(sub, "serve", "serve a (defended) victim as an HTTP prediction API", SERVE_HELP,
                  parents=[common.runtime_options(progress=False), common.defended_victim(required=False),
                           common.seed_option("seed of a defense's model (default: 0)")])
    _add_db(s, "the key database (keys, usage, audit)")
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
    s.add_argument("--fsync", action="store_true",
                   help="sync every count to disk (survives a power cut, not only a crash; slower)")
    common.add_misinformation_epochs(s)
    s.add_argument("--detector", metavar="NAME",
                   help="an extraction detector watching each key's queries (see `divqat detectors`; "
                        "calibrated with `divqat calibrate`); its alarms and scores go to the audit")
    common.add_detector_param(s, "a detector parameter, repeatable (default: its calibration's)")
    s.add_argument("--on-alarm", default="flag", choices=("flag", "block", "labels-only"),
                   help="what happens to a key the detector flags: flag (record only), block (403 "
                        "from its next request on), labels-only (answer labels only) (default: flag)")
    s.add_argument("--detector-save-every", type=float, default=1.0, metavar="S",
                   help="seconds between saves of a key's detector state to --db (always at its "
                        "first alarm and on shutdown; 0: after every request) (default: 1)")
    s.add_argument("--watermark", type=float, default=None, metavar="RATE",
                   help="watermark this fraction of each key's answers (DAWN, e.g. 0.005): a wrong "
                        "label chosen by a keyed hash of the image, after the defense; each key's "
                        "secret and marks kept in --db for `divqat verify --marks` (default: none)")
    s.set_defaults(func=cmd_serve)

    k = common.described(sub, "keys", "create, list, revoke the API keys of `divqat serve`", KEYS_HELP)
    ks = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="a new key; prints its secret once")
    kc.add_argument("name", metavar="NAME")
    kc.add_argument("--budget", type=int, required=True, metavar="N", help="images the key may send, in all")
    kc.add_argument("--rate", type=common.positive_int, default=None, metavar="R",
                    help="images per --window seconds (default: no rate limit)")
    kc.add_argument("--window", type=common.positive_int, default=60, metavar="S",
                    help="the rate limit's window in seconds (default: 60)")
    kc.add_argument("--output", default="soft", metavar="soft|labels|top-K",
                    help="what the key receives: defended posteriors, labels only, or the top K "
                         "(default: soft)")
    for name, help_text in (("list", "every key"), ("usage", "images counted per key, and flags"),
                            ("revoke", "refuse a key from now on"),
                            ("unflag", "clear a key's detector flag and its detector state")):
        kp = ks.add_parser(name, help=help_text)
        if name == "usage":
            kp.add_argument("name", nargs="?", metavar="NAME")
        elif name in ("revoke", "unflag"):
            kp.add_argument("name", metavar="NAME")
    for kp in ks.choices.values():
        _add_db(kp)
    k.set_defaults(func=cmd_keys)

    au = sub.add_parser("audit", help="per-key usage from the audit log of `divqat serve`")
    _add_db(au)
    au.add_argument("--key", metavar="NAME", help="one key only, with its latest requests")
    au.add_argument("--requests", type=int, default=10, metavar="N",
                    help="with --key: how many of its latest requests to list (default: 10)")
    au.set_defaults(func=cmd_audit)


def _add_db(parser: argparse.ArgumentParser, help: str = "the key database") -> None:
    parser.add_argument("--db", required=True, metavar="FILE", help=help)


def cmd_serve(args: argparse.Namespace) -> int:
    from divqat.pipelines.context import RunContext
    from divqat.registry import parse_params
    from divqat.serve.app import ServiceLimits
    from divqat.serve.server import ServiceRequest, run_service

    common.set_threads(args.threads)
    limits = ServiceLimits(max_images=args.max_images, max_body_bytes=args.max_body_mb * 2**20,
                           max_batch=args.max_batch, max_delay=args.max_delay_ms / 1e3)
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


def _when(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _flag_text(flag: dict | None) -> str:
    if flag is None:
        return "-"
    score = "" if flag["score"] is None else f", score {flag['score']:.4g}"
    return f"{_when(flag['flagged'])} by {flag['detector']} after {flag['queries']} queries{score}"


def cmd_keys(args: argparse.Namespace) -> int:
    from divqat.serve.store import KeyStore

    store = KeyStore(args.db, create=args.action == "create")
    try:
        if args.action == "create":
            key, secret = store.create_key(args.name, args.budget, rate=args.rate, window=args.window,
                                           output=args.output)
            rate = f", {key.rate} images per {key.window:g} s" if key.rate else ""
            print(f"created key {key.name!r} ({key.output}, budget {key.budget}{rate}) in {args.db}; "
                  "its secret follows on stdout, shown only this once", file=sys.stderr)
            print(secret)
        elif args.action == "list":
            rows = [["name", "key id", "output", "budget", "rate", "created", "revoked"]]
            rows += [[k.name, k.key_id, k.output, str(k.budget),
                      f"{k.rate}/{k.window:g}s" if k.rate else "-", _when(k.created), _when(k.revoked)]
                     for k in store.keys()]
            print(_table(rows) if len(rows) > 1 else f"no keys in {args.db}")
        elif args.action == "usage":
            keys = [store.key(args.name)] if args.name else store.keys()
            flags = store.flags()
            rows = [["name", "used", "budget", "left", "revoked", "flagged"]]
            rows += [[k.name, str(k.used), str(k.budget), str(k.left), _when(k.revoked),
                      _flag_text(flags.get(k.name))] for k in keys]
            print(_table(rows) if len(rows) > 1 else f"no keys in {args.db}")
        elif args.action == "unflag":
            key = store.unflag(args.name)
            print(f"key {key.name!r} unflagged; its detector state is forgotten")
        else:
            key = store.revoke(args.name)
            print(f"revoked key {key.name!r} ({key.used} of {key.budget} images used)")
    finally:
        store.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from divqat.serve.store import KeyStore

    store = KeyStore(args.db, create=False)
    try:
        usage = store.usage(args.key)
        rows = [["key", "output", "budget", "counted", "requests", "answered", "images answered",
                 "in flight", "refused", "last request"]]
        rows += [[u["name"], u["output"], str(u["budget"]), str(u["used"]), str(u["requests"]),
                  str(u["answered_requests"]), str(u["images_answered"]), str(u["in_flight"]),
                  str(u["refused_requests"]), _when(u["last"])] for u in usage]
        print(_table(rows))
        mismatch = [u["name"] for u in usage if u["images_counted"] != u["used"]]
        if mismatch:  # the counter and the audit are written in one transaction: never expected
            print(f"warning: the audit's counted images differ from the counter for {', '.join(mismatch)}")
        if args.key:
            print()
            lines = [["time", "images", "counted", "outcome", "status", "ms", "batch sha256",
                      "detector score", "alarm"]]
            lines += [[_when(r["time"]), str(r["images"]), str(r["counted"]), r["outcome"],
                       str(r["status"] or "-"), "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}",
                       (r["batch_sha256"] or "-")[:16],
                       "-" if r["detector_score"] is None else f"{r['detector_score']:.4g}",
                       {None: "-", 0: "no", 1: "ALARM"}[r["alarm"]]]
                      for r in store.audit(args.key, limit=max(0, args.requests))]
            print(_table(lines))
    finally:
        store.close()
    return 0

