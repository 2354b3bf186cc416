"""`divqat verify`: is a suspect model a copy of ours, and through which API key?"""

from __future__ import annotations

import argparse
import json

from divqat.cli import _common as common

VERIFY_HELP = """\
Test a suspect model against the evidence that it was taken from the victim: the watermark
marks of the victim's answers (--marks) and the fingerprints of its program file
(--fingerprint), either or both.

Marks (DAWN, Szyller et al., ACM MM 2021): for every API key, the suspect is asked the labels of
the inputs that key was answered with a wrong label (the marks) and of as many inputs it was
answered truly (the controls). A surrogate trained on the key's answers repeats the marks; an
independent model agrees with a mark label no more often than with the label the mark would have
given a control (its chance agreement, measured on the suspect itself). Per key: the mark
agreement, the chance, the one-sided binomial p-value, and the verdict at --significance; the
verified key with the smallest p-value is named.

Fingerprints (IPGuard, Cao et al., AsiaCCS 2021; `divqat export` writes NAME.fingerprint.safetensors
beside each program): the suspect is asked the labels of the fingerprint's points near the
victim's boundaries. A copy of the file (fine-tuned, pruned, requantized) keeps most of them; an
independent model agrees about as often as with the images they came from (its chance). A
suspect that is a file is also compared by its sha256 with the program the fingerprint recorded
("identical file"). Every image asked is counted and stated.

--suspect: a divqat victim folder, a device program (.pte), a model file of `divqat attack
--save-surrogate`, a torch.export .pt2 or TorchScript file, or the URL of a `divqat serve` API
(with --api-key-file). --marks: OUT/marks.npz of `divqat attack --watermark`, the key database
(or its folder) of `divqat serve --watermark` (every key it marked), or a folder of .npz files.
--fingerprint: a fingerprint file or a folder of them (repeatable).

example:
  divqat attack --victim runs/qat --attack knockoff --transfer holdout --budget 5000 \\
      --watermark 0.005 --save-surrogate runs/stolen.pt --out runs/steal
  divqat verify --suspect runs/stolen.pt --marks runs/steal/marks.npz
  divqat verify --suspect http://127.0.0.1:9000 --api-key-file theirs.key --marks state/
  divqat verify --suspect found-in-app.pte --fingerprint qat.fingerprint.safetensors
"""


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected CxHxW, e.g. 3x32x32, got {text!r}")
    return shape


def register(sub) -> None:
    v = common.described(sub, "verify", "test a suspect model for the victim's watermark marks or "
                         "program fingerprints", VERIFY_HELP, parents=[common.threads_option()])
    v.add_argument("--suspect", required=True, metavar="PATH|URL",
                   help="the suspect: victim folder, .pte, saved surrogate, .pt2 / TorchScript file, or URL")
    v.add_argument("--marks", default=None, metavar="FILE|DIR",
                   help="the watermark marks: marks.npz, a key database of `divqat serve --watermark`, "
                        "or a folder holding them (this or --fingerprint is required)")
    v.add_argument("--fingerprint", action="append", default=[], metavar="FILE|DIR",
                   help="a program's fingerprint of `divqat export` (NAME.fingerprint.safetensors), or a "
                        "folder of them; repeatable")
    v.add_argument("--significance", type=float, default=1e-6, metavar="ALPHA",
                   help="a key is verified when its p-value is below this (default: 1e-6)")
    v.add_argument("--max-queries", type=common.positive_int, default=None, metavar="N",
                   help="most images asked of the suspect: each fingerprint whole, the rest shared "
                        "by the keys' marks and controls (default: all of them)")
    v.add_argument("--api-key-file", metavar="FILE", help="with a suspect URL: an API key of that service")
    v.add_argument("--input-shape", type=_shape, default=None, metavar="CxHxW",
                   help="a TorchScript suspect's input (default: the evidence's)")
    v.add_argument("--device", default="cpu", help="torch device of a local suspect (default: cpu)")
    v.add_argument("--json", action="store_true", help="print the whole record as JSON")
    v.set_defaults(func=cmd_verify)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_verify(args: argparse.Namespace) -> int:
    from divqat.pipelines.context import RunContext
    from divqat.pipelines.verify import VerifyRequest, verify_suspect
    from divqat.remote import read_key_file

    common.set_threads(args.threads)
    api_key = read_key_file(args.api_key_file) if args.api_key_file else None
    record = verify_suspect(VerifyRequest(args.suspect, args.marks, tuple(args.fingerprint),
                                          significance=args.significance, max_queries=args.max_queries,
                                          api_key=api_key, input_shape=args.input_shape),
                            RunContext(device=args.device))
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"suspect: {record['suspect_kind']}; {record['queries']} images asked "
          f"({record['query_seconds']:.1f} s)")
    if record["marks_from"] is not None:
        _print_marks(record)
    if record["fingerprints"]:
        _print_fingerprints(record)
    return 0


def _print_marks(record: dict) -> None:
    from divqat.pipelines.verify import p_text

    lines = [["key", "marks", "agreed", "agreement", "controls", "chance", "p-value", "verdict"]]
    for r in record["rows"]:
        lines.append([r["key"], str(r["marks"]), str(r["agreed"]), f"{r['agreement']:.2%}",
                      str(r["controls"]), f"{r['chance']:.2%}", p_text(r["p_value"]),
                      "VERIFIED" if r["verified"] else "not verified"])
    print(_table(lines))
    alpha = f"{record['significance']:g}"
    if record["verified_key"] is None:
        print(f"not verified: no key's marks are repeated beyond chance at significance {alpha}")
    else:
        best = next(r for r in record["rows"] if r["key"] == record["verified_key"])
        print(f"verified: the suspect repeats the marks of key {best['key']!r} ({best['agreed']} of "
              f"{best['marks']}, chance {best['chance']:.2%}, p = {p_text(best['p_value'])} < {alpha})")


def _print_fingerprints(record: dict) -> None:
    from divqat.pipelines.verify import p_text

    lines = [["fingerprint", "points", "agreed", "agreement", "chance", "p-value", "file", "verdict"]]
    for r in record["fingerprints"]:
        file = {None: "-", True: "identical", False: "differs"}[r["identical_file"]]
        lines.append([r["fingerprint"], str(r["points"]), str(r["agreed"]), f"{r['agreement']:.2%}",
                      f"{r['chance']:.2%}", p_text(r["p_value"]), file,
                      "VERIFIED" if r["verified"] else "not verified"])
    print(_table(lines))
    alpha = f"{record['significance']:g}"
    if record["verified_fingerprint"] is None:
        print(f"not verified: no fingerprint's labels are repeated beyond chance at significance {alpha}")
        return
    best = next(r for r in record["fingerprints"] if r["fingerprint"] == record["verified_fingerprint"])
    how = ("the identical file (sha256)" if best["identical_file"] else
           f"{best['agreed']} of {best['points']} points, chance {best['chance']:.2%}, "
           f"p = {p_text(best['p_value'])} < {alpha}")
    print(f"verified: the suspect carries the fingerprint {best['fingerprint']} ({how})")
