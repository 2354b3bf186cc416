"""The extraction-detector contract, its registry, and what every detector shares.

A detector watches one client's query stream: ``observe(images, answers)`` takes a batch of
queries (float32 (N, C, H, W) in [0, 1]) and the answers the victim gave (posteriors (N, K)),
in the order they were asked, and returns a ``Verdict``: the latest score, whether the latest
test raised the alarm, and where in the stream the alarm was first raised. Its whole memory of
the stream is ``state_dict()``: a detector restored with ``load_state_dict`` gives the same
verdicts on the rest of the stream as one that never stopped (the service keeps one state per
API key in its database, across restarts). ``reset()`` forgets the stream.

Each detector tests at fixed stream positions (every ``check_every`` queries), so the verdicts do
not depend on how the stream is cut into batches.
"""

from __future__ import annotations

import abc
import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from divqat.errors import ConfigError
from divqat.registry import Registry, params_repr, recorded_params

DETECTORS: Registry[type[Detector]] = Registry("detector")

STATE_FORMAT = 1


@dataclass(frozen=True)
class Verdict:
    """What a detector says after a batch.

    score: the statistic of the latest test (None before the first test). alarm: the latest
    test raised the alarm. first_alarm: the stream position (1-based count of queries) at which
    the alarm was first raised, or None. worst: the most suspicious score of any test so far
    (what calibration reads). queries: queries observed so far. tests: tests run so far.
    """

    score: float | None
    alarm: bool
    first_alarm: int | None
    worst: float | None
    queries: int
    tests: int

    @property
    def flagged(self) -> bool:
        """The alarm has been raised at some point of the stream."""
        return self.first_alarm is not None


class Detector(abc.ABC):
    """Base of every detector (see the module docstring).

    Subclasses implement ``_observe(images, labels, answers) -> [(position, score), ...]`` (the
    tests run in this batch, at stream positions ``self.queries + 1 ..``), ``_reset()``,
    ``_state()`` and ``_load_state(state)``; the base class validates the inputs, counts the
    queries, applies the threshold and keeps the first alarm.

    Class attributes:
        alarm_when: ``"above"`` (score > threshold raises the alarm) or ``"below"``.
        threshold_param: the constructor argument that holds the threshold (what ``divqat
            calibrate`` sets for a target false-alarm rate).
        model_param, model_help: a model-backed detector names the constructor argument that
            takes its model and how divqat builds it for a saved victim (``divqat detectors``).
        calibrated: the detector needs ``divqat calibrate`` before it can raise an alarm.
        service_params: what a long-running service (``divqat serve``: one detector per API key,
            for as long as the key lives) uses for parameters that neither the operator nor the
            calibration set, so that one client's state stays bounded (PRADA: ``max_set``).
    """

    name: ClassVar[str] = ""
    alarm_when: ClassVar[str] = "above"
    threshold_param: ClassVar[str] = "threshold"
    model_param: ClassVar[str | None] = None
    model_help: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False
    # Parameters that are data built by divqat (reference features), not settings to record.
    data_params: ClassVar[tuple[str, ...]] = ()
    service_params: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:  # noqa: B027  (not abstract: subclasses call it)
        self._queries = 0
        self._tests = 0
        self._score: float | None = None
        self._alarm = False
        self._first_alarm: int | None = None
        self._worst: float | None = None

    # ------------------------------------------------------------------ the stream

    def observe(self, images: Tensor, answers: Tensor) -> Verdict:
        """Watch a batch: images float32 (N, C, H, W) in [0, 1], answers (N, K) posteriors (or
        (N,) labels), in the order they were asked."""
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"{self.name}: images must be a float tensor (N, C, H, W), got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if not isinstance(answers, Tensor) or answers.shape[0] != images.shape[0] or answers.ndim not in (1, 2):
            raise ValueError(f"{self.name}: answers must be (N, K) posteriors or (N,) labels for "
                             f"N = {images.shape[0]} images")
        if len(images):
            images = images.detach().to("cpu", torch.float32)
            answers = answers.detach().cpu()
            labels = answers if answers.ndim == 1 else answers.argmax(dim=1)
            tests = self._observe(images, labels.long(), answers)
            self._queries += len(images)
            threshold = self.alarm_threshold
            for position, score in tests:
                self._tests += 1
                self._score = float(score)
                if self._worst is None or self._more_suspicious(self._score, self._worst):
                    self._worst = self._score
                self._alarm = threshold is not None and self._more_suspicious(self._score, threshold)
                if self._alarm and self._first_alarm is None:
                    self._first_alarm = int(position)
        return self.verdict()

    def verdict(self) -> Verdict:
        return Verdict(self._score, self._alarm, self._first_alarm, self._worst, self._queries,
                       self._tests)

    @property
    def queries(self) -> int:
        return self._queries

    @property
    def alarm_threshold(self) -> float | None:
        return getattr(self, self.threshold_param)

    def _more_suspicious(self, score: float, than: float) -> bool:
        return score > than if self.alarm_when == "above" else score < than

    def reset(self) -> None:
        """Forget the stream (a new client)."""
        Detector.__init__(self)
        self._reset()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The detector's memory of the stream: tensors and plain values (``torch.save``-able
        with ``weights_only`` loading). Its parameters are recorded, not restored."""
        return {"format": STATE_FORMAT, "detector": self.name, "params": self.params(),
                "queries": self._queries, "tests": self._tests, "score": self._score,
                "alarm": self._alarm, "first_alarm": self._first_alarm, "worst": self._worst,
                "state": self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream recorded in ``state`` (from a detector of the same name)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{self.name}: not a divqat detector state (format {STATE_FORMAT})")
        if state.get("detector") != self.name:
            raise ConfigError(f"a {state.get('detector')!r} detector's state cannot be loaded into "
                              f"{self.name!r}")
        self._reset()
        self._load_state(state["state"])
        self._queries, self._tests = int(state["queries"]), int(state["tests"])
        self._score, self._alarm = state["score"], bool(state["alarm"])
        self._first_alarm, self._worst = state["first_alarm"], state["worst"]

    # ------------------------------------------------------------------ subclasses

    @abc.abstractmethod
    def _observe(self, images: Tensor, labels: Tensor, answers: Tensor) -> list[tuple[int, float]]:
        """Take in a non-empty batch (images float32 (N, C, H, W) on the CPU, labels (N,) the
        answers' argmax, answers as given); return the tests run, as (position, score)."""

    @abc.abstractmethod
    def _reset(self) -> None:
        """Forget the stream (the base class's counters are reset by ``reset``)."""

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """The subclass's memory of the stream."""

    @abc.abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore ``_state()``'s output."""

    def params(self) -> dict[str, Any]:
        """The constructor arguments as recorded values (models and data by their type name)."""
        return recorded_params(self)

    def __repr__(self) -> str:
        return params_repr(self)


# ---------------------------------------------------------------- state as bytes (the service)

def state_to_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors and arrays of a state (its in-memory size, roughly)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_nbytes(v) for v in state)
    return 8


# ---------------------------------------------------------------- thresholds for a false-alarm rate

def calibrated_threshold(worst: list[float], target: float, alarm_when: str) -> float:
    """The threshold at which at most ``floor(target * n)`` of ``n`` benign streams raise the
    alarm, given each stream's most suspicious score (ties aside, exactly that many)."""
    if not worst:
        raise ConfigError("calibration needs at least one benign stream with a test")
    if not 0 <= target < 1:
        raise ConfigError(f"the target false-alarm rate must be in [0, 1), got {target!r}")
    allowed = math.floor(target * len(worst) + 1e-9)
    # Most suspicious first; the threshold is the first stream that must stay silent.
    ordered = sorted(worst, reverse=alarm_when == "above")
    return float(ordered[allowed])


# ---------------------------------------------------------------- registry front end

class _PendingModel:
    """Stands for a model-backed detector's model before a driver builds it."""

    def __call__(self, images: Tensor) -> Tensor:
        raise RuntimeError("a detector built for parameter checking only was asked to observe")

    def __repr__(self) -> str:
        return "<model built by divqat>"


PENDING_MODEL = _PendingModel()


def create_detector(name: str, **params: Any) -> Detector:
    """Build a registered detector by its CLI name: ``create_detector("prada", delta=0.9)``."""
    return DETECTORS.create(name, **params)


def check_detector(name: str, params: dict[str, Any]) -> type[Detector]:
    """Check a detector's name and parameters (its model and data left to the driver); returns
    its class. ``ConfigError`` for an unknown name, parameter or a bad value."""
    try:
        cls = DETECTORS.get(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    built = {p for p in (cls.model_param, *cls.data_params) if p}
    given = sorted(built & set(params))
    if given:
        raise ConfigError(f"detector {name!r}: {', '.join(given)} is built from the victim by divqat "
                          "(`divqat calibrate`), not given as a parameter")
    model = {cls.model_param: PENDING_MODEL} if cls.model_param is not None else {}
    DETECTORS.create(name, **model, **params)
    return cls


def describe_detectors() -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, one-line summary, {param: default})`` for every registered detector, by name."""
    return DETECTORS.describe()
