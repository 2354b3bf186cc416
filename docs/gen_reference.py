"""MkDocs hook: the reference pages generated from the code, so they cannot drift from it.

- ``reference/commands.md``: every command of ``divqat``, read from ``divqat.cli.build_parser()``
  by walking its subparsers (usage, description, each option with its value, default and help).
- ``reference/config.md``: every key of an experiment config, read from
  ``divqat.experiment.config.SCHEMA`` (the keys the validator accepts, with their meaning) and
  the defaults ``parse_config`` fills in.
- ``reference/registries.md``: the registered defenses, attacks, detectors, datasets and
  architectures, with their parameters and defaults.

Only ``build_parser()`` and argparse's own structures are relied on, so the page follows the CLI
however it is split into modules. ``tests/test_docs.py`` calls these functions too.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from typing import Any

import yaml

# ---------------------------------------------------------------- markdown helpers

_CODE = re.compile(r"(`[^`]*`)")


def cell(text: Any) -> str:
    """Text for a markdown table cell: pipes and angle brackets escaped outside code spans."""
    parts = _CODE.split(" ".join(str(text).split()))
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("|", "\\|").replace("*", "\\*"))
    return "".join(parts)


def code(value: Any) -> str:
    return "`" + str(value).replace("`", "'") + "`"


# ---------------------------------------------------------------- commands

def walk_commands(parser: argparse.ArgumentParser,
                  path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """(path, one-line help, parser) of the parser and every subcommand under it, depth first,
    in the order they were added."""
    yield path, "", parser
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias
                continue
            seen.add(id(sub))
            for sub_path, sub_help, sub_parser in walk_commands(sub, (*path, name)):
                yield sub_path, sub_help or helps.get(name, ""), sub_parser


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=96)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    text = metavar + (" ..." if action.nargs in ("+", "*") else "")
    return "`" + text + "`"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
        return ""
    return code(action.default)


def command_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown of the command reference: one section per command."""
    if parser is None:
        from divqat.cli import build_parser

        parser = build_parser()
    out = ["# Commands", "",
           "Generated from the command line's own parsers (`divqat.cli.build_parser()`) when the "
           "site is built: every command, with its usage, its description and every option. "
           "`divqat COMMAND --help` prints the same.", ""]
    commands = list(walk_commands(parser))
    out += ["| command | what it does |", "|---|---|"]
    for path, summary, _ in commands:
        if path:
            out.append(f"| [`{' '.join(path)}`](#{_anchor(path)}) | {cell(summary)} |")
    out.append("")
    for path, summary, sub in commands:
        title = " ".join((parser.prog, *path))
        out += [f"## `{title}` {{#{_anchor(path)}}}", ""]
        if summary:
            out += [cell(summary[0].upper() + summary[1:]) + ".", ""]
        out += ["```text", _usage(sub), "```", ""]
        if sub.description and path:
            out += ["```text", sub.description.strip("\n"), "```", ""]
        rows = [a for a in sub._actions if not isinstance(a, argparse._SubParsersAction)]
        if rows:
            out += ["| option | value | default | meaning |", "|---|---|---|---|"]
            for action in rows:
                flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
                out.append(f"| {flags} | {_value(action)} | {_default(action)} | {cell(_help(sub, action))} |")
            out.append("")
    return "\n".join(out)


def _anchor(path: tuple[str, ...]) -> str:
    return "-".join(("divqat", *path))


# ---------------------------------------------------------------- the config

# A config that sets only what has no default, so that ``parse_config`` fills in every other key:
# the defaults shown are the validator's own. The keys named here are the required ones.
_MINIMAL = {
    "divqat": {"variants": [{}]},
    "defenses": [{"name": "adaptive-misinformation"}],
    "attacks": [{"name": "knockoff", "transfer": "mnist", "budgets": [1000]}],
    "detectors": [{"name": "prada"}],
    "watermark": {"independent": [{"arch": "resnet20", "seed": 10}]},
}
_REQUIRED = {"defenses[]": {"name"}, "attacks[]": {"name", "budgets", "transfer"},
             "detectors[]": {"name"}, "watermark.independent[]": {"arch", "seed"}}
_SECTIONS = {"": "The top level", "divqat.variants[]": "An entry of `divqat.variants`",
             "defenses[]": "An entry of `defenses`", "attacks[]": "An entry of `attacks`",
             "attacks[].surrogate": "`surrogate` of an attack", "detectors[]": "An entry of `detectors`",
             "attacks[].watermark": "`watermark` of an attack",
             "watermark.independent[]": "An entry of `watermark.independent`"}
# Defaults that are no attribute of the same name.
_SAID = {("watermark", "rate"): "`0.005` (DAWN's)", ("attacks[].watermark", "rate"): "the top level's"}


def _resolved(path: str, config: Any) -> Any:
    """The parsed object that holds the mapping at ``path`` of the minimal config."""
    return {"": config, "victim": config.victim, "fp32": config.fp32, "qat": config.qat,
            "divqat": config.divqat, "divqat.variants[]": config.divqat.variants[0],
            "defenses[]": config.defenses[-1], "attacks[]": config.attacks[0],
            "attacks[].surrogate": config.attacks[0].surrogate,
            "detectors[]": config.detectors[0], "numerics": config.numerics,
            "watermark": config.watermark}.get(path)


def _config_default(path: str, key: str, config: Any, schema: dict[str, dict[str, str]]) -> str:
    if key in _REQUIRED.get(path, ()):
        return "required"
    if path == "" and key == "name":
        return "the file's name"
    if (path, key) in _SAID:
        return _SAID[(path, key)]
    if f"{path}.{key}".lstrip(".") in schema or f"{path}.{key}[]".lstrip(".") in schema:
        return "see below"
    holder = _resolved(path, config)
    if holder is None or not hasattr(holder, key):
        return ""
    value = getattr(holder, key)
    if path == "divqat" and key == "cap":
        value = config.divqat.caps[0]
    if isinstance(value, tuple):
        value = list(value)
    if key == "defenses" and value is None:
        return "every defense"
    return "`" + yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip() + "`"


def config_reference() -> str:
    """The markdown of the experiment config reference: one table per mapping of the YAML."""
    from divqat.experiment.config import SCHEMA, parse_config, preset_names, preset_text

    config = parse_config(_MINIMAL)
    out = ["# Experiment config", "",
           "Generated from the validator (`divqat.experiment.config.SCHEMA`, the keys each mapping "
           "accepts, and the defaults `parse_config` fills in) when the site is built. Any other "
           "key is refused with one line that names it by its dotted path (`attacks[1].budgets`) "
           "and lists the allowed keys. A list value where one value is expected is a grid axis "
           "(`alphas`, `cap`, defense `params`, `transfer`, `labels_only`).", ""]
    for path, keys in SCHEMA.items():
        title = _SECTIONS.get(path, f"`{path}`")
        out += [f"## {title}", ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        for key, meaning in keys.items():
            out.append(f"| `{key}` | {_config_default(path, key, config, SCHEMA)} | {cell(meaning)} |")
        out.append("")
    out += ["## Presets", "",
            "Shipped with divqat (`divqat run --preset NAME`): " + ", ".join(f"`{n}`" for n in preset_names())
            + ". The default preset, as shipped:", "", "```yaml", preset_text("default").strip(), "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- registries

def registries_reference() -> str:
    """The markdown of every registered defense, attack, detector, dataset and architecture."""
    from divqat.attacks import ATTACKS
    from divqat.data import dataset_names
    from divqat.defenses import DEFENSES
    from divqat.detectors import DETECTORS
    from divqat.models import model_names

    out = ["# Registered methods", "",
           "Generated from the registries when the site is built: the names the command line and "
           "the configs accept, each with its parameters and their defaults (`divqat defenses`, "
           "`divqat attacks` and `divqat detectors` print the same).", ""]
    for title, registry, module in (("Defenses", DEFENSES, "divqat.defenses"),
                                    ("Attacks", ATTACKS, "divqat.attacks"),
                                    ("Detectors", DETECTORS, "divqat.detectors")):
        out += [f"## {title}", "", "| name | class | what it does | parameters (defaults) |",
                "|---|---|---|---|"]
        for name, summary, defaults in registry.describe():
            cls = registry.get(name)
            params = ", ".join(f"`{k}={v!r}`" for k, v in defaults.items()) or "none"
            out.append(f"| `{name}` | `{module}.{cls.__name__}` | {cell(summary)} | {params} |")
        out.append("")
    out += ["## Datasets", "", ", ".join(f"`{n}`" for n in dataset_names()), "",
            "## Architectures", "", ", ".join(f"`{n}`" for n in model_names()), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- the hook

def changelog() -> str:
    """CHANGELOG.md (at the repository's root, where GitHub shows it) as a page of the site: its
    links into docs/ made relative to the site."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()
    return text.replace("](docs/", "](")


PAGES = {"reference/commands.md": command_reference, "reference/config.md": config_reference,
         "reference/registries.md": registries_reference, "changelog.md": changelog}


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, make in PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    return files
