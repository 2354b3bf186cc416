"""Parameter checks shared by every layer: each returns the value in its canonical type or raises
a ``ConfigError`` that names the parameter (``owner: name must be ...``), so a bad value in a CLI
flag, a config file or a constructor reads the same everywhere."""

from __future__ import annotations

import math
from typing import Any

from divqat.errors import ConfigError


def check_number(owner: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> float:
    """A finite real number in [low, high] (or (low, high] with ``low_open``), as float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}]"
        raise ConfigError(f"{owner}: {name} must be in {lo}, {hi}, got {value!r}")
    return float(value)


def check_int(owner: str, name: str, value: Any, *, low: int) -> int:
    """An integer >= low (a float such as 2.0 is refused: it is likely a typo)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: {name} must be true or false, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


