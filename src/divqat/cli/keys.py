"""The API keys of `divqat serve` (`divqat keys`) and its audit log (`divqat audit`)."""

from __future__ import annotations

import argparse
import os
import sys

from divqat.cli import _common as common
from divqat.cli.serve import add_db as _add_db

KEYS_HELP = """\
Manage the API keys of `divqat serve` in its key database (SQLite). The secret is shown once and
stored only as a hash: `--out NAME.key` writes it to a file readable by its owner only (0600);
without --out it goes to stdout (`> NAME.key` makes a file as the umask says).

  create NAME --budget N [--rate R --window S] [--output soft|labels|top-K] [--out FILE]
                   the name of a revoked key may be given again: the revoked one is then
                   listed as NAME.revoked-ID, with its history
  rotate NAME [--out FILE]
                   a new secret; the old one is refused (401) from its next request on;
                   budget, usage, rate, audit, detector state and flag stay the key's
  list             every key, its output level, budget and rate
  usage [NAME]     images counted against each budget, what is left, and the keys an
                   extraction detector flagged (`divqat serve --detector`)
  revoke NAME      the key is refused (401) from its next request on, for good
  unflag NAME      clear a key's detector flag and forget its detector state
"""


def register(sub) -> None:
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
    kr = ks.add_parser("rotate", help="a new secret for a key, keeping its budget, usage and history")
    kr.add_argument("name", metavar="NAME")
    for kp in (kc, kr):
        kp.add_argument("--out", metavar="FILE", help="write the secret to FILE, readable by its owner "
                        "only (0600; replaced if it exists) (default: stdout)")
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


def _give_secret(action: str, make, out: str | None, db: str, note: str = "") -> None:
    """Make the key (``make() -> (KeyInfo, secret)``) and show its secret once: in ``out``, a
    file readable by its owner only (0600: written beside it, then renamed over it, so a key
    that cannot be made leaves the file as it was), or on stdout; the line about it on stderr."""
    import tempfile

    from divqat.errors import ConfigError

    tmp = None
    if out is not None:  # before the key is made: a path that cannot be written costs no key
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".divqat-key-")
        except OSError as e:
            raise ConfigError(f"cannot write the key to {out}: {e.strerror}") from None
        os.close(fd)  # mkstemp made it 0600
    try:
        key, secret = make()
        if tmp is not None:
            with open(tmp, "w") as f:
                f.write(f"{secret}\n")
            os.replace(tmp, out)
            tmp = None
    finally:
        if tmp is not None:
            os.unlink(tmp)
    rate = f", {key.rate} images per {key.window:g} s" if key.rate else ""
    used = f", {key.used} used" if action == "rotated" else ""
    where = f"its secret is in {out} (0600)" if out else "its secret follows on stdout"
    print(f"{action} key {key.name!r} ({key.output}, budget {key.budget}{rate}{used}) in {db}{note}; {where}, "
          "shown only this once", file=sys.stderr)
    if out is None:
        print(secret)


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
    from divqat.serve.store import KeyStore, retired_name

    store = KeyStore(args.db, create=args.action == "create")
    try:
        if args.action == "create":
            revoked = [k for k in store.keys() if k.name == args.name and k.revoked is not None]
            note = (f" (the revoked key of that name is now {retired_name(args.name, revoked[0].id)})"
                    if revoked else "")
            _give_secret("created", lambda: store.create_key(args.name, args.budget, rate=args.rate,
                                                             window=args.window, output=args.output),
                         args.out, args.db, note)
        elif args.action == "rotate":
            _give_secret("rotated", lambda: store.rotate_key(args.name), args.out, args.db)
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
