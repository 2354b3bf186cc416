"""`divqat run --plan`: the stages of a config, which are cached, and how long the rest should
take, from the stage times already measured in the run folder (or another one) or, for kinds
never measured there, rough defaults measured on a 2-core machine.

A stage's time is modelled as ``rate x work / speedup(threads)``, with the work counted from its
settings (image passes of training and evaluation, scaled by the architecture's cost), the rate
of its category (``fp32``, ``victim qat``, ``attack knockoff bf16``, ...) taken as total
one-thread seconds over total work of the finished stages of that category, and
``speedup(threads)`` what more torch threads give one stage. Wall time is a replay of the plan
on ``slots`` workers (each stage starts when its inputs are done and a worker is free, in plan
order), with every stage taking its estimate: right to the extent the stages' times are.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from divqat.experiment.cache import StageCache
from divqat.experiment.config import ExperimentConfig
from divqat.experiment.runner import Stage, finished_records, plan_stages
from divqat.experiment.sizes import Sizes, dataset_sizes
from divqat.experiment.stages import STAGE_KINDS

# Seconds per unit of work, per category: the estimate where no finished stage says better.
# From the earlier one-seed default preset run serially with 2 threads on a quiet 2-core machine
# (CHANGELOG.md: teacher 48 s, victims 59-61 s, knockoff 38-44 s, dfme 19-20 s), the knockoff
# stages less the compilations and the test pass this version no longer repeats, and bf16
# surrogates 1.6x faster (docs/results.md, "Executors, bf16 and the plan"); the rest rough.
DEFAULT_RATES = {
    "fp32": 4.8e-4, "fp32 bf16": 3.3e-4, "victim qat": 1.2e-3, "victim divqat": 1.2e-3,
    "defense": 4e-4, "defense mad": 4e-3, "defense random-noise": 6e-4,
    "defense adaptive-misinformation": 5e-4, "attack knockoff": 3.6e-4,
    "attack knockoff bf16": 2.6e-4, "attack knockoff-adaptive": 5e-4,
    "attack knockoff-adaptive bf16": 3.5e-4, "attack jbda": 5e-4, "attack jbda bf16": 3.5e-4,
    "attack dfme": 3.9e-3, "attack maze": 4e-3, "timing": 1.2,
    # The thieves that know, bf16, from the thieves preset's run (2026-12-06/07, 2-core AMD
    # EPYC, one thread, 44-70 stages each; here at two threads as the rest): recovery 62 s,
    # FixMatch 110 s, averaging 15 s a stage, median.
    "attack recovery bf16": 7.4e-4, "attack fixmatch bf16": 3.9e-4, "attack averaging bf16": 1.1e-3,
    # A label-only thief measured on its twin's surrogates (3.4-4.0 s at one thread, victim
    # loaded, fashion-mnist[0-4] test split, 8,000-30,000 transfer images checked).
    "attack shared": 1.5e-4,
    # Per watched query of calibration and honest streams (`divqat calibrate`, as run in
    # docs/guides/detectors.md: 40 streams of 5,000 in 25 s / 72 s at one thread, i.e. 1.3e-4 /
    # 3.6e-4, given here at two threads as the rest).
    "calibrate prada": 9e-5, "calibrate mmd": 2.5e-4,
    # Per test of a verify stage (a stolen surrogate, or an independent model, against one
    # thief's marks), loading included: 1.1-3.2 s for 6 tests of the tests' tiny models (one
    # thread, 2026-12-06); rough.
    "verify": 0.3,
}


# Stage CPU time in fp32 over bf16 where both were measured (docs/results.md, "Where the time
# goes": the default preset's teacher and victims, old and new path in turns over 3 seeds): a
# bf16 category that no finished stage measured takes its fp32 category's measured rate over this.
BF16_SPEEDUP = {"fp32": 1.54, "victim qat": 1.15, "victim divqat": 1.25}


# One stage with t torch threads runs speedup(t) = min(t, MAX_USEFUL_THREADS) ** THREAD_EXPONENT
# times faster than with one. Fitted on this 2-core machine (docs/results.md, "Executors, bf16 and
# the plan"): the same 47 stages took 235 s of stage time at 2 threads and 416 s at 1, a speedup
# of 1.77 = 2^0.82.
THREAD_EXPONENT = 0.8
MAX_USEFUL_THREADS = 4
DEFAULT_THREADS = 2  # the threads of DEFAULT_RATES, and of records that do not say


def speedup(threads: int) -> float:
    return max(1, min(threads, MAX_USEFUL_THREADS)) ** THREAD_EXPONENT


def work(kind: str, spec: dict[str, Any], sizes: Sizes) -> tuple[str, float]:
    """(category, units of work) of a stage from its kind and settings (``StageKind.estimate``)."""
    if kind not in STAGE_KINDS:
        return kind, 1.0
    return STAGE_KINDS.get(kind).estimate(spec, sizes)


def _default_rate(category: str) -> float:
    """A category's default rate, at one thread."""
    base = category.removesuffix(" bf16")
    # bf16 trains faster where the CPU has it; without a measurement, assume fp32's rate.
    rate = DEFAULT_RATES.get(category, DEFAULT_RATES.get(base, DEFAULT_RATES.get(base.split(" ")[0], 1e-3)))
    return rate * speedup(DEFAULT_THREADS)


def rates(records: Iterable[dict[str, Any]], sizes: Sizes) -> dict[str, tuple[float, int]]:
    """(one-thread seconds per unit, stages measured) per category, from finished stages'
    records (each at the threads it says it ran with)."""
    seconds: dict[str, float] = defaultdict(float)
    units: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for r in records:
        if r.get("result", {}).get("collapsed") or not r.get("seconds"):
            continue
        try:
            category, u = work(r["kind"], r["spec"], sizes)
        except (KeyError, TypeError):
            continue
        threads = (r.get("worker") or {}).get("threads") or DEFAULT_THREADS
        seconds[category] += r["seconds"] * speedup(threads)
        units[category] += u
        count[category] += 1
    return {c: (seconds[c] / units[c], count[c]) for c in seconds if units[c] > 0}


def category_rate(category: str, fitted: dict[str, tuple[float, int]]) -> tuple[float, str]:
    """(one-thread seconds per unit, how it was had) of a category: "measured" (``fitted``, from
    ``rates``), "derived" (a bf16 category from its measured fp32 one over ``BF16_SPEEDUP``) or
    "default" (``DEFAULT_RATES``)."""
    base = category.removesuffix(" bf16")
    if category in fitted:
        return fitted[category][0], "measured"
    if base != category and base in fitted and base in BF16_SPEEDUP:
        return fitted[base][0] / BF16_SPEEDUP[base], "derived"
    return _default_rate(category), "default"


def wall_time(stages: list[Stage], seconds: dict[str, float], slots: int) -> float:
    """The plan replayed on ``slots`` workers as the runner schedules it: whenever a worker is
    free, it takes the first stage in plan order whose inputs are done; returns the finish time."""
    finish: dict[str, float] = {}
    running: list[float] = []  # end times
    pending = list(stages)
    now = 0.0
    while pending:
        scheduled = True
        while scheduled and len(running) < max(1, slots):
            scheduled = False
            for n, stage in enumerate(pending):
                if all(finish.get(k, math.inf) <= now for k in stage.inputs):
                    took = seconds.get(stage.key, 0.0)
                    finish[stage.key] = now + took
                    if took > 0:  # a cached stage takes no worker
                        heapq.heappush(running, now + took)
                    del pending[n]
                    scheduled = True
                    break
        if not pending or not running:
            break
        now = heapq.heappop(running)
        while running and running[0] <= now:
            heapq.heappop(running)
    return max(finish.values(), default=0.0)


def duration(seconds: float) -> str:
    """"45 s", "12 min", "3 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def plan_lines(config: ExperimentConfig, out: str | Path, *, cores: int, cpus_per_stage: int | None = None,
               executor: str = "serial", times_from: Iterable[str | Path] = (),
               data_root: str | None = None, every_stage: bool = True) -> list[str]:
    """What ``divqat run --plan`` prints: one line per stage (cached, or to run with its
    estimate under ``executor``), the stages per kind, and the estimated wall time one stage at
    a time and ``cores // cpus_per_stage`` at a time. Every stage runs with the config's
    ``numerics.threads`` torch threads under either executor; ``cpus_per_stage`` (default: those
    threads) is what a Ray worker reserves."""
    threads = config.numerics.threads
    cpus_per_stage = cpus_per_stage or threads
    stages = plan_stages(config)
    cache = StageCache(out)
    done = finished_records(stages, cache, config.numerics)
    sizes = dataset_sizes(config.victim.dataset, data_root)
    measured = cache.records() if cache.root.is_dir() else []
    sources = [str(Path(out))] if measured else []
    for folder in times_from:
        if Path(folder).resolve() == Path(out).resolve():
            continue  # the run folder itself: its stages are counted once
        more = StageCache(folder).records()
        if more:
            measured += more
            sources.append(str(folder))
    fitted = rates(measured, sizes)
    one_thread, guessed, derived = {}, set(), set()
    for stage in stages:
        if stage.key in done:
            continue
        category, units = work(stage.kind, stage.spec, sizes)
        rate, how = category_rate(category, fitted)
        {"derived": derived, "default": guessed}.get(how, set()).add(category)
        one_thread[stage.key] = rate * units
    slots = max(1, cores // cpus_per_stage)
    serial = {k: v / speedup(threads) for k, v in one_thread.items()}
    parallel = {k: v / speedup(min(threads, cpus_per_stage)) for k, v in one_thread.items()}
    estimate = parallel if executor == "ray" else serial

    n = len(stages)
    width = len(str(n))
    lines = [f"plan: {config.name} ({config.source}) -> {out}: {n} stages, {len(done)} cached, "
             f"{n - len(done)} to run; seeds {', '.join(map(str, config.seeds))}"]
    if every_stage:
        for i, stage in enumerate(stages, 1):
            state = "cached" if stage.key in done else f"to run, ~{duration(estimate[stage.key])}"
            lines.append(f"  [{i:>{width}}/{n}] {stage.label} ... {state}")
    kinds: dict[str, list[Stage]] = defaultdict(list)
    for stage in stages:
        kinds[stage.kind].append(stage)
    lines.append("stages per kind: " + "; ".join(
        f"{kind} {len(group)} ({sum(s.key not in done for s in group)} to run, "
        f"~{duration(sum(estimate.get(s.key, 0.0) for s in group))})" for kind, group in kinds.items()))
    total = sum(estimate.values())
    basis = (f"rates from {sum(c for _, c in fitted.values())} finished stages in {', '.join(sources)}"
             if fitted else "no finished stages to measure from")
    if derived:
        basis += f"; from the fp32 rates and the measured bf16 speedups for {', '.join(sorted(derived))}"
    if guessed:
        basis += f"; rough defaults for {', '.join(sorted(guessed))}"
    lines.append(f"estimated stage time to run: {duration(total)} with --executor {executor} ({basis})")
    line = (f"estimated wall time: {duration(wall_time(stages, serial, 1))} one stage at a time "
            f"with {threads} thread{'s' if threads > 1 else ''} (--executor serial)")
    if slots > 1 or executor == "ray":
        line += (f"; {duration(wall_time(stages, parallel, slots))} with {slots} stages at a time, "
                 f"{threads} thread{'s' if threads > 1 else ''} each (--executor ray "
                 f"on {cores} cores)")
    lines.append(line)
    lines.append(f"  (a stage with t threads taken as min(t, {MAX_USEFUL_THREADS})^{THREAD_EXPONENT:g} "
                 "times faster than with one; stages that share a loaded machine take longer)")
    return lines


__all__ = ["BF16_SPEEDUP", "DEFAULT_RATES", "THREAD_EXPONENT", "category_rate", "duration",
           "plan_lines", "rates", "speedup", "wall_time", "work"]
