"""Parameter checks shared by every layer.

Each returns the value in its canonical type or raises a ``ConfigError`` whose message names the
parameter by its path: ``check_int("attacks[0].surrogate", "epochs", 0, low=1)`` says
``attacks[0].surrogate.epochs must be an integer >= 1, got 0``, and ``check_number("dcp", "beta",
-1, low=0, high=1)`` says ``dcp.beta must be in [0, 1], got -1``. So a bad value reads the same
whether it came from a CLI flag, a config file or a constructor. Booleans are never accepted as
numbers, and floats never as integers (``2.0`` for an epoch count is likely a typo).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from divqat.errors import ConfigError


def key(owner: str, name: str) -> str:
    """The dotted path of a parameter: ``key("dcp", "beta") == "dcp.beta"``; either part may be
    empty."""
    return f"{owner}.{name}" if owner and name else owner or name


def _interval(low: float | None, high: float | None, low_open: bool) -> str:
    lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = "inf)" if high is None else f"{high:g}]"
    return f"{lo}, {hi}"


def check_number(owner: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 optional: bool = False) -> float | None:
    """A finite real number in [low, high] (or (low, high] with ``low_open``), as float; None
    passes when ``optional``."""
    if value is None and optional:
        return None
    extra = " or null" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key(owner, name)} must be a finite number in "
                          f"{_interval(low, high, low_open)}{extra}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ConfigError(f"{key(owner, name)} must be in {_interval(low, high, low_open)}{extra}, "
                          f"got {value!r}")
    return float(value)


def check_int(owner: str, name: str, value: Any, *, low: int | None = None,
              optional: bool = False) -> int | None:
    """An integer >= low (any integer without ``low``); None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        extra = " or null" if optional else ""
        raise ConfigError(f"{key(owner, name)} must be an integer{bound}{extra}, got {value!r}")
    return int(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key(owner, name)} must be true or false, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``; the error lists them."""
    if value not in choices:
        raise ConfigError(f"{key(owner, name)} must be one of {', '.join(choices)}; got {value!r}")
    return value
