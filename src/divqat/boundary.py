"""The seam between the defender and the thief: what an extraction attack may hold.

``QueryBoundary`` is the whole interface an attack gets of a victim: send images, get the
(defended) posteriors or labels back, every image counted against a query budget. It is
implemented in process by ``divqat.blackbox.BlackBox`` (the victim and its defense hidden in
closures) and over HTTP by ``divqat.remote.RemoteBlackBox`` (the victim in another process). The
attacks import this module and nothing of the victim, the defenses or the quantization code, so
the import contracts (``lint-imports``) can check that the seam holds.

Images are float32 (N, C, H, W) in [0, 1] at ``input_shape``; posteriors are float32 (N, K) and
labels int64 (N,), on the CPU.
"""

from __future__ import annotations

import abc

from torch import Tensor

from divqat.errors import DivqatError


class BudgetExceeded(DivqatError):
    """A query would take the black box past its query budget; it was refused, nothing counted."""


class Blocked(DivqatError):
    """The boundary refuses every query of this client: an extraction detector raised the alarm
    (``divqat serve --on-alarm block``: HTTP 403 ``key_blocked``); nothing counted."""


class QueryError(DivqatError, ValueError):
    """A query the black box refuses (bad images, or soft labels asked of a label-only box);
    nothing was sent to the victim and nothing counted."""


class QueryBoundary(abc.ABC):
    """The thief's view of a victim (see the module docstring).

    ``query(images)`` -> defended posteriors (N, K) (refused by a label-only boundary);
    ``query_labels(images)`` -> labels (N,). A query that would pass the budget raises
    ``BudgetExceeded`` before the victim sees it, bad images raise ``QueryError``; neither is
    counted. ``queries_used``, ``budget`` (None: unlimited), ``queries_left``, ``input_shape``
    (C, H, W), ``num_classes``, ``label_only`` and ``timings`` ((batch size, seconds) per answered
    batch) are read-only.
    """

    __slots__ = ()

    @abc.abstractmethod
    def query(self, images: Tensor) -> Tensor:
        """Defended posteriors (N, K) float32 on the CPU for images (N, C, H, W)."""

    @abc.abstractmethod
    def query_labels(self, images: Tensor) -> Tensor:
        """Predicted labels (N,) int64 on the CPU: the argmax of the defended posteriors."""

    @property
    @abc.abstractmethod
    def queries_used(self) -> int:
        """Images answered so far, all calls together."""

    @property
    @abc.abstractmethod
    def budget(self) -> int | None:
        """Most images this boundary answers (None: unlimited)."""

    @property
    def queries_left(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries_used

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the victim takes."""

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """K, the number of classes the victim answers."""

    @property
    @abc.abstractmethod
    def label_only(self) -> bool:
        """Whether only labels are answered (``query`` is refused)."""

    @property
    def timings(self) -> list[tuple[int, float]]:
        """(batch size, seconds) of each answered batch (a copy; empty where not measured)."""
        return []
