"""The Sybil thief: one attack spread over several API keys (or monitored streams), each under its
own budget, so that no one key's stream looks like the whole theft.

Every per-client extraction detector watches one key; PRADA's own paper (Juuti et al., EuroS&P
2019) names splitting the queries over accounts as its limit. The counter is a service-wide view
(``divqat.detectors.ServiceWide``), which scores the keys' streams together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    Stolen,
    SurrogateTraining,
    check_blackbox,
    create_attack,
    param_mapping,
)
from divqat.boundary import Blocked, BudgetExceeded, QueryBoundary
from divqat.checks import check_choice, check_int
from divqat.errors import ConfigError

SCHEDULES = ("round-robin", "split", "sequential")


class SpreadBoundary(QueryBoundary):
    """Several query boundaries (one per key) as one: what the thief's attack code sees.

    Arguments:
        boxes (sequence of QueryBoundary): the keys, in order; same input shape, classes and
            output level.
        schedule (str): which key answers a query call.
            ``round-robin``: each call goes whole to the next key in turn (spilling over to the
            following keys when that one has too little left);
            ``split``: each call is split evenly over every key (many clients at once);
            ``sequential``: one key until its budget is spent, then the next.
            (Default: round-robin.)

    ``budget``, ``queries_used`` and ``queries_left`` are the keys' sums. A call that the keys
    together cannot take raises ``BudgetExceeded`` before any key sees it. A key that refuses
    because a detector blocked it (``Blocked``) is dropped and its part goes to the other keys;
    when none is left, ``Blocked``. ``used`` lists each key's queries, ``blocked`` the dropped
    keys' indices. Answers come back in the order of the images.
    """

    __slots__ = ("_boxes", "_schedule", "_next", "_blocked")

    def __init__(self, boxes: Sequence[QueryBoundary], schedule: str = "round-robin") -> None:
        boxes = [check_blackbox(b) for b in boxes]
        if not boxes:
            raise ConfigError("a Sybil thief needs at least one key")
        first = boxes[0]
        for b in boxes[1:]:
            if (b.input_shape, b.num_classes, b.label_only) != (first.input_shape, first.num_classes,
                                                               first.label_only):
                raise ConfigError("the Sybil thief's keys must answer the same victim at the same "
                                  "output level (input shape, classes, label-only)")
        self._boxes = boxes
        self._schedule = check_choice("sybil", "schedule", schedule, SCHEDULES)
        self._next = 0
        self._blocked: set[int] = set()

    # ------------------------------------------------------------------ routing

    def _left(self, k: int) -> float:
        left = self._boxes[k].queries_left
        return float("inf") if left is None else left

    def _plan(self, n: int) -> list[tuple[int, int]]:
        """(key, images) parts of a call of ``n`` images over the keys still answering."""
        live = [k for k in range(len(self._boxes)) if k not in self._blocked]
        if not live:
            raise Blocked("every key of the Sybil thief is blocked; nothing counted")
        if sum(self._left(k) for k in live) < n:
            raise BudgetExceeded(f"query of {n} images refused: the thief's {len(live)} keys have "
                                 f"{int(sum(self._left(k) for k in live))} images left; nothing counted")
        # The keys in turn, starting after the last call's first (round-robin, and who gets
        # the remainder of an uneven split).
        start = next((i for i, k in enumerate(live) if k >= self._next), 0)
        turn = live[start:] + live[:start]
        if self._schedule == "split":
            share = dict.fromkeys(live, 0)
            remaining = n
            while remaining:  # even shares, capped by what each key has left
                open_keys = [k for k in turn if self._left(k) > share[k]]
                each, extra = divmod(remaining, len(open_keys))
                for i, k in enumerate(open_keys):
                    take = int(min(each + (i < extra), self._left(k) - share[k]))
                    share[k] += take
                    remaining -= take
            self._next = turn[n % len(turn)] if n % len(turn) else turn[0]
            return [(k, c) for k, c in share.items() if c]
        if self._schedule == "sequential":
            order = live
        else:  # round-robin: each call whole to the next key in turn
            order = turn
            self._next = order[0] + 1
        parts, remaining = [], n
        for k in order:
            take = int(min(self._left(k), remaining))
            if take:
                parts.append((k, take))
                remaining -= take
            if not remaining:
                break
        return parts

    def _answer(self, images: Tensor, labels: bool) -> Tensor:
        out: list[Tensor] = []
        offset = 0
        while offset < len(images) or not out:
            try:
                parts = self._plan(len(images) - offset)
            except (Blocked, BudgetExceeded) as e:
                if not offset:
                    raise
                # A key was blocked mid-call and the others cannot take the rest: what was
                # answered before stays counted by its keys, and the message must say so.
                raise type(e)(f"{offset} of this call's {len(images)} images were answered and "
                              f"counted before a key was blocked; the other {len(images) - offset} "
                              f"are refused: {str(e).removesuffix('; nothing counted')}") from None
            for k, count in parts:
                chunk = images[offset:offset + count]
                box = self._boxes[k]
                try:
                    out.append(box.query_labels(chunk) if labels else box.query(chunk))
                except Blocked:
                    self._blocked.add(k)
                    break  # plan the rest again over the keys still answering
                offset += count
            if not parts:
                break
        return torch.cat(out) if len(out) > 1 else out[0]

    # ------------------------------------------------------------------ the QueryBoundary

    def query(self, images: Tensor) -> Tensor:
        if len(images) == 0:
            return self._boxes[0].query(images)
        return self._answer(images, labels=False)

    def query_labels(self, images: Tensor) -> Tensor:
        if len(images) == 0:
            return self._boxes[0].query_labels(images)
        return self._answer(images, labels=True)

    @property
    def queries_used(self) -> int:
        return sum(b.queries_used for b in self._boxes)

    @property
    def budget(self) -> int | None:
        budgets = [b.budget for b in self._boxes]
        return None if any(b is None for b in budgets) else sum(budgets)

    @property
    def queries_left(self) -> int | None:
        lefts = [b.queries_left for k, b in enumerate(self._boxes) if k not in self._blocked]
        return None if any(v is None for v in lefts) else sum(lefts)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._boxes[0].input_shape

    @property
    def num_classes(self) -> int:
        return self._boxes[0].num_classes

    @property
    def label_only(self) -> bool:
        return self._boxes[0].label_only

    @property
    def timings(self) -> list[tuple[int, float]]:
        return [t for b in self._boxes for t in b.timings]

    @property
    def used(self) -> list[int]:
        return [b.queries_used for b in self._boxes]

    @property
    def blocked(self) -> list[int]:
        return sorted(self._blocked)


@ATTACKS.register("sybil")
class Sybil(Attack):
    """Sybil thief: another attack spread over several API keys (or monitored streams), each with its own budget.

    The thief holds ``keys`` boxes, each with its own budget (and its own detector), and runs
    ``attack`` through them as one (``SpreadBoundary``, routed by ``schedule``). The drivers give
    each key ``ceil(largest budget / keys)`` queries in process, and use the keys' own budgets
    over HTTP (``divqat attack --api-key-file K1 K2 ...``). The surrogates are the inner
    attack's; ``Stolen.info["sybil"]`` records each key's queries and the keys a detector blocked.

    Arguments:
        attack (str): the attack spread over the keys (any registered attack but sybil).
            (Default: knockoff.)
        keys (int): API keys, or monitored streams, >= 1. (Default: 4.)
        schedule (str): ``round-robin``, ``split`` or ``sequential`` (see ``SpreadBoundary``).
            (Default: round-robin.)
        attack_params (mapping or "k=v,k=v", optional): the inner attack's parameters.
            (Default: None, its defaults.)

    Example::
        >>> thief = Sybil("knockoff", keys=4)
        >>> boxes = [BlackBox(victim, budget=1250, monitor=m) for m in monitors]
        >>> stolen = thief.steal(boxes, [5000], SurrogateTraining(), transfer=ts)
        >>> stolen[0].info["sybil"]["used"]      # [1250, 1250, 1250, 1250]
    """

    name = "sybil"

    def __init__(self, attack: str = "knockoff", keys: int = 4, schedule: str = "round-robin",
                 attack_params: dict[str, Any] | str | None = None) -> None:
        if attack == self.name:
            raise ConfigError("sybil.attack: a Sybil thief spreads another attack, not itself")
        params = param_mapping("sybil", "attack_params", attack_params)
        try:
            self.inner = create_attack(attack, **params)
        except ConfigError as e:
            raise ConfigError(f"sybil.attack: {e}") from None
        self.attack = attack
        self.attack_params = params or None  # as given (None: the defaults), as recorded

        self.keys = check_int("sybil", "keys", keys, low=1)
        self.schedule = check_choice("sybil", "schedule", schedule, SCHEDULES)

    # What the drivers ask of an attack is the inner attack's.
    @property
    def uses_transfer_set(self) -> bool:  # type: ignore[override]
        return self.inner.uses_transfer_set

    @property
    def soft_only(self) -> bool:  # type: ignore[override]
        return self.inner.soft_only

    @property
    def training_cost(self) -> float:
        return self.inner.training_cost

    @property
    def queries_transfer_set_only(self) -> bool:
        return self.inner.queries_transfer_set_only

    @property
    def streams(self) -> int:
        return self.keys

    def steal(self, box: QueryBoundary | Sequence[QueryBoundary], budgets: Sequence[int],
              training: SurrogateTraining, **kwargs: Any) -> list[Stolen]:
        boxes = list(box) if isinstance(box, list | tuple) else [box]
        if len(boxes) != self.keys:
            raise ConfigError(f"the Sybil thief holds {self.keys} keys; it was handed {len(boxes)} "
                              "black box(es)")
        spread = SpreadBoundary(boxes, self.schedule)
        stolen = self.inner.steal(spread, budgets, training, **kwargs)
        record = {"attack": self.attack, "attack_params": self.inner.params(), "keys": self.keys,
                  "schedule": self.schedule, "used": spread.used,
                  "budgets": [b.budget for b in boxes], "blocked": spread.blocked}
        for s in stolen:
            s.info["sybil"] = dict(record)
        return stolen
