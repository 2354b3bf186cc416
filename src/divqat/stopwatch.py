"""Where a stage's time goes: named phases (``data``, ``load``, ``compile``, ``train``,
``evaluate``, ...) timed exclusively, so that the compilation that happens inside an evaluation
counts as ``compile`` and not twice.

The library marks its phases with ``phase(name)``, which costs two clock reads and does nothing
unless a ``Stopwatch`` is running (``measuring()``); the experiment runs each stage under one
and stores the totals with the stage::

    >>> with measuring() as watch:
    ...     train_victim(request)
    >>> watch.totals          # {"data": 0.4, "train": 41.2, "evaluate": 3.1, "compile": 6.0}
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# One stage runs at a time in a process (serially, or in a Ray worker), so one watch per process.
_active: Stopwatch | None = None


class Stopwatch:
    """Exclusive seconds per phase name; time in a nested phase is taken out of the outer one."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, seconds spent in nested phases]

    def _enter(self) -> None:
        self._stack.append([time.perf_counter(), 0.0])

    def _exit(self, name: str) -> None:
        start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] = self.totals.get(name, 0.0) + elapsed - nested
        if self._stack:
            self._stack[-1][1] += elapsed


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time spent in the block as ``name`` (when a stopwatch is running)."""
    watch = _active
    if watch is None:
        yield
        return
    watch._enter()
    try:
        yield
    finally:
        watch._exit(name)


def timed(name: str) -> Callable[[F], F]:
    """A decorator: every call of the function is the phase ``name``."""
    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with phase(name):
                return function(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


@contextlib.contextmanager
def measuring() -> Iterator[Stopwatch]:
    """Run a fresh ``Stopwatch`` for the block; the one running before (if any) is paused."""
    global _active
    outer, _active = _active, Stopwatch()
    try:
        yield _active
    finally:
        _active = outer


__all__ = ["Stopwatch", "measuring", "phase", "timed"]
