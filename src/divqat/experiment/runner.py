"""Run an experiment from its config: plan the stages, skip the finished ones, run the rest,
collect one long results table, write the report.

Stages, per seed, each cached under ``OUT/stages/<kind>/<key>/`` (``divqat.experiment.cache``):

    fp32     the teacher (one per seed, or one shared when ``fp32.seed`` is set)
    victim   the int8 victims: qat, and divqat per alpha, fine-tuned from the teacher
    defense  the defense metrics of one victim x defense setting on the victim's test split
    attack   one attack x transfer set x label-only flag against one victim x defense setting;
             one surrogate per budget (``attack_victim`` with the budget list)
    copy     (``victim.target: edge``) the on-device thief who copies the victim's program file

With ``victim.target: edge`` the int8 victims are trained with XNNPACK's scheme, each victim stage
also writes ``victim.pte`` (``divqat export``, no defense inside), and every defense and attack
runs against that program through the ExecuTorch runtime; the formula defenses run behind the
black box after it, which gives the answers of the same defense fused into the program to float
rounding (tests/test_edge.py).

A victim is loaded once (int8 victims compile per batch size) and reused by all its defense and
attack stages, which the plan keeps together; transfer sets are loaded once per run.

    >>> results = run_experiment(load_preset("smoke"), "runs/smoke")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

import divqat
from divqat.attacks import SurrogateTraining
from divqat.data import load_dataset, training_split
from divqat.defenses import DEFENSES
from divqat.errors import ConfigError, TrainingCollapsed
from divqat.experiment.cache import StageCache, stage_key
from divqat.experiment.config import ExperimentConfig, config_dict
from divqat.experiment.report import build_report
from divqat.experiment.results import write_results
from divqat.io import write_json, write_text
from divqat.pipelines.attack import HOLDOUT, attack_victim, load_transfer_set
from divqat.pipelines.defend import evaluate_defense
from divqat.pipelines.defense_models import build_defense
from divqat.pipelines.device_copy import copy_attack
from divqat.pipelines.export import export_victim
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.registry import params_text
from divqat.train.losses import DivQATSettings
from divqat.victim import load_victim

EDGE_PROGRAM = "victim.pte"  # in an edge victim's stage folder


@dataclass(frozen=True)
class Stage:
    """One unit of work. ``spec`` is what the stage itself is told (and hashed into ``key``);
    ``inputs`` are the keys of the stages it reads: the teacher for a victim, the victim for a
    defense, the victim and the defense for an attack."""

    kind: str
    key: str
    label: str
    spec: dict[str, Any]
    inputs: tuple[str, ...]
    seed: int


# ---------------------------------------------------------------- names used everywhere

def victim_label(mode: str, alpha: float | None = None, name: str | None = None) -> str:
    """``qat``, ``divqat a=2``, or a variant's ``<name> a=2`` (``divqat-out a=2``)."""
    return f"{name or 'divqat'} a={alpha:g}" if mode == "divqat" else mode


def defense_label(name: str, params: dict[str, Any]) -> str:
    return f"{name} {params_text(params)}".strip()


def thief_label(labels_only: bool) -> str:
    return "label-only" if labels_only else "soft"


def attack_label(name: str, params: dict[str, Any], transfer: str | None, labels_only: bool) -> str:
    parts = [name, params_text(params), thief_label(labels_only), transfer or "data-free"]
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------- the plan

def plan_stages(config: ExperimentConfig) -> list[Stage]:
    """Every stage of the experiment in run order, with its key; touches no file."""
    v = config.victim
    data = {"dataset": v.dataset, "arch": v.arch, "limit": v.limit, "holdout": v.holdout,
            "batch_size": v.batch_size}
    stages: list[Stage] = []
    planned: set[str] = set()
    for seed in config.seeds:
        teacher_seed = seed if config.fp32.seed is None else config.fp32.seed
        spec = {**data, "mode": "fp32", "epochs": config.fp32.epochs, "lr": config.fp32.lr,
                "seed": teacher_seed}
        teacher = Stage("fp32", stage_key("fp32", spec), f"fp32 teacher | seed {teacher_seed}", spec,
                        (), teacher_seed)
        if teacher.key not in planned:  # a shared teacher is trained once
            stages.append(teacher)
            planned.add(teacher.key)

        victims = []
        modes: list[tuple[str, Any, float | None]] = [("qat", config.qat, None)]
        modes += [("divqat", d, alpha) for d, alpha in config.divqat.victims()]  # variants too
        for mode, train, alpha in modes:
            spec = {**data, "mode": mode, "epochs": train.epochs, "lr": train.lr, "seed": seed}
            if v.target != "x86":  # only then: the keys of x86 victims stay what they were
                spec["target"] = v.target
            if mode == "divqat":
                spec["divqat"] = train.settings(alpha).as_dict()
                if train.name != "divqat":  # a variant's label; the section's keys stay as they were
                    spec["name"] = train.name
            victims.append(Stage("victim", stage_key("victim", spec, [teacher.key]),
                                 f"victim {victim_label(mode, alpha, spec.get('name'))} | seed {seed}", spec,
                                 (teacher.key,), seed))
        stages += victims

        for victim in victims:
            who = victim_label(victim.spec["mode"], victim.spec.get("divqat", {}).get("alpha"),
                               victim.spec.get("name"))
            defenses = []
            for d in config.defenses:
                for params in d.grid():
                    spec = {"name": d.name, "params": params, "seed": seed}
                    if DEFENSES.get(d.name).trains_model:
                        spec["misinformation_epochs"] = d.misinformation_epochs
                    label = defense_label(d.name, params)
                    defenses.append(Stage("defense", stage_key("defense", spec, [victim.key]),
                                          f"defense {label} | {who} | seed {seed}", spec,
                                          (victim.key,), seed))
            stages += defenses
            for defense in defenses:
                dlabel = defense_label(defense.spec["name"], defense.spec["params"])
                for a in config.attacks:
                    if a.defenses is not None and defense.spec["name"] not in a.defenses:
                        continue
                    for transfer in a.transfer:
                        for labels_only in a.labels_only:
                            spec = {"name": a.name, "params": a.params, "transfer": transfer,
                                    "labels_only": labels_only, "budgets": list(a.budgets),
                                    "surrogate": a.surrogate.recipe(), "seed": seed}
                            inputs = (victim.key, defense.key)
                            label = (f"attack {attack_label(a.name, a.params, transfer, labels_only)} "
                                     f"| {who} | {dlabel} | seed {seed}")
                            stages.append(Stage("attack", stage_key("attack", spec, inputs), label,
                                                spec, inputs, seed))
            if v.target == "edge":
                spec = {"name": "copy", "seed": seed}
                stages.append(Stage("copy", stage_key("copy", spec, [victim.key]),
                                    f"copy the device program | {who} | seed {seed}", spec,
                                    (victim.key,), seed))
    return stages


# ---------------------------------------------------------------- running it

class Runner:
    """Runs the planned stages of one config into ``out``; see ``run_experiment``."""

    def __init__(self, config: ExperimentConfig, out: str | Path, *, data_root: str | Path | None = None,
                 device: str = "cpu", progress: bool = True,
                 say: Callable[[str], None] | None = None) -> None:
        self.config, self.out = config, Path(out)
        self.data_root, self.device, self.progress = data_root, device, progress
        self.say = say or tqdm.write
        self.cache = StageCache(self.out)
        self.stages = plan_stages(config)
        self.by_key = {s.key: s for s in self.stages}
        self.records: dict[str, dict[str, Any]] = {}
        self.counts = {"ran": 0, "cached": 0, "skipped": 0}
        self._test = None
        self._victim_key: str | None = None
        self._victim = None
        self._defenses: dict[str, Any] = {}
        self._transfer_sets: dict[tuple, Any] = {}

    # -- data, checked before anything runs

    def check_data(self) -> None:
        """Load every dataset the config needs now: a missing folder must fail in seconds, not
        after an hour of training. Raises ``DatasetError`` naming the folder and the layout."""
        v = self.config.victim
        train = load_dataset(v.dataset, "train", self.data_root)
        self._test = load_dataset(v.dataset, "test", self.data_root)
        try:
            training_split(train, v.holdout, v.limit)
        except ConfigError as e:
            raise ConfigError(f"victim.{e}") from None
        for spec in self.config.transfer_specs():
            if spec != HOLDOUT:
                name, split = spec.split(":")
                load_dataset(name, split, self.data_root)
        for d, _ in self.config.divqat.victims():  # the outlier sets DivQAT variants name
            if d.divergence_on != "in" and not d.outliers.startswith("synth"):
                name, split = d.outliers.rsplit(":", 1)
                load_dataset(name, split, self.data_root)

    # -- the loop

    def run(self) -> dict[str, Any]:
        self.check_data()
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(self.out / "config.yaml",
                          yaml.safe_dump(config_dict(self.config), sort_keys=False))
        n = len(self.stages)
        width = len(str(n))
        bar = tqdm(total=n, desc=self.config.name, unit="stage", disable=None if self.progress else True,
                   dynamic_ncols=True)
        try:
            for i, stage in enumerate(self.stages, 1):
                head = f"[{i:>{width}}/{n}] {stage.label}"
                try:
                    self._step(stage, head)
                except KeyboardInterrupt:
                    done = self.counts["ran"] + self.counts["cached"]
                    self.say(f"interrupted during stage {i}/{n} ({stage.label}); the {done} finished "
                             f"stages are kept in {self.cache.root}: run the same command again to "
                             "resume")
                    raise
                bar.update()
        finally:
            bar.close()
        results = collect_results(self.config, self.stages, self.records)
        results["stages"] = {"total": n, **self.counts}
        write_results(results, self.out)
        build_report(results, self.out)
        return results

    def _step(self, stage: Stage, head: str) -> None:
        tokens = {k: self.records[k]["token"] for k in stage.inputs if k in self.records}
        blocked = [k for k in stage.inputs if k not in self.records
                   or self.records[k]["result"].get("collapsed")]
        if blocked:
            self.counts["skipped"] += 1
            self.say(f"{head} ... skipped ({self.by_key[blocked[0]].label} did not finish)")
            return
        record = self.cache.load(stage.kind, stage.key, tokens)
        if record is not None:
            self.counts["cached"] += 1
            self.records[stage.key] = record
            self.say(f"{head} ... cached")
            return
        self.say(f"{head} ... running")
        folder = self.cache.start(stage.kind, stage.key)
        start = time.perf_counter()
        result = getattr(self, f"_run_{stage.kind}")(stage, folder)
        seconds = time.perf_counter() - start
        self.records[stage.key] = self.cache.finish(stage.kind, stage.key, label=stage.label,
                                                    spec=stage.spec, input_tokens=tokens,
                                                    result=result, seconds=seconds)
        self.counts["ran"] += 1
        self.say(f"{' ' * (head.index(']') + 1)} done in {seconds:.0f} s: {_summary(stage.kind, result)}")

    def _detail(self, message: str) -> None:
        self.say(f"    {message}")

    # -- the four kinds of stage

    def _run_fp32(self, stage: Stage, folder: Path) -> dict[str, Any]:
        return self._train(stage, folder, teacher=None)

    def _run_victim(self, stage: Stage, folder: Path) -> dict[str, Any]:
        teacher = self.cache.folder("fp32", stage.inputs[0])
        try:
            result = self._train(stage, folder, teacher)
            if stage.spec.get("target") == "edge":
                exported = export_victim(folder, folder / EDGE_PROGRAM)
                result.update(program_bytes=exported["bytes"], export_seconds=exported["seconds"])
                self._detail(f"exported {EDGE_PROGRAM} ({exported['bytes'] / 1024:.0f} KiB, "
                             f"{exported['seconds']:.0f} s)")
            return result
        except TrainingCollapsed as e:
            # A collapsed DivQAT victim is a finding (the cliff), not a crash of the experiment:
            # it is recorded, and the stages that would attack it are skipped.
            self._detail(f"collapsed: {e}")
            return {"collapsed": True, "message": str(e)}

    def _train(self, stage: Stage, folder: Path, teacher: Path | None) -> dict[str, Any]:
        s = stage.spec
        settings = DivQATSettings(**s["divqat"]) if s["mode"] == "divqat" else DivQATSettings()
        req = TrainRequest(dataset=s["dataset"], arch=s["arch"], mode=s["mode"], out=folder,
                           epochs=s["epochs"], teacher=teacher, divqat=settings, limit=s["limit"],
                           holdout=s["holdout"], seed=s["seed"], batch_size=s["batch_size"], lr=s["lr"],
                           data_root=self.data_root, device=self.device, progress=self.progress,
                           log_epochs=self.progress, target=s.get("target", "x86"))
        metrics = train_victim(req)
        return {k: v for k, v in metrics.items() if k != "history"}

    def _run_defense(self, stage: Stage, folder: Path) -> dict[str, Any]:
        victim = self._load_victim(stage.inputs[0])
        metrics = evaluate_defense(victim, self._built_defense(stage), self._test)
        write_json(folder / "metrics.json", metrics)
        return metrics

    def _run_attack(self, stage: Stage, folder: Path) -> dict[str, Any]:
        s = stage.spec
        victim_key, defense_key = stage.inputs
        victim = self._load_victim(victim_key)
        defense = self.by_key[defense_key]
        transfer_set = None
        if s["transfer"] is not None:
            transfer_set = self._transfer_set(s["transfer"], victim.metadata)
        training = SurrogateTraining(**s["surrogate"], seed=s["seed"], device=self.device,
                                     progress=self.progress)
        return attack_victim(self.cache.folder("victim", victim_key), s["name"], s["params"],
                             budgets=s["budgets"], defense=defense.spec["name"],
                             defense_params=defense.spec["params"], transfer=s["transfer"],
                             training=training, labels_only=s["labels_only"], data_root=self.data_root,
                             device=self.device, progress=self.progress, log=self._detail, out=folder,
                             victim=victim, built_defense=self._built_defense(defense),
                             transfer_set=transfer_set)

    def _run_copy(self, stage: Stage, folder: Path) -> dict[str, Any]:
        program = self.cache.folder("victim", stage.inputs[0]) / EDGE_PROGRAM
        return copy_attack(program, data_root=self.data_root, log=self._detail, out=folder)

    # -- what is loaded once and reused

    def _load_victim(self, key: str):
        if self._victim_key != key:
            # The plan keeps each victim's stages together: one victim in memory at a time.
            self._victim, self._defenses = None, {}
            folder = self.cache.folder("victim", key)
            edge = self.by_key[key].spec.get("target") == "edge"
            self._victim = load_victim(folder / EDGE_PROGRAM if edge else folder, device=self.device)
            self._victim_key = key
        return self._victim

    def _built_defense(self, stage: Stage):
        if stage.key not in self._defenses:
            s = stage.spec
            self._defenses[stage.key] = build_defense(
                s["name"], s["params"], self.cache.folder("victim", stage.inputs[0]), seed=s["seed"],
                misinformation_epochs=s.get("misinformation_epochs", 5), data_root=self.data_root,
                device=self.device, progress=self.progress, log=self._detail)
        return self._defenses[stage.key]

    def _transfer_set(self, spec: str, meta: dict[str, Any]):
        key = (spec, meta["dataset"], int(meta.get("holdout") or 0), tuple(meta["input_shape"]))
        if key not in self._transfer_sets:
            self._transfer_sets[key] = load_transfer_set(spec, meta, self.data_root)
        return self._transfer_sets[key]


def _summary(kind: str, r: dict[str, Any]) -> str:
    if r.get("collapsed"):
        return "collapsed (recorded; its defenses and attacks are skipped)"
    if kind == "fp32":
        return f"test accuracy {r['test_accuracy']:.1%}"
    if kind == "victim":
        return f"int8 accuracy {r['int8_test_accuracy']:.1%}, KL to fp32 {r['kl_to_teacher']:.4f}"
    if kind == "defense":
        return f"defender accuracy {r['defender_accuracy']:.1%}, L1 {r['l1_distance']:.4f}"
    if kind == "copy":
        return r.get("note") or (f"the copy's accuracy {r['adversary_accuracy']:.1%}, agreement "
                                 f"{r['agreement']:.1%}, 0 queries")
    return "adversary accuracy " + ", ".join(f"{x['adversary_accuracy']:.1%} at {x['budget']}"
                                             for x in r["results"])


def run_experiment(config: ExperimentConfig, out: str | Path, *, data_root: str | Path | None = None,
                   device: str = "cpu", progress: bool = True,
                   say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment into ``out``; returns the collected results.

    Writes ``OUT/config.yaml`` (the resolved config), ``OUT/stages/...``, ``OUT/results.csv``,
    ``OUT/results.json``, ``OUT/report.md`` and ``OUT/plots/*.png``. Finished stages are reused;
    a KeyboardInterrupt (or SIGTERM turned into one by the CLI) stops after telling ``say`` that
    rerunning resumes. ``say`` gets one line per stage (default: ``tqdm.write``).
    """
    return Runner(config, out, data_root=data_root, device=device, progress=progress, say=say).run()


# ---------------------------------------------------------------- the results table

def collect_results(config: ExperimentConfig, stages: list[Stage],
                    records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flatten the finished stages into three long tables: ``victims`` (one row per trained
    model), ``defenses`` (victim x defense setting) and ``attacks`` (victim x defense x attack x
    transfer x label-only x budget), each row carrying the seed and every metric."""
    by_key = {s.key: s for s in stages}

    def victim_info(stage: Stage) -> dict[str, Any]:
        s = stage.spec
        div = s.get("divqat") or {}
        alpha = div.get("alpha", 0.0) if s["mode"] != "fp32" else None
        r = records[stage.key]["result"]
        return {"seed": stage.seed, "victim": "fp32 teacher" if s["mode"] == "fp32" else
                victim_label(s["mode"], alpha, s.get("name")), "victim_mode": s["mode"], "alpha": alpha,
                "divergence": div.get("divergence"), "cap": div.get("cap"),
                "divergence_on": div.get("divergence_on", "in") if div else None,
                "outlier_set": r.get("outlier_set"),
                "victim_accuracy": r.get("int8_test_accuracy", r.get("test_accuracy")),
                "kl_to_teacher": r.get("kl_to_teacher"), "l1_to_teacher": r.get("l1_to_teacher")}

    victims, defenses, attacks, copies = [], [], [], []
    for stage in stages:
        if stage.key not in records:
            continue
        r = records[stage.key]["result"]
        if stage.kind in ("fp32", "victim"):
            victims.append({**victim_info(stage), "test_accuracy": r.get("test_accuracy"),
                            "teacher_accuracy": r.get("teacher_test_accuracy"),
                            "train_images": r.get("train_images"), "epochs": r.get("epochs"),
                            "train_seconds": r.get("train_seconds"),
                            "kl_to_teacher_outliers": r.get("kl_to_teacher_outliers"),
                            "collapsed": bool(r.get("collapsed")), "message": r.get("message"),
                            "stage": stage.key[:16]})
        elif stage.kind == "copy":
            copies.append({**_victim_columns(victim_info(by_key[stage.inputs[0]])), "attack": "copy",
                           "thief": "file copy", "budget": 0, "queries_used": 0,
                           **{k: r.get(k) for k in ("adversary_accuracy", "adversary_error",
                                                    "agreement", "max_posterior_difference",
                                                    "note")},
                           "program_bytes": r["program"]["bytes"], "attack_seconds": r["attack_seconds"],
                           "stage": stage.key[:16]})
        elif stage.kind == "defense":
            defenses.append({**_victim_columns(victim_info(by_key[stage.inputs[0]])),
                             **_defense_columns(stage, r), "victim_accuracy": r["victim_accuracy"],
                             "l1_distance": r["l1_distance"], "kl_divergence": r["kl_divergence"],
                             "queries": r["queries"], "stage": stage.key[:16]})
        else:
            victim = victim_info(by_key[stage.inputs[0]])
            teacher = records[by_key[stage.inputs[0]].inputs[0]]["result"]
            defense = by_key[stage.inputs[1]]
            s = stage.spec
            for x in r["results"]:
                attacks.append({
                    **_victim_columns(victim),
                    "teacher_accuracy": teacher.get("test_accuracy"),
                    **_defense_columns(defense, records[defense.key]["result"]),
                    "attack": s["name"], "attack_params": params_text(s["params"]),
                    "transfer": s["transfer"] or "", "transfer_set": r.get("transfer_set") or "",
                    "labels_only": s["labels_only"], "thief": thief_label(s["labels_only"]),
                    "budget": x["budget"], "queries_used": x["queries_used"],
                    "surrogate": s["surrogate"]["arch"], "surrogate_epochs": s["surrogate"]["epochs"],
                    "adversary_accuracy": x["adversary_accuracy"], "adversary_error": x["adversary_error"],
                    "agreement": x["agreement"], "disagreement": 1.0 - x["agreement"],
                    "agreement_clean": x["agreement_clean"],
                    # The defense's distortion over this thief's own queries.
                    "l1_distance": r["l1_distance"], "kl_divergence": r["kl_divergence"],
                    "attack_seconds": x["seconds"], "stage": stage.key[:16]})
    return {"experiment": config.name, "source": config.source, "config": config_dict(config),
            "divqat_version": divqat.__version__, "victims": victims, "defenses": defenses,
            "attacks": attacks, **({"copies": copies} if copies else {})}


def _victim_columns(v: dict[str, Any]) -> dict[str, Any]:
    return {"seed": v["seed"], "victim": v["victim"], "victim_mode": v["victim_mode"], "alpha": v["alpha"],
            "divergence": v["divergence"], "cap": v["cap"], "victim_accuracy": v["victim_accuracy"],
            "kl_to_teacher": v["kl_to_teacher"], "l1_to_teacher": v["l1_to_teacher"],
            "divergence_on": v["divergence_on"], "outlier_set": v["outlier_set"]}


def _defense_columns(stage: Stage, r: dict[str, Any]) -> dict[str, Any]:
    """The defense as measured on the victim's test split (the defense stage)."""
    name, params = stage.spec["name"], stage.spec["params"]
    return {"defense": name, "defense_params": params_text(params),
            "defense_label": defense_label(name, params),
            "defender_accuracy": r["defender_accuracy"], "defender_error": 1.0 - r["defender_accuracy"],
            "argmax_changed": r["argmax_changed"], "ms_per_query_clean": r["ms_per_query_clean"],
            "ms_per_query_defended": r["ms_per_query_defended"], "latency_ratio": r["latency_ratio"]}


__all__ = ["Runner", "Stage", "collect_results", "plan_stages", "run_experiment"]
