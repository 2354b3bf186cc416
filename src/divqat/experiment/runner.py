"""Run an experiment from its config: plan the stages, skip the finished ones, run the rest
with an executor, collect one long results table, write the report.

Stages, per seed, each cached under ``OUT/stages/<kind>/<key>/`` (``divqat.experiment.cache``):

    fp32     the teacher (one per seed, or one shared when ``fp32.seed`` is set)
    victim   the int8 victims: qat, and divqat per alpha (and cap), fine-tuned from the teacher
    defense  the defense metrics of one victim x defense setting on the victim's test split
    attack   one attack x transfer set x label-only flag against one victim x defense setting;
             one surrogate per budget (``attack_victim`` with the budget list). A label-only
             thief behind a deterministic formula defense also reads its twin behind none,
             and measures the twin's surrogates where the defense left every label of the
             transfer set as it was (``_may_share``)
    timing   the latency of every int8 victim behind every defense of the seed, measured in
             turns in one stage: the only timings that compare across victims and defenses
    copy     (``victim.target: edge``) the on-device thief who copies the victim's program file
    calibrate  (``detectors:``) one extraction detector calibrated on one victim, and its
             false-alarm rate on honest clients; every attack stage on that victim then runs
             watched by the calibrated detectors and records when each first raised its alarm

With ``victim.target: edge`` the int8 victims are trained with XNNPACK's scheme, each victim stage
also writes ``victim.pte`` (``divqat export``, no defense inside), and every defense and attack
runs against that program through the ExecuTorch runtime; the formula defenses run behind the
black box after it, which gives the answers of the same defense fused into the program to float
rounding (tests/test_edge.py).

A stage runs as soon as the stages it reads are finished: in plan order in this process
(``SerialExecutor``), or several at a time as Ray tasks (``RayExecutor``); see
``divqat.experiment.executors``. A worker keeps its victims loaded and their defenses compiled
for the next stage that reads them, and the plan keeps each victim's stages together.

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
from divqat.attacks import create_attack
from divqat.data import load_dataset, training_split
from divqat.defenses import DEFENSES
from divqat.errors import ConfigError
from divqat.experiment.cache import StageCache, stage_key
from divqat.experiment.config import ExperimentConfig, config_dict
from divqat.experiment.executors import (
    STAGE_ERROR,
    Executor,
    Outcome,
    RunSettings,
    SerialExecutor,
    StageTask,
)
from divqat.experiment.report import build_report
from divqat.experiment.results import write_results
from divqat.io import write_text
from divqat.pipelines.attack import HOLDOUT
from divqat.registry import params_text

# The timing stage: batches of the victim's test split, each timed through every victim alone and
# served behind every defense, in a new random order each round; medians over the rounds.
TIMING = {"batch_size": 256, "batches": 4, "rounds": 10}


@dataclass(frozen=True)
class Stage:
    """One unit of work. ``spec`` is what the stage itself is told (and hashed into ``key``);
    ``inputs`` are the keys of the stages it reads: the teacher for a victim, the victim for a
    defense, the victim and the defense for an attack, every int8 victim and its defenses for
    a timing stage (``groups``: those inputs per victim)."""

    kind: str
    key: str
    label: str
    spec: dict[str, Any]
    inputs: tuple[str, ...]
    seed: int
    groups: tuple[tuple[str, ...], ...] = ()


# ---------------------------------------------------------------- names used everywhere

def victim_label(mode: str, alpha: float | None = None, cap: Any = False, name: str | None = None) -> str:
    """"qat", "divqat a=2", a variant's "<name> a=2" ("divqat-out a=2"); with ``cap`` given (a
    grid over caps), "divqat a=2 cap=0.15"."""
    if mode != "divqat":
        return mode
    return (f"{name or 'divqat'} a={alpha:g}"
            + ("" if cap is False else f" cap={'none' if cap is None else f'{cap:g}'}"))


def victim_name(spec: dict[str, Any], with_cap: bool = False) -> str:
    """The label of the victim a victim stage's ``spec`` trains."""
    if spec["mode"] == "fp32":
        return "fp32 teacher"
    div = spec.get("divqat") or {}
    return victim_label(spec["mode"], div.get("alpha"), div.get("cap") if with_cap else False,
                        spec.get("name"))


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
    with_cap = len(config.divqat.caps) > 1
    stages: list[Stage] = []
    planned: set[str] = set()
    for seed in config.seeds:
        teacher_seed = seed if config.fp32.seed is None else config.fp32.seed
        spec = {**data, "mode": "fp32", "epochs": config.fp32.epochs, "lr": config.fp32.lr,
                "seed": teacher_seed}
        if config.fp32.precision != "fp32":  # absent when fp32: the keys of older configs hold
            spec["precision"] = config.fp32.precision
        teacher = Stage("fp32", stage_key("fp32", spec), f"fp32 teacher | seed {teacher_seed}", spec,
                        (), teacher_seed)
        if teacher.key not in planned:  # a shared teacher is trained once
            stages.append(teacher)
            planned.add(teacher.key)

        victims = []
        modes: list[tuple[str, Any, Any]] = [("qat", config.qat, None)]
        modes += [("divqat", d, settings) for d, settings in config.divqat.victims()]  # variants too
        for mode, train, settings in modes:
            spec = {**data, "mode": mode, "epochs": train.epochs, "lr": train.lr, "seed": seed}
            if v.target != "x86":  # only then: the keys of x86 victims stay what they were
                spec["target"] = v.target
            if mode == "divqat":
                spec["divqat"] = settings.as_dict()
                if train.name != "divqat":  # a variant's label; the section's keys stay as they were
                    spec["name"] = train.name
            victims.append(Stage("victim", stage_key("victim", spec, [teacher.key]),
                                 f"victim {victim_name(spec, with_cap)} | seed {seed}", spec,
                                 (teacher.key,), seed))
        stages += victims

        timed: list[tuple[str, ...]] = []
        for victim in victims:
            who = victim_name(victim.spec, with_cap)
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
            timed.append((victim.key, *(d.key for d in defenses)))
            calibrations = []
            for det in config.detectors:
                spec = {"name": det.name, "params": det.params, "target_far": det.target_far,
                        "streams": det.streams, "benign_streams": det.benign_streams,
                        "length": config.stream_length(), "seed": seed}
                calibrations.append(Stage("calibrate", stage_key("calibrate", spec, [victim.key]),
                                          f"calibrate {det.name} | {who} | seed {seed}", spec,
                                          (victim.key,), seed))
            stages += calibrations
            # The attacks behind no defense first: a label-only thief behind a defense that
            # may leave every label as it was reads its twin behind none (``twin``).
            twins: dict[tuple[int, str | None], str] = {}
            for defense in sorted(defenses, key=lambda d: d.spec["name"] != "none"):
                dname = defense.spec["name"]
                dlabel = defense_label(dname, defense.spec["params"])
                for i, a in enumerate(config.attacks):
                    if a.defenses is not None and dname not in a.defenses:
                        continue
                    for transfer in a.transfer:
                        for labels_only in a.labels_only:
                            spec = {"name": a.name, "params": a.params, "transfer": transfer,
                                    "labels_only": labels_only, "budgets": list(a.budgets),
                                    "surrogate": a.surrogate.recipe(), "seed": seed}
                            # Watched by the calibrated detectors (only when there are: the
                            # keys of configs without detectors stay what they were).
                            inputs = (victim.key, defense.key, *(c.key for c in calibrations))
                            twin = twins.get((i, transfer)) if labels_only and dname != "none" else None
                            if twin is not None and _may_share(a, dname, calibrations):
                                spec["labels_as_behind"] = "none"
                                inputs += (twin,)
                            label = (f"attack {attack_label(a.name, a.params, transfer, labels_only)} "
                                     f"| {who} | {dlabel} | seed {seed}")
                            stage = Stage("attack", stage_key("attack", spec, inputs), label, spec,
                                          inputs, seed)
                            stages.append(stage)
                            if labels_only and dname == "none":
                                twins[(i, transfer)] = stage.key
            if v.target == "edge":
                spec = {"name": "copy", "seed": seed}
                stages.append(Stage("copy", stage_key("copy", spec, [victim.key]),
                                    f"copy the device program | {who} | seed {seed}", spec,
                                    (victim.key,), seed))
        stages.append(_timing_stage(config, victims, timed, seed, with_cap))
    return stages


def _may_share(attack: Any, defense: str, calibrations: list[Stage]) -> bool:
    """Whether a label-only ``attack`` behind ``defense`` may be shown exactly what it is shown
    behind no defense (``attack_victim``'s ``twin``; whether it is, is checked when it runs): the
    defense is a deterministic formula of each posterior, the thief queries only its transfer
    set, and no detector watches it."""
    return (DEFENSES.get(defense).fusable and not calibrations
            and create_attack(attack.name, **attack.params).queries_transfer_set_only)


def _timing_stage(config: ExperimentConfig, victims: list[Stage], groups: list[tuple[str, ...]],
                  seed: int, with_cap: bool) -> Stage:
    """The seed's timing stage: every int8 victim behind every defense setting, side by side."""
    defenses = []
    for d in config.defenses:
        for params in d.grid():
            entry = {"label": defense_label(d.name, params), "name": d.name, "params": params}
            if DEFENSES.get(d.name).trains_model:
                entry["misinformation_epochs"] = d.misinformation_epochs
            defenses.append(entry)
    spec = {"victims": [victim_name(v.spec, with_cap) for v in victims], "defenses": defenses,
            **TIMING, "seed": seed}
    inputs = tuple(k for group in groups for k in group)
    label = f"timing {len(victims)} victims x {len(defenses)} defenses side by side | seed {seed}"
    return Stage("timing", stage_key("timing", spec, inputs), label, spec, inputs, seed, tuple(groups))


# ---------------------------------------------------------------- running it

# What a stage that is not run now is: its own outcome (cached, skipped, failed) or an input's.
CACHED, SKIPPED, FAILED = "cached", "skipped", "failed"


def finished_records(stages: list[Stage], cache: StageCache) -> dict[str, dict[str, Any]]:
    """The ``done.json`` records of the stages that are finished and still valid (their inputs'
    tokens unchanged), walking the plan in order; touches nothing."""
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        inputs = usable_inputs(stage, records)
        if inputs is None:
            continue
        record = cache.load(stage.kind, stage.key, {k: records[k]["token"] for k in inputs})
        if record is not None:
            records[stage.key] = record
    return records


def usable_inputs(stage: Stage, records: dict[str, dict[str, Any]]) -> list[str] | None:
    """The inputs a stage reads now, or None when it cannot run: an input is missing or
    collapsed. A timing stage is the exception: it times the victims whose victim and defense
    stages all finished and leaves out the others (a collapsed DivQAT victim has nothing to time)."""
    def ok(key: str) -> bool:
        return key in records and not records[key]["result"].get("collapsed")

    if stage.kind != "timing":
        return list(stage.inputs) if all(ok(k) for k in stage.inputs) else None
    usable = [k for group in stage.groups if all(ok(k) for k in group) for k in group]
    return usable or None


class Runner:
    """Runs the planned stages of one config into ``out`` with an executor (default: serial);
    see ``run_experiment``."""

    def __init__(self, config: ExperimentConfig, out: str | Path, *, data_root: str | Path | None = None,
                 device: str = "cpu", progress: bool = True,
                 say: Callable[[str], None] | None = None, executor: Executor | None = None) -> None:
        self.config, self.out = config, Path(out).resolve()
        self.data_root = None if data_root is None else str(Path(data_root).resolve())
        self.device, self.progress = device, progress
        self.say = say or tqdm.write
        self.executor = executor or SerialExecutor()
        self.cache = StageCache(self.out)
        self.stages = plan_stages(config)
        self.with_cap = len(config.divqat.caps) > 1
        self.by_key = {s.key: s for s in self.stages}
        self.number = {s.key: i for i, s in enumerate(self.stages, 1)}
        self.records: dict[str, dict[str, Any]] = {}
        self.counts = {"ran": 0, "cached": 0, "skipped": 0, "failed": 0}
        self.failures: list[dict[str, Any]] = []
        self._state: dict[str, str] = {}  # key -> cached / skipped / failed (and done: in records)
        self._running: dict[str, float] = {}  # key -> start time
        self._ready: dict[str, StageTask] = {}  # stages that can run, waiting for a free slot

    # -- data, checked before anything runs

    def check_data(self) -> None:
        """Load every dataset the config needs now: a missing folder must fail in seconds, not
        after an hour of training. Raises ``DatasetError`` naming the folder and the layout."""
        v = self.config.victim
        train = load_dataset(v.dataset, "train", self.data_root)
        try:
            training_split(train, v.holdout, v.limit)
        except ConfigError as e:
            raise ConfigError(f"victim.{e}") from None
        load_dataset(v.dataset, "test", self.data_root)
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
        write_text(self.out / "config.yaml", yaml.safe_dump(config_dict(self.config), sort_keys=False))
        self._bar = tqdm(total=len(self.stages), desc=self.config.name, unit="stage",
                         disable=None if self.progress else True, dynamic_ncols=True)
        try:
            self.executor.start(RunSettings(str(self.out), self.data_root, self.device,
                                            self.progress, self.say))
            self._loop()
        except KeyboardInterrupt:
            self.executor.stop()
            self._interrupted()
            raise
        finally:
            self.executor.close()
            self._bar.close()
        results = collect_results(self.config, self.stages, self.records)
        results["stages"] = {"total": len(self.stages), **self.counts}
        results["failures"] = self.failures
        write_results(results, self.out)
        build_report(results, self.out)
        return results

    def _loop(self) -> None:
        pending = list(self.stages)
        finished = False
        while pending or self._running:
            pending = self._dispatch(pending)
            if finished and self.executor.slots > 1:
                self.say(self._status())  # after the freed slots were given new stages
            finished = False
            if self._running:
                for outcome in self.executor.wait(timeout=1.0):
                    self._finish(outcome)
                    finished = True
        if finished and self.executor.slots > 1:
            self.say(self._status())

    def _dispatch(self, pending: list[Stage]) -> list[Stage]:
        """Settle what needs no work (cached, skipped) and start what can run, in plan order;
        returns the stages still pending. A serial executor looks no further than the first
        stage that has to wait, so stages run and report in plan order."""
        left: list[Stage] = []
        ready: list[Stage] = []
        for n, stage in enumerate(pending):
            if stage.key in self._ready:
                ready.append(stage)  # known to need running: not looked up again
                continue
            if any(k not in self.records and k not in self._state for k in stage.inputs):
                left.append(stage)  # an input is still to come
                if self.executor.in_order:
                    return left + pending[n + 1:]
                continue
            inputs = usable_inputs(stage, self.records)
            if inputs is None:
                self._skip(stage)
                continue
            tokens = {k: self.records[k]["token"] for k in inputs}
            record = self.cache.load(stage.kind, stage.key, tokens)
            if record is not None:
                self.records[stage.key] = record
                self._settle(stage, CACHED, "cached")
                continue
            self._ready[stage.key] = self._task(stage, inputs, tokens)
            ready.append(stage)
            if self.executor.in_order:
                self._start(stage)
                return pending[n + 1:]
        while ready and len(self._running) < self.executor.slots:
            self._start(ready.pop(self.executor.pick([self._ready[s.key] for s in ready])))
        order = {s.key: i for i, s in enumerate(pending)}
        return sorted(left + ready, key=lambda s: order[s.key])

    def _task(self, stage: Stage, inputs: list[str], tokens: dict[str, str]) -> StageTask:
        folders: dict[str, str] = {}
        context: dict[str, Any] = {}
        for key in inputs:
            source = self.by_key[key]
            folder = str(self.cache.folder(source.kind, key))
            if source.kind == "fp32":
                folders["teacher"] = folder
            elif source.kind == "victim":
                folders["victim"] = folder
                if stage.kind == "timing":
                    folders[f"victim:{victim_name(source.spec, self.with_cap)}"] = folder
            elif source.kind == "defense":
                context["defense"] = source.spec
            elif source.kind == "attack":  # the same label-only thief behind no defense
                folders["twin"] = folder
            elif source.kind == "calibrate":
                folders[f"calibration:{source.spec['name']}"] = folder
                context.setdefault("detectors", {})[source.spec["name"]] = source.spec["params"]
        if stage.kind == "timing":
            folders.pop("victim", None)
            context = {}
        return StageTask(stage.kind, stage.key, stage.label, stage.spec, tokens, folders,
                         str(self.out), context)

    # -- what the user sees

    def _head(self, stage: Stage) -> str:
        n = len(self.stages)
        return f"[{self.number[stage.key]:>{len(str(n))}}/{n}] {stage.label}"

    def _start(self, stage: Stage) -> None:
        where = self.executor.submit(self._ready.pop(stage.key))
        self._running[stage.key] = time.perf_counter()
        self.say(f"{self._head(stage)} ... running" + (f" ({where})" if where else ""))

    def _settle(self, stage: Stage, state: str, line: str) -> None:
        self._state[stage.key] = state
        self.counts["cached" if state == CACHED else state] += 1
        self.say(f"{self._head(stage)} ... {line}")
        self._bar.update()

    def _skip(self, stage: Stage) -> None:
        why = ""
        for key in stage.inputs:
            label = self.by_key[key].label
            if self._state.get(key) == FAILED:
                why = f"{label} failed"
            elif self._state.get(key) == SKIPPED:
                why = f"{label} was skipped"
            elif key in self.records and self.records[key]["result"].get("collapsed"):
                why = f"{label} collapsed"
            if why:
                break
        self._settle(stage, SKIPPED, f"skipped ({why or 'an input did not finish'})")

    def _finish(self, outcome: Outcome) -> None:
        stage = self.by_key[outcome.key]
        self._running.pop(stage.key, None)
        pad = " " * (len(self._head(stage)) - len(stage.label) - 1)
        if outcome.error is not None:
            self.failures.append({"stage": stage.label, "kind": stage.kind, "error": outcome.error,
                                  "folder": str(self.cache.folder(stage.kind, stage.key))})
            self._state[stage.key] = FAILED
            self.counts["failed"] += 1
            self.say(f"{self._head(stage)} ... failed after {outcome.seconds:.0f} s: {outcome.error} "
                     f"(traceback: {self.cache.folder(stage.kind, stage.key) / STAGE_ERROR})")
        else:
            self.records[stage.key] = outcome.record
            self.counts["ran"] += 1
            result = outcome.record["result"]
            if self.executor.in_order:
                self.say(f"{pad} done in {outcome.seconds:.0f} s: {_summary(stage.kind, result)}")
            else:
                self.say(f"{self._head(stage)} ... done in {outcome.seconds:.0f} s: "
                         f"{_summary(stage.kind, result)}")
        self._bar.update()

    def _status(self) -> str:
        done = len(self.records) + len(self._state)
        running = [self.by_key[k] for k in self._running]
        left = len(self.stages) - done - len(running)
        line = f"    progress: {done}/{len(self.stages)} done, {len(running)} running"
        if running:
            now = time.perf_counter()
            line += " (" + "; ".join(f"[{self.number[s.key]}] {s.label}, {now - self._running[s.key]:.0f} s"
                                     for s in running) + ")"
        self._bar.set_postfix(running=len(running), left=left)
        return f"{line}, {left} left"

    def _interrupted(self) -> None:
        done = self.counts["ran"] + self.counts["cached"]
        running = [self.by_key[k] for k in self._running]
        what = "; ".join(f"stage {self.number[s.key]}/{len(self.stages)} ({s.label})" for s in running)
        self.say(f"interrupted during {what or 'the run'}; the {done} finished stages are kept in "
                 f"{self.cache.root}: run the same command again to resume")


def _summary(kind: str, r: dict[str, Any]) -> str:
    if r.get("collapsed"):
        return "collapsed (recorded; its defenses and attacks are skipped)"
    if kind == "fp32":
        return f"test accuracy {r['test_accuracy']:.1%}"
    if kind == "victim":
        return f"int8 accuracy {r['int8_test_accuracy']:.1%}, KL to fp32 {r['kl_to_teacher']:.4f}"
    if kind == "defense":
        return f"defender accuracy {r['defender_accuracy']:.1%}, L1 {r['l1_distance']:.4f}"
    if kind == "timing":
        return f"{len(r['rows'])} victim x defense pairs timed side by side"
    if kind == "calibrate":
        return (f"{r['detector']} threshold {r['threshold']:.6g}; false alarms {r['false_alarms']}/"
                f"{r['benign_streams']} honest streams of {r['benign_length']}")
    if kind == "copy":
        return r.get("note") or (f"the copy's accuracy {r['adversary_accuracy']:.1%}, agreement "
                                 f"{r['agreement']:.1%}, 0 queries")
    return "adversary accuracy " + ", ".join(f"{x['adversary_accuracy']:.1%} at {x['budget']}"
                                             for x in r["results"])


def run_experiment(config: ExperimentConfig, out: str | Path, *, data_root: str | Path | None = None,
                   device: str = "cpu", progress: bool = True,
                   say: Callable[[str], None] | None = None,
                   executor: Executor | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment into ``out``; returns the collected results.

    Writes ``OUT/config.yaml`` (the resolved config), ``OUT/stages/...``, ``OUT/results.csv``,
    ``OUT/results.json``, ``OUT/report.md`` and ``OUT/plots/*.png``. Finished stages are reused;
    a KeyboardInterrupt (or SIGTERM turned into one by the CLI) stops the running stages after
    telling ``say`` that rerunning resumes. A stage that fails is reported (``results["failures"]``)
    and the stages that need it are skipped; the others finish. ``say`` gets one line per stage
    (default: ``tqdm.write``). ``executor``: ``SerialExecutor()`` (the default) or a
    ``RayExecutor`` (``divqat.experiment.executors``).
    """
    return Runner(config, out, data_root=data_root, device=device, progress=progress, say=say,
                  executor=executor).run()


# ---------------------------------------------------------------- the results table

SIDE_BY_SIDE, OWN_STAGE = "side by side", "own stage"


def collect_results(config: ExperimentConfig, stages: list[Stage],
                    records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flatten the finished stages into long tables: ``victims`` (one row per trained model),
    ``defenses`` (victim x defense setting), ``attacks`` (victim x defense x attack x transfer x
    label-only x budget) and ``timings`` (victim x defense, from the timing stages), each row
    carrying the seed and every metric; and ``stage_times`` (seconds, phases and worker of every
    finished stage).

    The latency columns (``ms_per_query_*``, ``latency_ratio``) of the defense and attack rows
    come from the seed's timing stage where it finished (``timing``: "side by side"), else from
    the defense stage alone ("own stage": not comparable between victims or defenses)."""
    by_key = {s.key: s for s in stages}
    with_cap = len(config.divqat.caps) > 1

    def victim_info(stage: Stage) -> dict[str, Any]:
        s = stage.spec
        div = s.get("divqat") or {}
        alpha = div.get("alpha", 0.0) if s["mode"] != "fp32" else None
        r = records[stage.key]["result"]
        return {"seed": stage.seed, "victim": victim_name(s, with_cap), "victim_mode": s["mode"],
                "alpha": alpha, "divergence": div.get("divergence"), "cap": div.get("cap"),
                "divergence_on": div.get("divergence_on", "in") if div else None,
                "outlier_set": r.get("outlier_set"),
                "victim_accuracy": r.get("int8_test_accuracy", r.get("test_accuracy")),
                "kl_to_teacher": r.get("kl_to_teacher"), "l1_to_teacher": r.get("l1_to_teacher")}

    timings, timed = [], {}
    for stage in stages:
        if stage.kind == "timing" and stage.key in records:
            for row in records[stage.key]["result"]["rows"]:
                entry = {"seed": stage.seed, "victim": row["victim"], "defense_label": row["defense_label"],
                         **{k: row[k] for k in LATENCY}, "stage": stage.key[:16]}
                timings.append(entry)
                timed[(stage.seed, row["victim"], row["defense_label"])] = entry

    def defense_columns(stage: Stage, victim: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
        columns = _defense_columns(stage, r)
        side = timed.get((victim["seed"], victim["victim"], columns["defense_label"]))
        columns.update({k: side[k] for k in LATENCY} if side else {})
        columns["timing"] = SIDE_BY_SIDE if side else OWN_STAGE
        return columns

    victims, defenses, attacks, copies, calibrations, stage_times = [], [], [], [], [], []
    for stage in stages:
        if stage.key not in records:
            continue
        record = records[stage.key]
        r = record["result"]
        stage_times.append({"label": stage.label, "kind": stage.kind, "seed": stage.seed,
                            "seconds": record.get("seconds"), "phases": record.get("phases"),
                            "worker": record.get("worker"), "finished": record.get("finished"),
                            "stage": stage.key[:16],
                            **({"surrogates_shared": True} if r.get("surrogates_from") else {})})
        if stage.kind in ("fp32", "victim"):
            victims.append({**victim_info(stage), "test_accuracy": r.get("test_accuracy"),
                            "teacher_accuracy": r.get("teacher_test_accuracy"),
                            "train_images": r.get("train_images"), "epochs": r.get("epochs"),
                            "train_seconds": r.get("train_seconds"),
                            "kl_to_teacher_outliers": r.get("kl_to_teacher_outliers"),
                            "collapsed": bool(r.get("collapsed")), "message": r.get("message"),
                            "stage": stage.key[:16]})
        elif stage.kind == "calibrate":
            calibrations.append({**_victim_columns(victim_info(by_key[stage.inputs[0]])),
                                 "detector": r["detector"], "threshold": r["threshold"],
                                 "target_far": r["target_far"], "false_alarm_rate": r["false_alarm_rate"],
                                 "false_alarms": r["false_alarms"], "benign_streams": r["benign_streams"],
                                 "benign_length": r["benign_length"], "stage": stage.key[:16]})
        elif stage.kind == "copy":
            copies.append({**_victim_columns(victim_info(by_key[stage.inputs[0]])), "attack": "copy",
                           "thief": "file copy", "budget": 0, "queries_used": 0,
                           **{k: r.get(k) for k in ("adversary_accuracy", "adversary_error",
                                                    "agreement", "max_posterior_difference",
                                                    "note")},
                           "program_bytes": r["program"]["bytes"], "attack_seconds": r["attack_seconds"],
                           "stage": stage.key[:16]})
        elif stage.kind == "defense":
            victim = victim_info(by_key[stage.inputs[0]])
            defenses.append({**_victim_columns(victim), **defense_columns(stage, victim, r),
                             "victim_accuracy": r["victim_accuracy"],
                             "l1_distance": r["l1_distance"], "kl_divergence": r["kl_divergence"],
                             "queries": r["queries"], "stage": stage.key[:16]})
        elif stage.kind == "attack":
            victim = victim_info(by_key[stage.inputs[0]])
            teacher = records[by_key[stage.inputs[0]].inputs[0]]["result"]
            defense = by_key[stage.inputs[1]]
            s = stage.spec
            for x in r["results"]:
                attacks.append({
                    **_victim_columns(victim),
                    "teacher_accuracy": teacher.get("test_accuracy"),
                    **defense_columns(defense, victim, records[defense.key]["result"]),
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
                    "attack_seconds": x["seconds"], **_alarm_columns(r, x["budget"]),
                    # Measured on the surrogates of the same thief behind no defense: the
                    # defense left every label of its transfer set as it was.
                    "surrogates_shared": bool(r.get("surrogates_from")),
                    "stage": stage.key[:16]})
    return {"experiment": config.name, "source": config.source, "config": config_dict(config),
            "divqat_version": divqat.__version__, "victims": victims, "defenses": defenses,
            "attacks": attacks, "timings": timings, "stage_times": stage_times,
            **({"copies": copies} if copies else {}),
            **({"calibrations": calibrations} if calibrations else {})}


LATENCY = ("ms_per_query_clean", "ms_per_query_defended", "latency_ratio")


def _alarm_columns(r: dict[str, Any], budget: int) -> dict[str, Any]:
    """Per detector that watched the thief: ``alarm_<name>``, the queries until its first alarm
    (None: not raised within the largest budget), and ``detected_<name>``, whether that came
    within this row's budget (the thief's stream is the same for all its budgets)."""
    out: dict[str, Any] = {}
    for name, d in (r.get("detectors") or {}).items():
        first = d.get("first_alarm")
        out[f"alarm_{name}"] = first
        out[f"detected_{name}"] = first is not None and first <= budget
    return out


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


__all__ = ["Runner", "Stage", "collect_results", "finished_records", "plan_stages", "run_experiment",
           "usable_inputs"]
