"""Name -> factory registries, so configs and the CLI name models, datasets, defenses and attacks
by string, and adding one is adding one file with a decorator (the timm pattern)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from divqat.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories. ``kind`` ("model", "dataset", ...) appears in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> T:
        """Remove an entry (a test's or a plugin's that is done); returns it."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    # The front end shared by the registries of classes with keyword parameters (defenses,
    # attacks): the CLI and the configs build them by name with checked parameters.

    @staticmethod
    def defaults(cls: Callable[..., Any]) -> dict[str, Any]:
        """The constructor parameters of a registered class with their defaults: those of its
        ``__init__``, or, for a class that declares them as a settings dataclass
        (``cls.Settings``, as the data-free attacks do), that dataclass's fields."""
        settings = getattr(cls, "Settings", None)
        if settings is not None and dataclasses.is_dataclass(settings):
            return {f.name: f.default for f in dataclasses.fields(settings)}
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items() if k != "self"}

    def create(self, name: str, **params: Any) -> Any:
        """Build the entry ``name`` with ``params``; an unknown name or parameter is a
        ``ConfigError`` that lists what is allowed (with the defaults)."""
        try:
            cls = self.get(name)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        defaults = self.defaults(cls)
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            allowed = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
            raise ConfigError(f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                              f"allowed (with defaults): {allowed}")
        return cls(**params)

    def describe(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(name, first docstring line, {param: default})`` of every entry, by name."""
        rows = []
        for name in self.names():
            cls = self.get(name)
            summary = next(iter((inspect.getdoc(cls) or "").strip().splitlines()), "")
            rows.append((name, summary, self.defaults(cls)))
        return rows

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# ---------------------------------------------------------------- --param key=value

def _convert(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_params(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse CLI ``--param key=value`` items: ``["beta=0.5", "k=1"] -> {"beta": 0.5, "k": 1}``.

    Values become int, float, bool (true/false) or None (none/null) where they parse, else stay
    strings. A missing ``=``, an empty or non-identifier key, or a repeated key is a ConfigError.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"bad parameter {item!r}: expected key=value, e.g. beta=0.5")
        if key in out:
            raise ConfigError(f"parameter {key!r} given twice")
        out[key] = _convert(value.strip())
    return out


def params_text(params: dict[str, Any], sep: str = " ") -> str:
    """Parameters as ``key=value`` items, the inverse of ``parse_params``:
    ``{"beta": 0.5, "k": 1} -> "beta=0.5 k=1"``."""
    return sep.join(f"{k}={v}" for k, v in params.items())


_SCALARS = (bool, int, float, str, type(None))


def recorded_params(obj: Any) -> dict[str, Any]:
    """The constructor arguments of a registered object (a defense, a detector), read back from
    the attributes of the same names: scalars as they are, models and data by their type name."""
    out = {}
    for key in inspect.signature(type(obj).__init__).parameters:
        if key == "self":
            continue
        value = getattr(obj, key)
        out[key] = value if isinstance(value, _SCALARS) else type(value).__name__
    return out


def params_repr(obj: Any) -> str:
    """``Name(key=value, ...)`` from ``obj.params()``."""
    return f"{type(obj).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in obj.params().items()) + ")"
