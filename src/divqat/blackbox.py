"""The threat boundary: what an extraction attack may do with the victim, and nothing more.

Two views of one defended victim:

- ``BlackBox``, handed to attacks in the thief's own process (a ``divqat.boundary.QueryBoundary``,
  the interface attacks see; ``divqat.remote.RemoteBlackBox`` implements it over HTTP): ``query(images) -> defended posteriors`` (or
  ``query_labels(images) -> labels``), every image counted against a query budget. It holds the
  victim and the defense only inside a closure, so no attribute leads to the model, the defense or
  the counter, and its attributes cannot be assigned.
- ``DefendedVictim``, for the evaluation code (never for attacks): clean and defended posteriors of
  a batch with timings, to measure the defense's utility cost and the victim's accuracy.

Images are float32 (N, C, H, W) in [0, 1], in the victim's ``input_shape``; the victim maps them
to logits (N, K) and does its own normalization.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from divqat.boundary import Blocked, BudgetExceeded, QueryBoundary, QueryError
from divqat.checks import check_bool, check_int
from divqat.defenses.base import Defense
from divqat.defenses.none import NoDefense
from divqat.detectors.monitor import Monitor
from divqat.errors import ConfigError
from divqat.ownership.watermark import Watermark


@dataclass(frozen=True)
class DefendedBatch:
    """One batch through victim and defense, for evaluation.

    logits, clean, defended: float32 (N, K) on the CPU (clean = softmax(logits), defended = the
    defense's answer). victim_seconds, defense_seconds: wall time of each stage. fused: the
    softmax and the defense ran inside the victim's compiled program (``Defense.epilogue``), so
    victim_seconds covers all of it and defense_seconds is 0.
    """

    logits: Tensor
    clean: Tensor
    defended: Tensor
    victim_seconds: float
    defense_seconds: float
    fused: bool = False

    @property
    def seconds(self) -> float:
        """The latency an API user sees for the batch (victim plus defense)."""
        return self.victim_seconds + self.defense_seconds


def _victim_shape(victim: Any, input_shape: Any, num_classes: Any) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and K from the explicit arguments, else from the victim's attributes."""
    own_shape = getattr(victim, "input_shape", None)
    own_k = getattr(victim, "num_classes", None)
    shape = own_shape if input_shape is None else input_shape
    k = own_k if num_classes is None else num_classes
    if shape is None or k is None:
        missing = "input_shape" if shape is None else "num_classes"
        raise ConfigError(f"the victim has no {missing} attribute: pass {missing}= explicitly")
    if (not isinstance(shape, tuple | list | torch.Size) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ConfigError(f"input_shape must be (C, H, W) positive integers, got {shape!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {k!r}")
    shape = tuple(int(s) for s in shape)
    if own_shape is not None and tuple(own_shape) != shape:
        raise ConfigError(f"input_shape={shape} contradicts the victim's own {tuple(own_shape)}")
    if own_k is not None and own_k != k:
        raise ConfigError(f"num_classes={k} contradicts the victim's own {own_k}")
    return shape, int(k)


class DefendedVictim:
    """The victim behind its defense, as the evaluation code sees it (not for attacks).

    Arguments:
        victim (callable): images (N, C, H, W) float32 in [0, 1] -> logits (N, K); its
            ``input_shape`` (C, H, W) and ``num_classes`` attributes are used unless given here.
            An ``nn.Module`` victim must already be in eval mode (this class does not change it:
            exported int8 graphs cannot be switched).
        defense (Defense, optional): applied to the victim's posteriors. (Default: None, no
            defense.)
        input_shape, num_classes: for a plain callable without those attributes.
        device (optional): where the images are moved before the victim sees them.
            (Default: None, left where they are.)
        fuse (bool): run a ``fusable`` defense (none, top-k, rounding, reverse-sigmoid, dcp)
            inside a compiled victim's program (``Victim.with_epilogue``): the same answers to
            float rounding, without the eager ops that cost 2-3x their standalone time right
            after the victim's run. Compiles once per defense and batch bucket on first use.
            Ignored for victims without ``with_epilogue`` and other defenses. (Default: True.)

    Example::
        >>> served = DefendedVictim(victim, create_defense("dcp", beta=0.5))
        >>> batch = served(images)          # batch.clean, batch.defended, batch.seconds
    """

    __slots__ = ("_victim", "_defense", "_input_shape", "_num_classes", "_device", "_fused")

    def __init__(self, victim: Callable[[Tensor], Tensor], defense: Defense | None = None, *,
                 input_shape: tuple[int, int, int] | None = None, num_classes: int | None = None,
                 device: str | torch.device | None = None, fuse: bool = True) -> None:
        if not callable(victim):
            raise ConfigError(f"the victim must be callable (images -> logits), got {type(victim).__name__}")
        if defense is None:
            defense = NoDefense()
        if not isinstance(defense, Defense):
            raise ConfigError(f"defense must be a divqat Defense, got {type(defense).__name__}")
        self._victim = victim
        self._defense = defense
        self._input_shape, self._num_classes = _victim_shape(victim, input_shape, num_classes)
        self._device = None if device is None else torch.device(device)
        check_bool("", "fuse", fuse)
        # The fused program is built on the first query (None until then, False when there is none).
        self._fused: Callable[[Tensor], tuple[Tensor, ...]] | bool | None = None if fuse else False

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def defense(self) -> Defense:
        return self._defense

    @property
    def victim(self) -> Callable[[Tensor], Tensor]:
        """The victim itself (for timing it alone beside the served path)."""
        return self._victim

    @property
    def fused(self) -> bool:
        """Whether the defense runs inside the victim's compiled program (known after the first
        query)."""
        return bool(self._fused)

    def check_images(self, images: Any) -> Tensor:
        """Refuse anything but float32 (N, C, H, W) in [0, 1] of the victim's shape (QueryError)."""
        if not isinstance(images, Tensor):
            raise QueryError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype != torch.float32:
            raise QueryError(f"images must be float32 in [0, 1], got {images.dtype}"
                             + (" (convert uint8 with images.float() / 255)" if images.dtype == torch.uint8 else ""))
        if images.ndim != 4 or tuple(images.shape[1:]) != self._input_shape:
            raise QueryError(f"images must have shape (N, {', '.join(map(str, self._input_shape))}), "
                             f"got {tuple(images.shape)}")
        if images.numel():
            # One pass, about 10x cheaper than isfinite().all() on a batch (it is paid per query):
            # aminmax propagates NaN, which fails both comparisons, and +-inf fails one of them.
            low, high = (v.item() for v in torch.aminmax(images))
            if not (low >= 0 and high <= 1):
                raise QueryError("images must be finite and in [0, 1] (the victim normalizes them itself)")
        return images.detach() if images.requires_grad else images

    def __call__(self, images: Tensor) -> DefendedBatch:
        """Clean and defended posteriors of one batch, with the time each stage took."""
        return self._serve(self.check_images(images))

    def _serve(self, images: Tensor) -> DefendedBatch:
        """``__call__`` for images that ``check_images`` already accepted."""
        k = self._num_classes
        if images.shape[0] == 0:
            empty = torch.empty(0, k)
            return DefendedBatch(empty, empty, empty, 0.0, 0.0)
        if self._fused is None:
            make = getattr(self._victim, "with_epilogue", None)
            self._fused = (self._defense.fusable and make is not None
                           and make(self._defense.epilogue)) or False
        if self._fused:
            # divqat's Victim: it never writes its input and moves each chunk to its own device.
            return self._serve_fused(images)
        if self._device is not None and images.device != self._device:
            images = images.to(self._device)
        elif getattr(self._victim, "writes_input", True):
            # A private copy: a victim that normalizes in place must not edit the caller's images.
            # divqat's own Victim declares that it never writes its input and is spared the copy.
            images = images.clone()
        with torch.no_grad():
            start = time.perf_counter()
            logits = self._victim(images)
            victim_done = time.perf_counter()
            if not isinstance(logits, Tensor) or tuple(logits.shape) != (images.shape[0], k):
                raise RuntimeError(f"the victim returned {getattr(logits, 'shape', type(logits))} "
                                   f"for {images.shape[0]} images; expected logits ({images.shape[0]}, {k})")
            # Each tensor op costs microseconds here, and the whole served path has to fit in 5 %
            # of the victim's time, so ops that would not change anything are not called.
            if logits.requires_grad:
                logits = logits.detach()
            if logits.dtype != torch.float32:
                logits = logits.float()
            clean = torch.softmax(logits, dim=1)
            # The posteriors are our own softmax: the defense's input validation is skipped.
            defended = self._defense.serve(clean, logits, images)
            done = time.perf_counter()
        if logits.device.type != "cpu":
            logits, clean, defended = logits.cpu(), clean.cpu(), defended.cpu()
        return DefendedBatch(logits, clean, defended, victim_done - start, done - victim_done)

    def _serve_fused(self, images: Tensor) -> DefendedBatch:
        start = time.perf_counter()
        logits, clean, defended, nonfinite = self._fused(images)
        done = time.perf_counter()
        if nonfinite:
            # A bug in a defense, never the caller's fault: refuse to answer rather than hand NaN on.
            raise RuntimeError(f"defense {self._defense.name!r} produced non-finite posteriors")
        return DefendedBatch(logits, clean, defended, done - start, 0.0, fused=True)


def _make_oracle(served: DefendedVictim, budget: int | None, monitor: Monitor | None = None,
                 watermark: Watermark | None = None
                 ) -> tuple[Callable[[Any], Tensor], Callable[[], tuple[int, list]]]:
    """The counter, the victim, the monitor and the watermark live only in these two closures."""
    used = 0
    timings: list[tuple[int, float]] = []

    def answer(images: Any) -> Tensor:
        nonlocal used
        images = served.check_images(images)
        n = int(images.shape[0])
        if monitor is not None and monitor.blocks:
            raise Blocked(f"query of {n} images refused: an extraction detector "
                          f"({monitor.detector.name}) raised the alarm after "
                          f"{monitor.verdict.first_alarm} queries; nothing counted")
        if budget is not None and used + n > budget:
            raise BudgetExceeded(f"query of {n} images refused: it would exceed the query budget "
                                 f"({used} of {budget} used, {budget - used} left); nothing counted")
        labels_only = monitor is not None and monitor.labels_only
        batch = served._serve(images)
        # Counted once the answer exists: a query the victim failed on returned nothing.
        used += n
        answers = batch.defended
        if n:
            seconds = batch.seconds
            if monitor is not None:  # the detectors watch the defended answers, marks or not
                monitor.observe(images, answers)
            if watermark is not None:  # after the defense; the victim's own argmax picks the label
                start = time.perf_counter()
                answers = watermark.apply(answers, images, reference=batch.clean.argmax(dim=1))
                seconds += time.perf_counter() - start
            timings.append((n, seconds))
        if labels_only:  # the labels as one-hot rows: what a label-only answer tells
            return torch.zeros_like(answers).scatter_(1, answers.argmax(1, keepdim=True), 1.0)
        return answers

    def usage() -> tuple[int, list[tuple[int, float]]]:
        return used, list(timings)

    return answer, usage


class BlackBox(QueryBoundary):
    """The only view of the victim that an extraction attack gets.

    Arguments:
        victim (callable or DefendedVictim): images (N, C, H, W) float32 in [0, 1] -> logits
            (N, K), with ``input_shape`` and ``num_classes`` attributes (or pass them), or a
            ``DefendedVictim`` that already carries its defense.
        defense (Defense, optional): the output perturbation. (Default: None, no defense.)
        budget (int, optional): most images the attack may send, all calls together; every image
            counts. (Default: None, unlimited.)
        label_only (bool): the API returns labels only: ``query`` is refused, ``query_labels``
            answers. (Default: False.)
        input_shape, num_classes, device: see ``DefendedVictim``.
        monitor (Monitor, optional): an extraction detector that sees every answered query and
            its answers (``divqat.detectors``); after its alarm, ``on_alarm="block"`` refuses
            every query (``Blocked``, nothing counted) and ``"labels-only"`` answers one-hot
            rows of the labels. Held in the closure: the attack cannot reach it.
            (Default: None.)
        watermark (Watermark, optional): DAWN's watermark (``divqat.ownership.watermark``),
            applied to the defended answers after the defense (and after the monitor has seen
            them): a keyed fraction of the images is answered with a deterministic wrong label,
            soft answers rearranged so that label is their argmax, ``query_labels`` returning it.
            Its log (``watermark.log``) keeps the marked inputs for ``divqat verify``; the attack
            cannot reach it. (Default: None.)

    Attacks use ``query`` / ``query_labels`` and the read-only ``queries_used``, ``budget``,
    ``queries_left``, ``input_shape``, ``num_classes``, ``label_only`` and ``timings``
    (a copy: (batch size, seconds) per answered batch). A query that would exceed the budget raises
    ``BudgetExceeded`` before the victim sees it; bad images raise ``QueryError``; neither is
    counted. Labels are the argmax of the *defended* (and watermarked) posteriors (lowest index on
    ties), i.e. what a label-only API over the defense would say. The object cannot be assigned to, copied or pickled.

    Example::
        >>> box = BlackBox(victim, create_defense("dcp", beta=0.5), budget=50_000)
        >>> posteriors = box.query(images)     # (N, K) float32, CPU
        >>> box.queries_used, box.queries_left
    """

    __slots__ = ("__answer", "__usage", "__budget", "__label_only", "__input_shape", "__num_classes")

    def __init__(self, victim: Callable[[Tensor], Tensor] | DefendedVictim,
                 defense: Defense | None = None, budget: int | None = None,
                 label_only: bool = False, *, input_shape: tuple[int, int, int] | None = None,
                 num_classes: int | None = None, device: str | torch.device | None = None,
                 monitor: Monitor | None = None, watermark: Watermark | None = None) -> None:
        if isinstance(victim, DefendedVictim):
            if defense is not None or input_shape is not None or num_classes is not None or device is not None:
                raise ConfigError("a DefendedVictim already has its defense, shapes and device")
            served = victim
        else:
            served = DefendedVictim(victim, defense, input_shape=input_shape,
                                    num_classes=num_classes, device=device)
        check_int("", "budget", budget, low=0, optional=True)
        check_bool("", "label_only", label_only)
        if monitor is not None and not isinstance(monitor, Monitor):
            raise ConfigError(f"monitor must be a divqat.detectors.Monitor, got {type(monitor).__name__}")
        if watermark is not None:
            if not isinstance(watermark, Watermark):
                raise ConfigError(f"watermark must be a divqat.ownership.Watermark, got {type(watermark).__name__}")
            if watermark.num_classes != served.num_classes:
                raise ConfigError(f"the watermark is for {watermark.num_classes} classes, the victim "
                                  f"has {served.num_classes}")
        answer, usage = _make_oracle(served, budget, monitor, watermark)
        # Written around the read-only __setattr__ below; slot names are mangled by hand here.
        for slot, value in (("answer", answer), ("usage", usage), ("budget", budget),
                            ("label_only", label_only), ("input_shape", served.input_shape),
                            ("num_classes", served.num_classes)):
            object.__setattr__(self, f"_BlackBox__{slot}", value)

    def query(self, images: Tensor) -> Tensor:
        """Defended posteriors (N, K) float32 on the CPU for images (N, C, H, W)."""
        if self.__label_only:
            raise QueryError("this black box is label-only: use query_labels(images)")
        return self.__answer(images)

    def query_labels(self, images: Tensor) -> Tensor:
        """Predicted labels (N,) int64 on the CPU: the argmax of the defended posteriors."""
        return self.__answer(images).argmax(dim=1)

    @property
    def queries_used(self) -> int:
        return self.__usage()[0]

    @property
    def budget(self) -> int | None:
        return self.__budget

    @property
    def label_only(self) -> bool:
        return self.__label_only

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.__input_shape

    @property
    def num_classes(self) -> int:
        return self.__num_classes

    @property
    def timings(self) -> list[tuple[int, float]]:
        return self.__usage()[1]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"BlackBox attributes are read-only (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"BlackBox attributes are read-only (tried to delete {name!r})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A copy would share or reset the counter; neither is something an attack should do.
        raise TypeError("a BlackBox cannot be copied or pickled")

    def __repr__(self) -> str:
        return (f"BlackBox(input_shape={self.__input_shape}, num_classes={self.__num_classes}, "
                f"budget={self.__budget}, queries_used={self.queries_used}, "
                f"label_only={self.__label_only})")


__all__ = ["BlackBox", "Blocked", "BudgetExceeded", "DefendedBatch", "DefendedVictim", "QueryError"]
