"""Where a driver runs and with what: the half of every driver call that is not the request.

A driver takes a request (what to do: which victim, which defense or attack, where to write)
and a ``RunContext`` (where the datasets are, which device, whether to draw progress bars, who
hears what is happening). The CLI builds one context from its shared options and passes it to
whichever driver a command calls; an experiment's stage worker builds one per process::

    >>> context = RunContext(data_root="data", progress=False, log=print)
    >>> record = attack_victim(AttackRequest("runs/qat", "knockoff", [5000], transfer="mnist"),
    ...                        context)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunContext:
    """The resources of a driver call, shared by every driver.

    Arguments:
        data_root: where the datasets are. (Default: None, each dataset's default location.)
        device: where models train and run ("cpu", "cuda", ...). (Default: "cpu".)
        progress: progress bars while training. (Default: True.)
        log: told what the driver is doing, one line at a time (e.g. ``print``).
            (Default: None, nothing is told.)
    """

    data_root: str | Path | None = None
    device: str = "cpu"
    progress: bool = True
    log: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        """Tell ``log`` one line, if there is a ``log``."""
        if self.log is not None:
            self.log(message)


__all__ = ["RunContext"]
