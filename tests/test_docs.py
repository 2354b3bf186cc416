"""The documentation follows the code: the generated references cover every command option and
every config key, the validator takes its keys from the schema the reference is generated from,
the extending examples run, and the README stays a front door whose links resolve."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from divqat.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    """The MkDocs hook that generates the reference pages (docs/gen_reference.py)."""
    module = _load(DOCS / "gen_reference.py", "_divqat_docs_gen_reference")
    yield module
    sys.modules.pop("_divqat_docs_gen_reference", None)


# ---------------------------------------------------------------- commands

def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (path, parser) under ``parser``, walked here independently of the hook."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_option_of_every_command_is_in_the_command_reference(gen):
    from divqat.cli import build_parser

    parser = build_parser()
    text = gen.command_reference(parser)
    sections = dict(re.findall(r"^## `([^`]+)`[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    missing = []
    for path, sub in _commands(parser):
        title = " ".join(("divqat", *path))
        if title not in sections:
            missing.append(f"{title}: no section")
            continue
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            missing += [f"{title}: {n}" for n in names if f"`{n}`" not in sections[title]]
    assert not missing, "missing from the command reference: " + ", ".join(missing)


# ---------------------------------------------------------------- the config

def test_every_config_key_is_in_the_config_reference(gen):
    from divqat.experiment.config import SCHEMA

    text = gen.config_reference()
    sections = re.split(r"^## ", text, flags=re.M)
    for path, keys in SCHEMA.items():
        title = gen._SECTIONS.get(path, f"`{path}`")
        section = next((s for s in sections if s.startswith(title + "\n")), None)
        assert section is not None, f"no section {title!r} for {path!r}"
        for key in keys:
            assert re.search(rf"^\| `{re.escape(key)}` \| [^|]+ \| ", section, re.M), f"{path}.{key}"


def test_the_validator_takes_its_keys_from_the_schema():
    """Every mapping the validator reads names its allowed keys with ``_keys(...)`` (or
    TOP_KEYS, which is ``_keys("")``), so the generated reference cannot drift from it."""
    from divqat.experiment import config

    def from_schema(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_keys")
                or (isinstance(node, ast.Name) and node.id == "TOP_KEYS"))

    tree = ast.parse(Path(config.__file__).read_text())
    checked = 0
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        # A name holding the keys must be assigned from the schema in the same function, or be
        # the keys parameter of the list reader (whose callers are checked here too).
        assigned = {t.id: a.value for a in ast.walk(function) if isinstance(a, ast.Assign)
                    for t in a.targets if isinstance(t, ast.Name)}
        parameters = {a.arg for a in function.args.args} if function.name == "_named_entries" else set()
        for call in ast.walk(function):
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") in ("_Mapping", "_named_entries")):
                continue
            allowed = call.args[2] if len(call.args) > 2 else next(k.value for k in call.keywords
                                                                    if k.arg in ("allowed", "keys"))
            if isinstance(allowed, ast.Name) and allowed.id in assigned:
                allowed = assigned[allowed.id]
            ok = from_schema(allowed) or (isinstance(allowed, ast.Name) and allowed.id in parameters)
            assert ok, (f"config.py line {call.lineno}: a mapping whose allowed keys are not "
                        "_keys(PATH); add its section to config.SCHEMA")
            checked += 1
    assert checked >= 8
    assert config.TOP_KEYS == tuple(config.SCHEMA[""])


def test_the_keys_the_validator_accepts_are_the_schemas(monkeypatch):
    """Parsing every preset and a config that touches every section: each mapping was read with
    the keys of one SCHEMA entry, and the schema matches the dataclasses it fills."""
    from divqat.attacks import SurrogateTraining
    from divqat.experiment import config

    seen: set[tuple[str, ...]] = set()
    original = config._Mapping.__init__

    def recording(self, raw, path, allowed):
        seen.add(tuple(allowed))
        original(self, raw, path, allowed)

    monkeypatch.setattr(config._Mapping, "__init__", recording)
    for name in config.preset_names():
        config.load_preset(name)
    config.parse_config({"divqat": {"variants": [{}]}, "defenses": ["dcp"],
                         "attacks": [{"name": "knockoff", "transfer": "mnist", "budgets": [10],
                                      "surrogate": {}}],
                         "detectors": ["prada"]})
    schema = {tuple(keys) for keys in config.SCHEMA.values()}
    assert seen <= schema
    assert seen == schema, f"sections never read: {schema - seen}"
    assert set(config._OBJECTIVE_KEYS) <= set(config.SCHEMA["divqat"])
    assert tuple(config.SCHEMA["attacks[].surrogate"]) == SurrogateTraining.RECIPE


def test_the_reference_pages_render_registries_and_the_changelog(gen):
    from divqat.attacks import ATTACKS
    from divqat.defenses import DEFENSES
    from divqat.detectors import DETECTORS

    text = gen.registries_reference()
    for name in (*DEFENSES.names(), *ATTACKS.names(), *DETECTORS.names()):
        assert f"| `{name}` |" in text
    assert "](docs/" not in gen.changelog()


# ---------------------------------------------------------------- the extending examples

def _registries() -> list[Registry]:
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("divqat"):
            for value in vars(module).values():
                if isinstance(value, Registry):
                    found[id(value)] = value
    return list(found.values())


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_extending_example_runs_and_is_on_the_page(example):
    import divqat.attacks  # noqa: F401  (the registries the examples add to)
    import divqat.defenses  # noqa: F401
    import divqat.detectors  # noqa: F401
    import divqat.experiment.stages  # noqa: F401

    assert f'--8<-- "docs/examples/{example.name}"' in (DOCS / "extending.md").read_text()
    registries = _registries()
    before = {id(r): dict(r._entries) for r in registries}
    name = f"_divqat_docs_example_{example.stem}"
    try:
        module = _load(example, name)
        added = [n for r in registries for n in r._entries if n not in before[id(r)]]
        assert added, f"{example.name} registers nothing"
        module.demo()
    finally:
        for r in registries:  # leave the registries as the rest of the suite expects them
            r._entries.clear()
            r._entries.update(before[id(r)])
        sys.modules.pop(name, None)


# ---------------------------------------------------------------- the front door

def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    assert "make test" in text and "make test" in (ROOT / ".ci" / "run").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_no_ticket_numbers_in_the_docs():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS.rglob("*.md")]
    for page in pages:
        assert not re.search(r"\bissues? #?\d+", page.read_text(), re.I), page
