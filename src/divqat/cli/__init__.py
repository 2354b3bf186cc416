"""The divqat command: parses, calls the library, prints. Errors a user can cause print one line.

One module per command group, each with ``register(sub)`` adding its commands; each command's
parser points (``func``) at the function that runs it. The options several commands share are
parent parsers in ``_common``.
"""

from __future__ import annotations

import argparse
import sys

from divqat.cli import attack, defend, detect, device, experiment, keys, serve, train, verify
from divqat.errors import DivqatError

DESCRIPTION = ("Protect quantized image classifiers against model stealing (DivQAT, output-perturbation "
               "defenses) and measure it with real extraction attacks.")

# In the order `divqat --help` lists their commands.
GROUPS = (train, defend, attack, experiment, serve, keys, device, detect, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="divqat", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def _version() -> str:
    from divqat import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DivqatError as e:
        print(f"divqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"divqat {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
