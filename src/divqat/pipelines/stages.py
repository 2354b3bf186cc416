"""The work of one experiment stage, given its settings and the folders of the stages it reads:
train a teacher or a victim, evaluate a defense, run an attack, time every victim behind every
defense side by side, copy an edge victim's program file as the on-device thief does, or verify
the surrogates of watermarked thieves and the independent models against the thieves' marks.

``StageWork`` keeps what consecutive stages of one process share: loaded victims (an int8
victim compiles once per batch size), built defenses and the victim-behind-defense programs
compiled with them (the defense stage's programs serve every attack on that victim and defense),
test splits and transfer sets. Which stage runs in which process is the experiment's business
(``divqat.experiment.executors``); here a stage is plain arguments and folders::

    >>> work = StageWork(data_root=None)
    >>> work.defense("runs/x/stages/defense/ab12", "runs/x/stages/victim/cd34",
    ...              DefenseSetting("dcp", {"beta": 0.5}, seed=0))
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divqat.attacks import SurrogateTraining, create_attack
from divqat.blackbox import DefendedVictim
from divqat.data import ImageDataset, load_dataset, to_victim_input
from divqat.defenses.base import Defense
from divqat.detectors import DETECTORS
from divqat.errors import TrainingCollapsed
from divqat.io import write_json
from divqat.ownership import SIGNIFICANCE, load_marks
from divqat.ownership.fingerprint import fingerprint_path, load_fingerprint, match
from divqat.pipelines.attack import (
    MARKS,
    AttackRequest,
    attack_loaded,
    load_transfer_set,
    surrogate_paths,
)
from divqat.pipelines.context import RunContext
from divqat.pipelines.defend import evaluate_served, time_side_by_side
from divqat.pipelines.defense_models import build_defense
from divqat.pipelines.detect import (
    CalibrateRequest,
    alarm_record,
    calibrate_loaded,
    detector_factory,
    false_alarm_rate,
    keys_alarm_record,
    load_features,
    watching,
    watching_keys,
)
from divqat.pipelines.device_copy import copy_attack
from divqat.pipelines.export import export_victim
from divqat.pipelines.import_model import ImportRequest, import_victim
from divqat.pipelines.suspect import ModelSuspect, Suspect, open_suspect
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.pipelines.verify import verify_marks
from divqat.victim import Victim, load_victim

# An edge victim's device program (``divqat export``, no defense inside), in its stage folder;
# written by the victim stage for ``victim.target: edge``, and then what every later stage runs.
EDGE_PROGRAM = "victim.pte"
# An attack stage's saved surrogate (``surrogate-BUDGET.pt`` for several budgets), in its folder.
SURROGATE = "surrogate.pt"


@dataclass(frozen=True)
class DefenseSetting:
    """One defense setting of an experiment: name, parameters, the seed of a model it builds
    (MAD's surrogate, the misinformation model) and the misinformation model's epochs."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    misinformation_epochs: int = 5

    def key(self) -> str:
        return json.dumps([self.name, self.params, self.seed, self.misinformation_epochs],
                          sort_keys=True)


@dataclass(frozen=True)
class AttackStageRequest:
    """What an attack stage runs against the victim behind its defense (``AttackRequest``'s
    thief, budgets and transfer set; ``surrogate`` the recipe's fields of ``SurrogateTraining``
    as a config writes them, ``seed`` the thief's).

    ``detectors``: name -> (calibration folder, params) of the extraction detectors that watch
    the thief's stream (they only record: no answer changes). ``twin``: the folder of the same
    label-only attack behind no defense, whose surrogates this one measures when the defense
    leaves every transfer label as it was. ``save_surrogates``: write each budget's surrogate
    into the stage's folder as a model file (``surrogate.pt``, ``surrogate-BUDGET.pt`` for
    several budgets; ``divqat verify --suspect`` loads them). ``watermark``: the rate of DAWN's
    watermark on the thief's answers (``AttackRequest.watermark``: the marks go to
    ``marks.npz`` in the stage's folder). (Defaults: the attack's parameters, no transfer set,
    posteriors, the default recipe, seed 0, no detector, no twin, none saved, no watermark.)
    """

    name: str
    budgets: Sequence[int]
    params: dict[str, Any] = field(default_factory=dict)
    transfer: str | None = None
    labels_only: bool = False
    surrogate: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    detectors: dict[str, tuple[str | Path, dict[str, Any]]] | None = None
    twin: str | Path | None = None
    save_surrogates: bool = False
    watermark: float | None = None


class StageWork:
    """Runs stages in this process, reusing what they share (see the module docstring).

    Arguments:
        data_root, device, progress: as for ``divqat train`` / ``attack``.
        log: told what a stage is doing, one line at a time (default: nothing).
        keep: victims kept loaded (with their defenses and compiled programs); the least
            recently used one beyond that is dropped. (Default: 4.)
    """

    def __init__(self, *, data_root: str | Path | None = None, device: str = "cpu",
                 progress: bool = False, log: Callable[[str], None] | None = None,
                 keep: int = 4) -> None:
        self.data_root, self.device, self.progress = data_root, device, progress
        self.log = log or (lambda message: None)
        self.context = RunContext(data_root, device, progress, self.log)
        self.keep = keep
        self._victims: OrderedDict[str, Victim] = OrderedDict()
        self._served: dict[tuple[str, str], DefendedVictim] = {}
        self._tests: dict[str, ImageDataset] = {}
        self._transfer_sets: dict[tuple, Any] = {}

    # -- the kinds of stage

    def train(self, req: TrainRequest) -> dict[str, Any]:
        """Train the fp32 teacher (``req.teacher`` None) or an int8 victim from it into
        ``req.out``, with this worker's data root, device and progress; returns its metrics
        without the per-epoch history. An ``edge`` victim is also exported to
        ``req.out/victim.pte`` (its fingerprint beside it). A collapsed DivQAT victim is a
        finding (the cliff), not a failure: it returns ``{"collapsed": True, "message": ...}``
        and saves nothing."""
        req = dataclasses.replace(req, data_root=self.data_root, device=self.device,
                                  progress=self.progress, log_epochs=self.progress)
        teacher, target, folder = req.teacher, req.target, req.out
        try:
            metrics = train_victim(req)
        except TrainingCollapsed as e:
            if teacher is None:
                raise
            self.log(f"collapsed: {e}")
            return {"collapsed": True, "message": str(e)}
        result = {k: v for k, v in metrics.items() if k != "history"}
        if target == "edge":
            exported = export_victim(folder, Path(folder) / EDGE_PROGRAM, data_root=self.data_root)
            result.update(program_bytes=exported["bytes"], export_seconds=exported["seconds"],
                          fingerprint_seconds=exported["fingerprint_seconds"],
                          fingerprint_skipped=exported["fingerprint_skipped"])
            self.log(f"exported {EDGE_PROGRAM} ({exported['bytes'] / 1024:.0f} KiB, "
                     f"{exported['seconds']:.0f} s)")
        return result

    def import_model(self, req: ImportRequest) -> dict[str, Any]:
        """Import the user's trained model as the fp32 teacher into ``req.out``
        (``divqat.pipelines.import_model``), with this worker's data root and device."""
        return import_victim(req, self.context)

    def defense(self, folder: str | Path, victim_dir: str | Path,
                setting: DefenseSetting) -> dict[str, Any]:
        """Defense metrics of the victim behind ``setting`` on its test split
        (``divqat.pipelines.defend.evaluate_defense``), written to ``folder/metrics.json``."""
        served = self.served(victim_dir, setting)
        metrics = evaluate_served(served.victim, served.defense, self.test_set(victim_dir),
                                  served=served).metrics
        write_json(Path(folder) / "metrics.json", metrics)
        return metrics

    def attack(self, folder: str | Path, victim_dir: str | Path, setting: DefenseSetting,
               stage: AttackStageRequest) -> dict[str, Any]:
        """One attack (one surrogate per budget) against the victim behind ``setting``
        (``divqat.pipelines.attack.attack_loaded``), written to ``folder/metrics.json``; with
        ``stage.detectors``, the result also holds, per detector, when it first raised its
        alarm (``detectors``)."""
        transfer, budgets, detectors = stage.transfer, stage.budgets, stage.detectors
        served = self.served(victim_dir, setting)
        victim = served.victim
        transfer_set = None if transfer is None else self.transfer_set(transfer, victim.metadata)
        training = SurrogateTraining(**stage.surrogate, seed=stage.seed, device=self.device,
                                     progress=self.progress)
        monitor = watched = monitors = views = None
        if detectors:
            factories = {n: detector_factory(n, p, victim_dir, store=store, log=self.log)[0]
                         for n, (store, p) in detectors.items()}
            streams = create_attack(stage.name, **stage.params).streams
            if streams == 1:
                monitor, watched = watching(factories)
            else:  # a Sybil thief: each key watched alone, and the service-wide view of them all
                monitors, views = watching_keys(factories, [f"key{i + 1}" for i in range(streams)])
        request = AttackRequest(victim_dir, stage.name, budgets, stage.params, defense=setting.name,
                                defense_params=setting.params, transfer=transfer, training=training,
                                labels_only=stage.labels_only, twin=stage.twin, out=folder,
                                save_surrogate=Path(folder) / SURROGATE if stage.save_surrogates else None,
                                watermark=stage.watermark)
        record = attack_loaded(request, served, self.context, test_set=self.test_set(victim_dir),
                               transfer_set=transfer_set, monitor=monitor, monitors=monitors)
        if views:
            watched = views
            record["detectors"] = {n: keys_alarm_record(v) for n, v in views.items()}
        elif watched:
            record["detectors"] = {n: alarm_record(d) for n, d in watched.items()}
        if watched:
            for n, d in record["detectors"].items():
                self.log(f"{n}: " + (f"alarm after {d['first_alarm']} queries" if d["detected"]
                                     else f"not raised within {max(budgets)}"))
            write_json(Path(folder) / "metrics.json", record)
        return record

    def calibrate(self, folder: str | Path, victim_dir: str | Path, *, name: str, params: dict[str, Any],
                  target_far: float, streams: int, length: int, benign_streams: int,
                  seed: int) -> dict[str, Any]:
        """Calibrate detector ``name`` on the victim into ``folder`` (``calibrate_loaded``: a
        threshold for ``target_far`` on ``streams`` benign streams of ``length`` training
        images), then its false-alarm rate over ``benign_streams`` honest clients of the same
        length on images the calibration never saw (test split and holdout,
        ``false_alarm_rate``); written to ``folder/metrics.json``."""
        victim = self._victim(victim_dir)
        request = CalibrateRequest(victim_dir, name, params, target_far=target_far, streams=streams,
                                   length=length, seed=seed, store=folder)
        calibration = calibrate_loaded(request, victim, self.context)
        make, _ = detector_factory(name, params, victim_dir, store=folder, log=self.log)
        cls = DETECTORS.get(name)
        features = load_features(victim_dir, folder) if cls.model_param == "features" else None
        far = false_alarm_rate(victim_dir, make, cls, DefendedVictim(victim), victim.metadata,
                               streams=benign_streams, length=length, seed=seed, data_root=self.data_root,
                               features=features)
        result = {"detector": name, "threshold": calibration["threshold"], "target_far": target_far,
                  "calibration_streams": streams, "in_sample_false_alarms": calibration["in_sample_false_alarms"],
                  **{k: far[k] for k in ("false_alarm_rate", "false_alarms", "benign_streams",
                                         "benign_length", "benign_sets")}}
        write_json(Path(folder) / "metrics.json", result)
        return result

    def timing(self, folder: str | Path, victims: dict[str, str | Path],
               settings: Sequence[tuple[str, DefenseSetting]], *, batch_size: int = 256,
               batches: int = 4, rounds: int = 10, seed: int = 0,
               only: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """Latency of every victim (label -> folder) behind every defense (label, setting),
        measured in turns in this one stage (``time_side_by_side``), so that the victims'
        and defenses' timings compare: the other stages' timings were taken at other moments
        under other loads. ``only``: defense label -> the victims served behind it (default:
        every victim). Written to ``folder/metrics.json``."""
        only = only or {}
        served = {(v, d): self.served(path, setting) for v, path in victims.items()
                  for d, setting in settings if v in only.get(d, victims)}
        first = next(iter(victims.values()))
        test = self.test_set(first)
        batch_size = min(batch_size, len(test))  # a small test split gives smaller batches
        shape = tuple(self._victim(first).input_shape)
        images = to_victim_input(test.images[:batch_size * batches], shape)
        timed = time_side_by_side(served, images, batch_size=batch_size, rounds=rounds, seed=seed)
        rows = [{"victim": v, "defense_label": d, **numbers} for (v, d), numbers in timed.items()]
        record = {"batch_size": batch_size, "batches": len(images) // batch_size, "rounds": rounds,
                  "rows": rows}
        write_json(Path(folder) / "metrics.json", record)
        return record

    def verify(self, folder: str | Path, thieves: dict[str, str | Path], independents: dict[str, str | Path],
               significance: float = SIGNIFICANCE) -> dict[str, Any]:
        """``divqat verify`` for an experiment: each thief's stolen surrogates (name -> an attack
        stage's folder, run with a watermark and ``save_surrogates``) tested against its own
        marks, and every independent model (name -> a victim folder: never stolen from) against
        every thief's marks: the false claims (``divqat.pipelines.verify.verify_marks``). One
        row per test in ``rows`` (``suspect``: surrogate or independent); written to
        ``folder/metrics.json``."""
        marks = {name: load_marks(Path(f) / MARKS) for name, f in thieves.items()}
        rows: list[dict[str, Any]] = []

        def test(suspect: Suspect, thief: str, **who: Any) -> None:
            v = verify_marks(suspect, marks[thief], significance)
            (row,) = v["rows"]
            rows.append({**who, "thief": thief, "queries": v["queries"],
                         **{k: row[k] for k in ("marks", "agreed", "agreement", "controls", "control_agreed",
                                                "chance", "p_value", "verified", "rate")}})

        for thief, f in thieves.items():
            record = json.loads((Path(f) / "metrics.json").read_text())
            budgets = [x["budget"] for x in record["results"]]
            for budget, path in surrogate_paths(Path(f) / SURROGATE, budgets).items():
                with open_suspect(path, device=self.device) as suspect:
                    test(suspect, thief, suspect_kind="surrogate", model=None, budget=budget)
        for model, path in independents.items():
            victim = self._victim(path)
            suspect = ModelSuspect(victim, model, tuple(victim.input_shape), self.device)
            for thief in thieves:
                test(suspect, thief, suspect_kind="independent", model=model, budget=None)
        record = {"significance": significance, "rows": rows,
                  "surrogates": sum(r["suspect_kind"] == "surrogate" for r in rows),
                  "independent_models": len(independents),
                  "false_claims": sum(r["verified"] for r in rows if r["suspect_kind"] == "independent")}
        write_json(Path(folder) / "metrics.json", record)
        return record

    def fingerprint_tests(self, folder: str | Path, victim_dir: str | Path, independents: dict[str, str | Path],
                          significance: float = SIGNIFICANCE) -> dict[str, Any]:
        """Every independent model (name -> a victim folder: never stolen from) against the
        fingerprint ``divqat export`` wrote beside the edge victim's program (``match``, as
        ``divqat verify --fingerprint``): a verified one is a false claim. One row per model in
        ``rows``; written to ``folder/metrics.json``. Without a fingerprint (the export found no
        boundary point) the result says so in ``note``, with no rows."""
        path = fingerprint_path(Path(victim_dir) / EDGE_PROGRAM)
        record: dict[str, Any] = {"significance": significance, "rows": [], "false_claims": 0,
                                  "points": 0, "note": None}
        if not path.is_file():
            record["note"] = f"no fingerprint beside {EDGE_PROGRAM}: the export wrote none"
        else:
            fingerprint = load_fingerprint(path)
            record["points"] = len(fingerprint)
            for model, model_dir in independents.items():
                v = match(fingerprint, self._victim(model_dir), significance=significance)
                record["rows"].append({"model": model, "points": v.probes, "agreed": v.agreed,
                                       "agreement": v.agreement, "chance": v.chance,
                                       "p_value": v.p_value, "verified": v.verified})
            record["false_claims"] = sum(r["verified"] for r in record["rows"])
        write_json(Path(folder) / "metrics.json", record)
        return record

    def copy(self, folder: str | Path, victim_dir: str | Path) -> dict[str, Any]:
        """The on-device thief copies the edge victim's program file
        (``divqat.pipelines.device_copy.copy_attack``), written to ``folder/metrics.json``."""
        return copy_attack(Path(victim_dir) / EDGE_PROGRAM, data_root=self.data_root, log=self.log,
                           out=folder)

    # -- what is loaded once and reused

    def served(self, victim_dir: str | Path, setting: DefenseSetting) -> DefendedVictim:
        """The victim behind the defense, built once per process: its fused program compiles
        on its first queries and is kept for every later stage of the same pair."""
        key = (str(victim_dir), setting.key())
        if key not in self._served:
            victim = self._victim(victim_dir)
            self._served[key] = DefendedVictim(victim, self._defense(victim_dir, setting))
        return self._served[key]

    def test_set(self, victim_dir: str | Path) -> ImageDataset:
        dataset = self._victim(victim_dir).metadata["dataset"]
        if dataset not in self._tests:
            self._tests[dataset] = load_dataset(dataset, "test", self.data_root)
        return self._tests[dataset]

    def transfer_set(self, spec: str, meta: dict[str, Any]):
        key = (spec, meta["dataset"], int(meta.get("holdout") or 0), tuple(meta["input_shape"]))
        if key not in self._transfer_sets:
            self._transfer_sets[key] = load_transfer_set(spec, meta, self.data_root)
        return self._transfer_sets[key]

    def _victim(self, victim_dir: str | Path) -> Victim:
        path = str(victim_dir)
        if path in self._victims:
            self._victims.move_to_end(path)
            return self._victims[path]
        while len(self._victims) >= self.keep:
            old, _ = self._victims.popitem(last=False)
            self._served = {k: v for k, v in self._served.items() if k[0] != old}
        program = Path(victim_dir) / EDGE_PROGRAM  # an edge victim runs as its device program
        self._victims[path] = load_victim(program if program.is_file() else victim_dir, device=self.device)
        return self._victims[path]

    def _defense(self, victim_dir: str | Path, setting: DefenseSetting) -> Defense:
        return build_defense(setting.name, setting.params, victim_dir, seed=setting.seed,
                             misinformation_epochs=setting.misinformation_epochs,
                             data_root=self.data_root, device=self.device, progress=self.progress,
                             log=self.log)


__all__ = ["EDGE_PROGRAM", "SURROGATE", "AttackStageRequest", "DefenseSetting", "StageWork"]
