"""An attack through a monitored black box, measured: when each detector first raised its
alarm, and how often it flags honest clients (``divqat detect``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divqat.attacks import SurrogateTraining, create_attack
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.boundary import QueryBoundary
from divqat.checks import check_int
from divqat.detectors import DETECTORS
from divqat.errors import ConfigError
from divqat.io import write_json
from divqat.pipelines.attack import load_transfer_set
from divqat.pipelines.context import RunContext
from divqat.pipelines.defense_models import build_defense
from divqat.pipelines.detect.factory import detector_factory
from divqat.pipelines.detect.features import load_features
from divqat.pipelines.detect.honest import false_alarm_rate
from divqat.pipelines.detect.watch import alarm_record, keys_alarm_record, watching, watching_keys
from divqat.pipelines.thieves import key_budget, known_defense
from divqat.victim import load_victim, victim_metadata


class _StreamDone(Exception):
    """Raised once the thief has spent its budget: the stream is complete, and what the attack
    would do next (train its last surrogate) does not change what the detector saw."""


class _UntilBudget(QueryBoundary):
    """The thief's box, which ends the attack once ``spent()`` says the budget is (by default,
    once this box has nothing left; a Sybil thief's keys end when they have spent it together)."""

    __slots__ = ("_box", "_spent")

    def __init__(self, box: BlackBox, spent: Callable[[], bool] | None = None) -> None:
        self._box = box
        self._spent = spent or (lambda: box.queries_left == 0)

    def _after(self, answer: Tensor) -> Tensor:
        if self._spent():
            raise _StreamDone
        return answer

    def query(self, images: Tensor) -> Tensor:
        return self._after(self._box.query(images))

    def query_labels(self, images: Tensor) -> Tensor:
        return self._after(self._box.query_labels(images))

    queries_used = property(lambda self: self._box.queries_used)
    budget = property(lambda self: self._box.budget)
    input_shape = property(lambda self: self._box.input_shape)
    num_classes = property(lambda self: self._box.num_classes)
    label_only = property(lambda self: self._box.label_only)



@dataclass(frozen=True)
class DetectRequest:
    """What ``divqat detect`` is asked: one thief against one victim, watched by detectors.

    Arguments:
        victim: the victim directory (``divqat train``).
        detectors: a detector's name, or ``{name: params}`` for several, all watching the same
            stream (params None: the calibration's, else the detector's defaults).
        attack, attack_params: the registered attack and its parameters. (Default params: the
            attack's defaults.)
        budget: the queries the thief spends; also the length of each benign stream.
        transfer: the thief's transfer set, as for ``divqat attack``. (Default: None.)
        benign: the images a knockoff thief with ``mix`` > 0 mixes into its stream.
            (Default: "holdout", the victim's holdout.)
        defense, defense_params: the output perturbation. (Default: none.)
        training: the thief's surrogate recipe (the stream of a data-free or Jacobian thief
            depends on it). (Default: None, ``SurrogateTraining(seed=seed)`` on the context's
            device.)
        labels_only: the black box answers labels only. (Default: False.)
        benign_streams: honest clients whose false alarms are counted (0: skipped).
            (Default: 20.)
        seed: the benign streams' orders and the default recipe's seed. (Default: 0.)
        out: the folder of ``metrics.json``. (Default: None, nothing written.)
    """

    victim: str | Path
    detectors: str | dict[str, dict[str, Any] | None]
    attack: str
    budget: int
    attack_params: dict[str, Any] = field(default_factory=dict)
    transfer: str | None = None
    benign: str = "holdout"
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    training: SurrogateTraining | None = None
    labels_only: bool = False
    benign_streams: int = 20
    seed: int = 0
    out: str | Path | None = None


def detect_attack(request: DetectRequest, context: RunContext | None = None) -> dict[str, Any]:
    """Run an attack through a monitored black box and measure the detector(s) (``DetectRequest``;
    ``context``: where the data are, the device, progress bars, the log; default ``RunContext()``).

    The thief runs as ``divqat attack`` runs it, behind the defense, until it has spent
    ``budget`` queries (its last surrogate is not trained: it would not change the stream).
    Per detector, ``first_alarm`` is the number of queries after which it first raised the
    alarm (None: not raised within ``budget``). A knockoff thief with ``mix`` > 0 (an attack
    parameter) mixes images of ``benign`` into its stream. Then, over ``benign_streams`` honest
    clients of the same length (test split and holdout, in turn), each detector's false-alarm
    rate.
    """
    context = context or RunContext()
    say, data_root, device, progress = context.say, context.data_root, context.device, context.progress
    attack, labels_only, defense, seed = request.attack, request.labels_only, request.defense, request.seed
    victim_dir, detectors, training = Path(request.victim), request.detectors, request.training
    meta = victim_metadata(victim_dir)
    budget = check_int("detect", "budget", request.budget, low=1)
    benign_streams = check_int("detect", "benign_streams", request.benign_streams, low=0)
    if isinstance(detectors, str):
        detectors = {detectors: None}
    if not detectors:
        raise ConfigError("name at least one detector")
    training = training if training is not None else SurrogateTraining(seed=seed, device=device,
                                                                       progress=progress)
    thief = create_attack(attack, **dict(request.attack_params or {}))
    built = {name: detector_factory(name, params, victim_dir, log=say)
             for name, params in detectors.items()}
    transfer_set = benign_set = None
    if thief.uses_transfer_set:
        if request.transfer is None:
            raise ConfigError(f"attack {attack!r} needs a transfer set: --transfer holdout or NAME[:SPLIT]")
        transfer_set = load_transfer_set(request.transfer, meta, data_root)
    if getattr(getattr(thief, "inner", thief), "mix", 0) > 0:
        benign_set = load_transfer_set(request.benign, meta, data_root)
    built_defense = build_defense(defense, request.defense_params, victim_dir, seed=training.seed,
                                  data_root=data_root, device=device, progress=progress,
                                  log=context.log)
    served = DefendedVictim(load_victim(victim_dir, device=device), built_defense)
    factories = {name: make for name, (make, _) in built.items()}
    keys = [f"key{i + 1}" for i in range(thief.streams)]
    views = None
    if thief.streams == 1:
        monitor, watched = watching(factories)
        boxes = [BlackBox(served, budget=budget, label_only=labels_only, monitor=monitor)]
        thief_boxes: Any = _UntilBudget(boxes[0])
    else:  # a Sybil thief: each key watched alone, and the keys' union by the service-wide view
        monitors, views = watching_keys(factories, keys)
        watched = views
        boxes = [BlackBox(served, budget=key_budget(thief, budget), label_only=labels_only, monitor=m)
                 for m in monitors]

        def spent() -> bool:
            return sum(b.queries_used for b in boxes) >= budget

        thief_boxes = [_UntilBudget(b, spent) for b in boxes]
    say(f"{attack} against the {meta.get('mode')} victim behind {defense}, watched by "
        f"{', '.join(watched)}, budget {budget}"
        + (f" over {len(boxes)} keys" if len(boxes) > 1 else "")
        + (f", transfer set {transfer_set.name}" if transfer_set else ""))
    known = known_defense(thief, defense, request.defense_params, training, transfer_set,
                          served.input_shape, served.num_classes)
    start = time.perf_counter()
    torch.manual_seed(training.seed)
    try:
        thief.steal(thief_boxes, [budget], training, transfer=transfer_set, **known,
                    **({"benign": benign_set} if benign_set is not None else {}))
    except _StreamDone:
        pass
    seconds = time.perf_counter() - start
    mix = getattr(getattr(thief, "inner", thief), "mix", 0.0)
    record: dict[str, Any] = {
        "attack": attack, "attack_params": thief.params(), "labels_only": labels_only,
        "transfer_set": None if transfer_set is None else transfer_set.name,
        "benign_set": None if benign_set is None else benign_set.name,
        "defense": defense, "defense_params": built_defense.params(),
        "victim": str(victim_dir), "victim_mode": meta.get("mode"), "victim_dataset": meta.get("dataset"),
        "seed": training.seed, "budget": budget, "queries_used": sum(b.queries_used for b in boxes),
        "attack_seconds": seconds, "detectors": {},
    }
    if mix:
        record["mix"] = mix
    if views is not None:
        record["keys"] = [{"key": k, "budget": b.budget, "queries_used": b.queries_used}
                          for k, b in zip(keys, boxes, strict=True)]
    for name in watched:
        make, settings = built[name]
        row: dict[str, Any] = {
            "settings": settings["params"], "calibrated": settings["calibrated"],
            "calibration": settings["calibration"],
            **(alarm_record(watched[name]) if views is None else keys_alarm_record(views[name])),
        }
        if mix:  # what the evasive thief got from its own transfer set before the alarm (all keys')
            first = row.get("first_alarm_thief", row["first_alarm"])
            row["transfer_queries_before_alarm"] = None if first is None else math.floor((1 - mix) * first)
        if benign_streams:
            cls = DETECTORS.get(name)
            features = load_features(victim_dir) if cls.model_param == "features" else None
            say(f"{name}: false alarms over {benign_streams} benign streams of {budget} queries")
            row.update(false_alarm_rate(victim_dir, make, cls, served, meta, streams=benign_streams,
                                        length=budget, seed=seed, data_root=data_root,
                                        features=features))
            if views is not None:
                # The union of honest keys is itself an honest stream (independent clients of
                # in-distribution images): the rate above is the service-wide view's; one
                # honest key's stream is as long as one of the thief's keys.
                per_key = key_budget(thief, budget)
                say(f"{name}: false alarms over {benign_streams} benign streams of {per_key} queries "
                    "(one key's share)")
                row["per_key_false_alarms"] = false_alarm_rate(
                    victim_dir, make, cls, served, meta, streams=benign_streams, length=per_key,
                    seed=seed, data_root=data_root, features=features)
        record["detectors"][name] = row
    if request.out is not None:
        write_json(Path(request.out) / "metrics.json", record)
    return record



__all__ = ["DetectRequest", "detect_attack"]
