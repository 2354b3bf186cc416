"""The defender's service-wide view: every key's stream scored alone, and the union of the keys'
streams (all of them, or each group of keys created close together) scored as one client.

A per-key detector (PRADA, the window MMD) is evaded by a thief who spreads its queries over
several keys; PRADA's authors (Juuti et al., EuroS&P 2019) name that limit. A detector over the
union of every key's queries, in the order they arrive, sees the whole theft again, at the price
of mixing the honest keys' queries into the same stream (its false alarms are those of a long
honest stream). Grouping the keys by when they were created (``groups_by_creation``) narrows the
union to the accounts a Sybil thief would open together.

    >>> view = ServiceWide(lambda: create_detector("prada"))
    >>> boxes = [BlackBox(victim, budget=1250, monitor=Monitor(view.stream(f"key{i}"))) for i in range(4)]
    >>> ...                                   # the thief queries through the boxes
    >>> view.record()   # per key: its own first alarm; per group: the union's
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from divqat.checks import check_bool, check_number
from divqat.detectors.base import Detector, Verdict
from divqat.errors import ConfigError

ALL = "all"


def groups_by_creation(created: Mapping[str, float], window: float) -> dict[str, str]:
    """Keys grouped by creation time: sorted by it, a key joins the previous key's group when it
    was created at most ``window`` seconds after that key, else it starts a group (named by its
    first key). ``created``: key -> creation time (seconds)."""
    window = check_number("service-wide", "window", window, low=0)
    groups: dict[str, str] = {}
    previous: tuple[str, float] | None = None
    for key, when in sorted(created.items(), key=lambda kv: (kv[1], kv[0])):
        if previous is not None and when - previous[1] <= window:
            groups[key] = groups[previous[0]]
        else:
            groups[key] = key
        previous = (key, when)
    return groups


class _KeyStream(Detector):
    """One key's stream as a detector for that key's ``Monitor``: it feeds the key's own
    detector and its group's union detector, and its verdict is the key's own, with the
    union's alarm folded in when the view flags the keys of an alarmed group."""

    def __init__(self, view: ServiceWide, key: str) -> None:
        super().__init__()
        self.view, self.key = view, key
        self.name = view.detector_name
        self.threshold = None

    def _observe(self, images: Tensor, labels: Tensor, answers: Tensor) -> list[tuple[int, float]]:
        self.view._feed(self.key, images, answers)
        return []

    def verdict(self) -> Verdict:
        return self.view.verdict(self.key)

    def _reset(self) -> None:
        """A key view is the service's; it is not reset through one key."""

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """The view's state is the service's, not one key's."""

    def params(self) -> dict[str, Any]:
        return {"key": self.key, "detector": self.view.detector_name}


class ServiceWide:
    """Per-key detection and detection over the union of the keys' streams, side by side.

    Arguments:
        make (callable): ``make() -> Detector``, a fresh detector with the settings to use (one
            per key, and one per group over the group's union stream).
        groups (mapping, optional): key -> group name; the keys of a group are scored together
            (``groups_by_creation``). A key not in it is its own group. (Default: None, every key
            in one group, ``"all"``.)
        union_flags_keys (bool): once a group's union raises the alarm, every key of the group
            counts as flagged (its ``stream``'s verdict, hence what its ``Monitor`` does on
            alarm), from that point of its own stream. (Default: True.)

    ``stream(key)`` is the detector to watch a key with (``Monitor(view.stream(key))``);
    ``observe(key, images, answers)`` feeds the view directly. The union stream holds the
    queries of every key of the group in the order they were observed, so its alarm position
    counts the queries of all of them.
    """

    def __init__(self, make: Callable[[], Detector], groups: Mapping[str, str] | None = None,
                 union_flags_keys: bool = True) -> None:
        probe = make()
        if not isinstance(probe, Detector):
            raise ConfigError(f"ServiceWide needs make() -> Detector, got {type(probe).__name__}")
        self.make = make
        self.detector_name, self.alarm_when = probe.name, probe.alarm_when
        self.groups = dict(groups or {})
        self.union_flags_keys = check_bool("service-wide", "union_flags_keys", union_flags_keys)
        self._keys: dict[str, Detector] = {}
        self._unions: dict[str, Detector] = {}
        self._streams: dict[str, _KeyStream] = {}
        # Per key: its own query count when its group's union first raised the alarm.
        self._union_alarm_at: dict[str, int] = {}
        # Per key: where its own first alarm falls in its group's union stream (the queries of
        # every key of the group by then: a Sybil thief's total, where the group is its keys).
        self._own_alarm_in_union: dict[str, int] = {}

    def group_of(self, key: str) -> str:
        if not self.groups:
            return ALL
        return self.groups.get(key, key)

    def stream(self, key: str) -> Detector:
        """The detector that watches ``key`` (one per key, made on first use)."""
        if key not in self._streams:
            self._streams[key] = _KeyStream(self, key)
        return self._streams[key]

    def observe(self, key: str, images: Tensor, answers: Tensor) -> Verdict:
        """Feed a batch of ``key``'s queries; its verdict with the union folded in."""
        return self.stream(key).observe(images, answers)

    def _feed(self, key: str, images: Tensor, answers: Tensor) -> None:
        # Built only where missing: setdefault(key, self.make()) would build (and, for mmd,
        # fit to its reference) two detectors on every batch.
        if key not in self._keys:
            self._keys[key] = self.make()
        own = self._keys[key]
        group = self.group_of(key)
        if group not in self._unions:
            self._unions[group] = self.make()
        union = self._unions[group]
        own.observe(images, answers)
        union.observe(images, answers)
        alarm = own.verdict().first_alarm
        if alarm is not None and key not in self._own_alarm_in_union:
            # Raised within this batch, which ends both streams: as far from the union's end.
            self._own_alarm_in_union[key] = union.queries - (own.queries - alarm)
        if union.verdict().flagged:
            # Every key of the group where it stood at the alarm; a key that joins an alarmed
            # group later, from its first batch.
            for other, detector in self._keys.items():
                if self.group_of(other) == group:
                    self._union_alarm_at.setdefault(other, detector.queries)

    # ------------------------------------------------------------------ verdicts

    def key_verdict(self, key: str) -> Verdict | None:
        """The key's own detector's verdict (None: the key sent nothing)."""
        own = self._keys.get(key)
        return None if own is None else own.verdict()

    def union_verdict(self, group: str = ALL) -> Verdict | None:
        """The verdict over the group's union stream (None: nothing observed)."""
        union = self._unions.get(group)
        return None if union is None else union.verdict()

    def verdict(self, key: str) -> Verdict:
        """What the service does about ``key``: its own verdict, flagged from its position at
        the union's alarm too when ``union_flags_keys``."""
        own = self.key_verdict(key) or Verdict(None, False, None, None, 0, 0)
        at = self._union_alarm_at.get(key) if self.union_flags_keys else None
        if at is None or (own.first_alarm is not None and own.first_alarm <= at):
            return own
        return Verdict(own.score, True, max(at, 1), own.worst, own.queries, own.tests)

    def record(self) -> dict[str, Any]:
        """Per key (``keys``): its queries and its own detector's first alarm (in its own queries,
        and where that falls in its group's union stream), and where the union flagged it; per
        group (``groups``): the union's queries, first alarm, scores."""
        keys = {}
        for key, own in self._keys.items():
            v = own.verdict()
            keys[key] = {"group": self.group_of(key), "queries": v.queries,
                         "first_alarm": v.first_alarm, "worst_score": v.worst, "tests": v.tests,
                         "union_alarm_at": self._union_alarm_at.get(key),
                         "first_alarm_in_union": self._own_alarm_in_union.get(key)}
        groups = {}
        for group, union in self._unions.items():
            v = union.verdict()
            groups[group] = {"keys": sorted(k for k in self._keys if self.group_of(k) == group),
                             "queries": v.queries, "first_alarm": v.first_alarm,
                             "worst_score": v.worst, "tests": v.tests}
        return {"detector": self.detector_name, "keys": keys, "groups": groups,
                "keys_flagged_alone": sum(k["first_alarm"] is not None for k in keys.values()),
                "keys_flagged": sum(self.verdict(k).flagged for k in keys)}


__all__ = ["ALL", "ServiceWide", "groups_by_creation"]
