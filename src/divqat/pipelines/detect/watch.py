"""Several detectors watching one thief's stream without changing any answer: what
``divqat detect`` and the experiment's attack stages record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from divqat.detectors import Detector, Monitor, ServiceWide
from divqat.detectors.service_wide import ALL


class _Tee(Detector):
    """Several detectors watching one stream (one attack run measures them all); its own
    verdict is never used."""

    name = "tee"

    def __init__(self, detectors: Sequence[Detector]) -> None:
        super().__init__()
        self.detectors = list(detectors)
        self.threshold = None

    def _observe(self, images: Tensor, labels: Tensor, answers: Tensor) -> list[tuple[int, float]]:
        for detector in self.detectors:
            detector.observe(images, answers)
        return []

    def _reset(self) -> None:
        for detector in getattr(self, "detectors", []):
            detector.reset()

    def _state(self) -> dict[str, Any]:
        return {"detectors": [d.state_dict() for d in self.detectors]}

    def _load_state(self, state: dict[str, Any]) -> None:
        for detector, saved in zip(self.detectors, state["detectors"], strict=True):
            detector.load_state_dict(saved)

    def params(self) -> dict[str, Any]:
        return {"detectors": [d.name for d in self.detectors]}


def watching(factories: dict[str, Callable[[], Detector]]) -> tuple[Monitor, dict[str, Detector]]:
    """A monitor that only records (``flag``) and the fresh detectors it feeds, by name: several
    detectors watching one thief's stream without changing any answer."""
    detectors = {name: make() for name, make in factories.items()}
    return Monitor(_Tee(list(detectors.values())), on_alarm="flag"), detectors


def watching_keys(factories: dict[str, Callable[[], Detector]], keys: Sequence[str],
                  groups: dict[str, str] | None = None
                  ) -> tuple[list[Monitor], dict[str, ServiceWide]]:
    """Per key, a monitor that only records (``flag``); per detector, the service-wide view
    that watches every key alone and the keys' union (``ServiceWide``): a Sybil thief's streams
    watched the way a service with several keys would watch them."""
    views = {name: ServiceWide(make, groups) for name, make in factories.items()}
    monitors = [Monitor(_Tee([view.stream(key) for view in views.values()]), on_alarm="flag")
                for key in keys]
    return monitors, views


def alarm_record(detector: Detector) -> dict[str, Any]:
    """What a watched stream ended with: ``detected``, ``first_alarm`` (queries until the alarm,
    None if not raised), the last and most suspicious scores, and how many tests ran."""
    v = detector.verdict()
    return {"detected": v.first_alarm is not None, "first_alarm": v.first_alarm,
            "final_score": v.score, "worst_score": v.worst, "tests": v.tests}


def keys_alarm_record(view: ServiceWide) -> dict[str, Any]:
    """A Sybil thief's streams under one detector: per key alone (``detected``: some key raised
    the alarm on its own stream; ``first_alarm``: the earliest such alarm, in that key's own
    queries; ``first_alarm_thief``: the same alarm counted in the thief's queries of all its
    keys, what a budget compares with) and over the keys' union (``service_wide``:
    ``first_alarm`` in the thief's queries of all keys together), with every key's record
    (``per_key``)."""
    record = view.record()
    keys = record["keys"]
    alarms = [k["first_alarm"] for k in keys.values() if k["first_alarm"] is not None]
    thief_wide = [k["first_alarm_in_union"] for k in keys.values() if k["first_alarm_in_union"] is not None]
    union = record["groups"].get(ALL) or {"first_alarm": None, "worst_score": None, "tests": 0,
                                          "queries": 0}
    scores = [k["worst_score"] for k in keys.values() if k["worst_score"] is not None]
    most = max if view.alarm_when == "above" else min
    return {"detected": bool(alarms), "first_alarm": min(alarms) if alarms else None,
            "first_alarm_thief": min(thief_wide) if thief_wide else None,
            "final_score": None, "worst_score": most(scores) if scores else None,
            "tests": sum(k["tests"] for k in keys.values()),
            "keys_flagged_alone": record["keys_flagged_alone"], "keys": len(keys),
            "per_key": keys,
            "service_wide": {"detected": union["first_alarm"] is not None,
                             "first_alarm": union["first_alarm"], "worst_score": union["worst_score"],
                             "tests": union["tests"], "queries": union["queries"]}}


__all__ = ["alarm_record", "keys_alarm_record", "watching", "watching_keys"]
