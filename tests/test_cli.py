"""The command line as a package: every command is there, each flag name means one thing across
commands, every help exits 0, and each module stays small enough to read in one sitting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import divqat.cli
from divqat.cli import build_parser, main

COMMANDS = ["train", "import", "defend", "defenses", "attack", "attacks", "run", "report", "serve", "keys",
            "audit", "export", "detectors", "calibrate", "detect", "verify"]
KEY_ACTIONS = ["create", "rotate", "list", "usage", "revoke", "unflag"]


def _choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command parser by its words ("train", "keys create")."""
    out = {}
    for name, parser in _choices(build_parser()).items():
        out[name] = parser
        if name == "keys":
            out.update({f"keys {action}": p for action, p in _choices(parser).items()})
    return out


def _options() -> dict[str, list[tuple[str, argparse.Action]]]:
    """Each flag with the (command, action) pairs that take it."""
    out: dict[str, list[tuple[str, argparse.Action]]] = {}
    for command, parser in _commands().items():
        for action in parser._actions:
            for flag in action.option_strings:
                out.setdefault(flag, []).append((command, action))
    return out


def test_every_command_is_registered_in_the_help_order():
    assert list(_choices(build_parser())) == COMMANDS
    assert list(_choices(_commands()["keys"])) == KEY_ACTIONS


def test_each_flag_name_has_one_destination_across_commands():
    for flag, uses in _options().items():
        assert len({action.dest for _, action in uses}) == 1, (flag, [(c, a.dest) for c, a in uses])


def test_param_is_the_defense_parameter_and_detector_param_the_detector_one():
    options = _options()
    params = options["--param"]
    assert {c for c, _ in params} == {"defend", "attack", "serve", "export", "detect"}
    assert all("defense parameter" in a.help for _, a in params)
    detector = options["--detector-param"]
    assert {c for c, _ in detector} == {"serve", "calibrate", "detect"}
    assert all("detector" in a.help and "defense" not in a.help for _, a in detector)


def test_calibrate_takes_the_detector_parameters_as_detector_param():
    args = build_parser().parse_args(["calibrate", "--victim", "v", "--detector", "mmd",
                                      "--detector-param", "window=32"])
    assert args.detector_param == ["window=32"] and not hasattr(args, "param")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["calibrate", "--victim", "v", "--detector", "mmd",
                                   "--param", "window=32"])
    assert e.value.code == 2


def test_calibrate_refuses_two_detectors_in_one_line_instead_of_keeping_the_last(capsys):
    assert main(["calibrate", "--victim", "v", "--detector", "prada", "--detector", "mmd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibrate one detector per run" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("words", [[], *([c] for c in COMMANDS), *(["keys", a] for a in KEY_ACTIONS)],
                         ids=lambda words: " ".join(words) or "divqat")
def test_help_exits_0(words, capsys):
    with pytest.raises(SystemExit) as e:
        main([*words, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(['divqat', *words])}")


def test_every_cli_module_is_under_300_lines():
    folder = Path(divqat.cli.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert len(sizes) >= 8
    assert all(n < 300 for n in sizes.values()), sizes
