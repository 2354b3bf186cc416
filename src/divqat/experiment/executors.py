"""Where an experiment's stages run: one after another in this process (``serial``), or as Ray
tasks on this machine or a cluster (``ray``).

The runner (``divqat.experiment.runner``) decides what runs and when: it hands an executor a
``StageTask`` as soon as the stages the task reads are finished and the executor has a free
slot, and gets an ``Outcome`` back. ``run_stage`` is what every executor does with a task, in
whatever process: start the stage's folder in the cache, do the work (``divqat.pipelines.stages``)
under a stopwatch, and write ``done.json`` with the result, the seconds, where they went
(``phases``) and where the stage ran (``worker``). A stage that raises leaves its traceback in
``error.txt`` and comes back as an error; the folder without ``done.json`` is redone next time.

``RayExecutor`` keeps a pool of stage workers (Ray actors), one per ``cpus_per_stage`` CPUs of
the cluster, each with torch's thread count set to its share. A worker keeps the victims, defenses
and compiled programs of the stages it ran (``StageWork``), and a freed worker is handed the ready
stage that reads what it already has, so an attack usually finds its victim loaded and its
defense compiled.
"""

from __future__ import annotations

import abc
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

import divqat
from divqat.errors import ConfigError
from divqat.experiment.cache import StageCache
from divqat.experiment.numerics import Numerics
from divqat.experiment.stages import STAGE_KINDS, StageTask
from divqat.pipelines.stages import StageWork
from divqat.stopwatch import measuring

EXECUTORS = ("serial", "ray")
STAGE_LOG, STAGE_ERROR = "stage.log", "error.txt"


@dataclass(frozen=True)
class Outcome:
    """A finished stage's ``done.json`` record, or the one-line error of a failed one."""

    key: str
    record: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSettings:
    """What every stage of a run shares: the run folder, data, device, output and numerics."""

    root: str
    data_root: str | None = None
    device: str = "cpu"
    progress: bool = True
    say: Callable[[str], None] = print
    numerics: Numerics = field(default_factory=Numerics)


def worker_info(executor: str, **more: Any) -> dict[str, Any]:
    """Where a stage runs (``run_stage`` adds the torch threads it runs with)."""
    return {"executor": executor, "host": socket.gethostname(), "pid": os.getpid(), **more}


# ---------------------------------------------------------------- one stage, in any process

def perform(task: StageTask, work: StageWork, folder: Path) -> dict[str, Any]:
    """The work of one stage: its kind's (``StageKind.perform``)."""
    return STAGE_KINDS.get(task.kind).perform(task, work, folder)


def run_stage(task: StageTask, work: StageWork, worker: dict[str, Any],
              echo: Callable[[str], None] | None = None) -> Outcome:
    """Run one stage into its cache folder; never raises for a failing stage (a KeyboardInterrupt
    goes through). ``echo`` also hears the stage's log lines (kept in ``stage.log``)."""
    cache = StageCache(task.root)
    folder = cache.start(task.kind, task.key)
    start = time.perf_counter()
    with open(folder / STAGE_LOG, "a") as log, measuring() as watch:
        def say(message: str) -> None:
            log.write(message + "\n")
            log.flush()
            if echo is not None:
                echo(message)

        work.log = say
        worker = {**worker, "threads": task.numerics.threads}
        try:
            with task.numerics.applied():
                result = perform(task, work, folder)
        except Exception as e:  # reported, and the stages that need this one are skipped
            (folder / STAGE_ERROR).write_text(traceback.format_exc())
            return Outcome(task.key, error=error_line(e), seconds=time.perf_counter() - start,
                           worker=worker)
    seconds = time.perf_counter() - start
    phases = {k: round(v, 3) for k, v in sorted(watch.totals.items(), key=lambda kv: -kv[1])}
    phases["other"] = round(max(0.0, seconds - sum(watch.totals.values())), 3)
    record = cache.finish(task.kind, task.key, label=task.label, spec=task.spec,
                          input_tokens=task.tokens, result=result, seconds=seconds,
                          phases=phases, worker=worker, numerics=task.numerics.record())
    return Outcome(task.key, record=record, seconds=seconds, worker=worker)


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------- executors

class Executor(abc.ABC):
    """Runs the tasks the runner submits, ``slots`` at a time."""

    name: ClassVar[str] = ""
    # Whether stages run in plan order, one at a time (the runner then looks no further ahead).
    in_order: ClassVar[bool] = False

    def start(self, run: RunSettings) -> None:
        """Get ready (start workers); called once the run folder exists."""
        self.run = run

    @property
    @abc.abstractmethod
    def slots(self) -> int:
        """How many stages may run at once."""

    @abc.abstractmethod
    def submit(self, task: StageTask) -> str:
        """Start a task; returns where it runs, in words (empty when that says nothing)."""

    def pick(self, ready: list[StageTask]) -> int:
        """Which of the ready tasks (in plan order) to submit next: the first by default."""
        return 0

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of finished tasks; empty when none finished within ``timeout`` seconds."""

    def stop(self) -> None:  # noqa: B027 - nothing to cancel unless an executor says so
        """Cancel the running tasks (after an interrupt)."""

    def close(self) -> None:  # noqa: B027
        """Release the workers."""


class SerialExecutor(Executor):
    """One stage at a time in this process, in plan order, each with the run's torch threads
    (``numerics.threads``)."""

    name = "serial"
    in_order = True

    def start(self, run: RunSettings) -> None:
        super().start(run)
        self.work = StageWork(data_root=run.data_root, device=run.device, progress=run.progress)
        self._queue: list[StageTask] = []

    @property
    def slots(self) -> int:
        return 1

    def submit(self, task: StageTask) -> str:
        self._queue.append(task)
        return ""

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._queue:
            return []
        task = self._queue.pop(0)
        return [run_stage(task, self.work, worker_info(self.name),
                          echo=lambda message: self.run.say(f"    {message}"))]


class _StageWorker:
    """A Ray actor that runs stages: one process, ``threads`` torch threads between stages (a
    stage runs with its numerics' threads), its own StageWork."""

    def __init__(self, run: dict[str, Any], threads: int) -> None:
        self.threads = threads
        torch.set_num_threads(threads)
        self.work = StageWork(data_root=run["data_root"], device=run["device"], progress=False)
        import ray

        context = ray.get_runtime_context()
        self.info = {"node": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}

    def probe(self, path: str, token: str) -> dict[str, Any]:
        try:
            sees = Path(path).read_text() == token
        except OSError:
            sees = False
        return {**self.info, "host": socket.gethostname(), "sees": sees,
                "divqat": os.path.realpath(divqat.__file__)}

    def run(self, task: StageTask) -> Outcome:
        torch.set_num_threads(self.threads)  # a stage must not have changed it for the next
        return run_stage(task, self.work, worker_info("ray", **self.info))


class RayExecutor(Executor):
    """Stages as Ray tasks on a pool of stage workers, one per ``cpus_per_stage`` CPUs (default:
    the run's ``numerics.threads``, the torch threads every stage runs with).

    ``address``: a running cluster (``ray.init(address)``; ``RAY_ADDRESS`` when not given); with
    neither, a local Ray instance is started on this machine's cores and stopped at the end.
    The run folder must be visible at the same path on every node: checked at the start.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_stage: int | None = None) -> None:
        if cpus_per_stage is not None and (isinstance(cpus_per_stage, bool)
                                           or not isinstance(cpus_per_stage, int) or cpus_per_stage < 1):
            raise ConfigError(f"--cpus-per-stage must be an integer >= 1, got {cpus_per_stage!r}")
        self.address, self.cpus_per_stage = address, cpus_per_stage
        self._started_ray = False
        self._workers: list[Any] = []
        self._where: list[str] = []
        self._holds: list[tuple[str, ...]] = []
        self._busy: dict[Any, tuple[int, StageTask]] = {}

    def start(self, run: RunSettings) -> None:
        super().start(run)
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            raise ConfigError("--executor ray needs Ray: pip install ray==2.60.0") from None
        self.ray = ray
        if self.cpus_per_stage is None:
            self.cpus_per_stage = run.numerics.threads
        if not ray.is_initialized():
            self._init(ray)
        self._actor = ray.remote(_StageWorker)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        per_node = [int(n.get("Resources", {}).get("CPU", 0)) // self.cpus_per_stage for n in nodes]
        if sum(per_node) < 1:
            most = max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=0)
            raise ConfigError(f"--cpus-per-stage {self.cpus_per_stage}: no Ray node has that many "
                              f"CPUs (the largest has {most})")
        self._settings = {"data_root": run.data_root, "device": run.device}
        for _ in range(sum(per_node)):
            self._add_worker()
        self._check_workers()

    def _init(self, ray) -> None:
        env = {k: os.environ[k] for k in ("DIVQAT_DATA",) if k in os.environ}
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                                  "runtime_env": {"env_vars": env} if env else None}
        address = self.address or os.environ.get("RAY_ADDRESS")
        if not address:  # a local instance, only for this run
            kwargs["include_dashboard"] = False
        # ray.init replaces the SIGTERM handler with sys.exit; the CLI's (stop like Ctrl-C and
        # keep the finished stages) is put back.
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        try:
            ray.init(address=address or None, **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cannot reach the Ray cluster at {address}: {error_line(e)}") from None
        finally:
            if main and handler is not None:
                signal.signal(signal.SIGTERM, handler)
        self._started_ray = True

    def _add_worker(self, index: int | None = None) -> None:
        worker = self._actor.options(num_cpus=self.cpus_per_stage).remote(self._settings,
                                                                          self.cpus_per_stage)
        if index is None:
            self._workers.append(worker)
            self._where.append("")
            self._holds.append(())
        else:
            self._workers[index], self._where[index], self._holds[index] = worker, "", ()

    def _check_workers(self) -> None:
        """Every worker must see the run folder (shared storage) and, on this machine, import
        the same divqat as this process."""
        probe = Path(self.run.root) / f".divqat-probe-{uuid.uuid4().hex[:8]}"
        token = uuid.uuid4().hex
        probe.write_text(token)
        try:
            answers = self.ray.get([w.probe.remote(str(probe), token) for w in self._workers])
        finally:
            probe.unlink(missing_ok=True)
        blind = sorted({a["node_ip"] for a in answers if not a["sees"]})
        if blind:
            raise ConfigError(f"the run folder {self.run.root} is not on storage every Ray node "
                              f"sees: node(s) {', '.join(blind)} cannot read it; put --out on a "
                              "file system shared by all nodes, at the same path")
        mine = os.path.realpath(divqat.__file__)
        host = socket.gethostname()
        other = sorted({a["divqat"] for a in answers if a["host"] == host and a["divqat"] != mine})
        if other:
            raise ConfigError(f"the Ray workers import divqat from {other[0]}, this process from "
                              f"{mine}: start Ray from the same environment (virtualenv, PYTHONPATH)")
        for i, a in enumerate(answers):
            self._where[i] = f"worker {i + 1} on {a['node_ip']}"

    @property
    def slots(self) -> int:
        return len(self._workers)

    def _idle(self) -> list[int]:
        busy = {i for i, _ in self._busy.values()}
        return [i for i in range(len(self._workers)) if i not in busy]

    def pick(self, ready: list[StageTask]) -> int:
        """A ready stage that reads what an idle worker holds (the same victim and defense, else
        the same victim), else the first."""
        holds = [self._holds[i] for i in self._idle()]
        for depth in (2, 1):
            for n, task in enumerate(ready):
                mine = task.affinity()[:depth]
                if len(mine) == depth and any(h[:depth] == mine for h in holds):
                    return n
        return 0

    def submit(self, task: StageTask) -> str:
        idle = self._idle()
        if not idle:
            raise RuntimeError("no idle Ray stage worker")
        mine = task.affinity()
        best = max(idle, key=lambda i: (self._holds[i][:2] == mine[:2] and bool(mine),
                                        self._holds[i][:1] == mine[:1] and bool(mine),
                                        not self._holds[i]))
        ref = self._workers[best].run.remote(task)
        self._busy[ref] = (best, task)
        if mine:
            self._holds[best] = mine
        return self._where[best]

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._busy:
            return []
        ready, _ = self.ray.wait(list(self._busy), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            index, task = self._busy.pop(ref)
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as e:  # the worker process died (memory, a crash)
                out.append(Outcome(task.key, error=f"the Ray worker running it died ({error_line(e)})",
                                   worker={"executor": "ray", "where": self._where[index]}))
                self._add_worker(index)
                self._check_workers()
        return out

    def stop(self) -> None:
        """Kill the workers that run a stage: their folders lack done.json and run next time."""
        for index, _ in list(self._busy.values()):
            self.ray.kill(self._workers[index], no_restart=True)
        self._busy.clear()

    def close(self) -> None:
        if not hasattr(self, "ray"):  # never started
            return
        for worker in self._workers:
            try:
                self.ray.kill(worker, no_restart=True)
            except Exception:  # already gone
                pass
        self._workers = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False


def make_executor(name: str = "serial", *, address: str | None = None,
                  cpus_per_stage: int | None = None) -> Executor:
    """``serial`` or ``ray`` (``address``, ``cpus_per_stage``: see ``RayExecutor``)."""
    if name == "serial":
        return SerialExecutor()
    if name == "ray":
        return RayExecutor(address, cpus_per_stage)
    raise ConfigError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Executor", "Outcome", "RayExecutor", "RunSettings", "SerialExecutor",
           "StageTask", "make_executor", "perform", "run_stage"]
