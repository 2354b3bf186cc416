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
    independent  (``watermark.independent``) a model trained as the teacher, never stolen from
    verify   (``watermark:``) after every seed, per victim and seed: each watermarked thief's
             saved surrogate against its own marks, the independent models (the other seeds'
             victims, and the ``independent`` ones) against every thief's marks

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
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

import divqat
from divqat.data import load_dataset, training_split
from divqat.errors import ConfigError
from divqat.experiment.cache import StageCache
from divqat.experiment.config import ExperimentConfig, config_dict
from divqat.experiment.executors import (
    STAGE_ERROR,
    Executor,
    Outcome,
    RunSettings,
    SerialExecutor,
)
from divqat.experiment.labels import (
    attack_label,
    defense_label,
    thief_label,
    victim_label,
    victim_name,
)
from divqat.experiment.numerics import Numerics, mismatch
from divqat.experiment.numerics import summary as numerics_summary
from divqat.experiment.report import build_report
from divqat.experiment.results import OPTIONAL_TABLES, TABLES, write_results
from divqat.experiment.stages import STAGE_KINDS, PlanScope, RowsContext, Stage, StageTask
from divqat.experiment.stages.base import kinds_in_order
from divqat.io import write_text
from divqat.pipelines.attack import HOLDOUT

# ---------------------------------------------------------------- the plan


def plan_stages(config: ExperimentConfig) -> list[Stage]:
    """Every stage of the experiment in run order, with its key; touches no file. Per seed: the
    kinds planned once per seed, then each int8 victim's stages kind by kind, then the kinds
    planned after the victims (``StageKind.per_victim`` / ``after_victims`` / ``order``); after
    every seed, per seed, the kinds that read other seeds' stages (``after_seeds``)."""
    kinds = kinds_in_order()
    last = [k for k in kinds if k.after_seeds]
    per_seed = [k for k in kinds if not (k.per_victim or k.after_victims or k.after_seeds)]
    per_victim = [k for k in kinds if k.per_victim]
    after = [k for k in kinds if k.after_victims]
    stages: list[Stage] = []
    planned: set[str] = set()

    def add(kind, scope: PlanScope) -> None:
        new = kind.plan(scope)
        scope.add(kind, new)
        for stage in new:
            if stage.key not in planned:  # a teacher shared by the seeds is trained once
                stages.append(stage)
                planned.add(stage.key)

    scopes: list[PlanScope] = []
    for seed in config.seeds:
        scope = PlanScope(config, seed)
        scopes.append(scope)
        for kind in per_seed:
            add(kind, scope)
        for victim in scope.of("victim"):
            scope.victim = victim
            for kind in per_victim:
                add(kind, scope)
        scope.victim = None
        for kind in after:
            add(kind, scope)
    for kind in last:
        for scope in scopes:
            scope.seeds = scopes
            add(kind, scope)
    return stages


# ---------------------------------------------------------------- running it

# What a stage that is not run now is: its own outcome (cached, skipped, failed) or an input's.
CACHED, SKIPPED, FAILED = "cached", "skipped", "failed"


def reusable(cache: StageCache, stage: Stage, tokens: dict[str, str],
             wanted: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a finished stage that may stand for this run's: its inputs' tokens
    unchanged and, where ``wanted`` numerics are given (``Numerics.record()``), computed under
    them; (None, why) for one computed under other numerics; (None, None) for one to run."""
    record = cache.load(stage.kind, stage.key, tokens)
    why = None if record is None or wanted is None else mismatch(record, wanted)
    return (None, why) if why is not None else (record, None)


def finished_records(stages: list[Stage], cache: StageCache,
                     numerics: Numerics | None = None) -> dict[str, dict[str, Any]]:
    """The ``done.json`` records of the stages that are finished and still valid (their inputs'
    tokens unchanged and, where ``numerics`` is given, computed under them), walking the plan in
    order; touches nothing."""
    wanted = None if numerics is None else numerics.record()
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        inputs = usable_inputs(stage, records)
        if inputs is None:
            continue
        record, _ = reusable(cache, stage, {k: records[k]["token"] for k in inputs}, wanted)
        if record is not None:
            records[stage.key] = record
    return records


def usable_inputs(stage: Stage, records: dict[str, dict[str, Any]]) -> list[str] | None:
    """The inputs a stage reads now, or None when it cannot run: an input is missing or
    collapsed (a kind may run on part of its inputs: ``StageKind.usable_inputs``)."""
    def ok(key: str) -> bool:
        return key in records and not records[key]["result"].get("collapsed")

    return STAGE_KINDS.get(stage.kind).usable_inputs(stage, ok)


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
        self.numerics = config.numerics.record()
        self.recomputed = 0  # cached stages computed under other numerics, run again
        self.stages = plan_stages(config)
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
                                            self.progress, self.say, self.config.numerics))
            self._loop()
        except KeyboardInterrupt:
            self.executor.stop()
            self._interrupted()
            raise
        finally:
            self.executor.close()
            self._bar.close()
        results = collect_results(self.config, self.stages, self.records)
        distinct = results["numerics"]["distinct"]
        if len(distinct) > 1:
            self.say(f"warning: the stages of {self.out} were computed under different numerics "
                     f"({'; '.join(map(str, distinct))}); see report.md, 'Numerics'")
        if self.recomputed:
            self.say(f"{self.recomputed} cached stage(s) were computed under other numerics and "
                     "were run again")
        results["stages"] = {"total": len(self.stages), **self.counts,
                             **({"recomputed": self.recomputed} if self.recomputed else {})}
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
            record, why = reusable(self.cache, stage, tokens, self.numerics)
            if record is not None:
                self.records[stage.key] = record
                self._settle(stage, CACHED, "cached")
                continue
            if why is not None:
                self.recomputed += 1
                self.say(f"{self._head(stage)} ... recomputing: {why}")
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
        sources = [(self.by_key[k], str(self.cache.folder(self.by_key[k].kind, k))) for k in inputs]
        folders, context = STAGE_KINDS.get(stage.kind).wire(stage, sources)
        return StageTask(stage.kind, stage.key, stage.label, stage.spec, tokens, folders,
                         str(self.out), context, self.config.numerics)

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
                self.say(f"{pad} done in {outcome.seconds:.0f} s: {_summary(stage, result)}")
            else:
                self.say(f"{self._head(stage)} ... done in {outcome.seconds:.0f} s: "
                         f"{_summary(stage, result)}")
        self._bar.update()

    def _status(self) -> str:
        done = len(self.records.keys() | self._state.keys())  # a cached stage is in both
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


def _summary(stage: Stage, r: dict[str, Any]) -> str:
    if r.get("collapsed"):
        return "collapsed (recorded; its defenses and attacks are skipped)"
    return STAGE_KINDS.get(stage.kind).summary(r)


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

def collect_results(config: ExperimentConfig, stages: list[Stage],
                    records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flatten the finished stages into long tables (``divqat.experiment.results.TABLES``), each
    row carrying the seed and every metric: every kind gives the rows of its table
    (``StageKind.rows``: victims, defenses, attacks, timings, copies, calibrations), and every
    finished stage a ``stage_times`` row (seconds, phases and worker).

    The latency columns (``ms_per_query_*``, ``latency_ratio``) of the defense and attack rows
    come from the seed's timing stage where it finished (``timing``: "side by side"), else from
    the defense stage alone ("own stage": not comparable between victims or defenses)."""
    ctx = RowsContext(config, {s.key: s for s in stages}, records)
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    finished = [s for s in stages if s.key in records]
    for stage in finished:  # the kinds whose rows the others read first (the timings)
        kind = STAGE_KINDS.get(stage.kind)
        if kind.rows_first and kind.table:
            tables.setdefault(kind.table, []).extend(kind.rows(stage, ctx))
    for stage in finished:
        kind = STAGE_KINDS.get(stage.kind)
        record = records[stage.key]
        tables["stage_times"].append({
            "label": stage.label, "kind": stage.kind, "seed": stage.seed,
            "seconds": record.get("seconds"), "phases": record.get("phases"),
            "worker": record.get("worker"), "finished": record.get("finished"),
            "stage": stage.key[:16],
            **({"surrogates_shared": True} if record["result"].get("surrogates_from") else {})})
        if not kind.rows_first and kind.table:
            tables.setdefault(kind.table, []).extend(kind.rows(stage, ctx))
    return {"experiment": config.name, "source": config.source, "config": config_dict(config),
            "divqat_version": divqat.__version__,
            "numerics": numerics_summary([records[s.key] for s in finished], config.numerics.record()),
            # Every table of TABLES but the optional ones, and any other kind's table with rows.
            **{name: rows for name, rows in tables.items()
               if rows or (name in TABLES and name not in OPTIONAL_TABLES)}}


__all__ = ["Runner", "Stage", "attack_label", "collect_results", "defense_label", "thief_label",
           "victim_label", "victim_name", "finished_records", "plan_stages", "run_experiment",
           "usable_inputs"]
