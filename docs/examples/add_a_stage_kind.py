"""Add a stage kind: the size on disk of every int8 victim of an experiment.

One class in one file, registered with ``@register_kind``: it says how its stages are planned
(one per int8 victim, after the victim's attacks), what they read (the victim's folder, which
the victim kind provides as ``folders["victim"]``), the work, the one-line summary, the rows of
its own results table and, optionally, its estimate for ``divqat run --plan``. The runner, the
executors, the estimator and ``results.json`` pick it up from the registry; nothing else changes.
Import the module before running the experiment (for ``--executor ray``, where the Ray workers
import it too: a module of an installed package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from divqat.experiment.cache import stage_key
from divqat.experiment.labels import victim_name
from divqat.experiment.stages import (
    PlanScope,
    RowsContext,
    Stage,
    StageKind,
    StageTask,
    register_kind,
)


@register_kind
class VictimSize(StageKind):
    """Bytes on disk of one int8 victim's folder (what a thief who copies it carries away)."""

    name = "victim-size"  # its folder under OUT/stages/, and done.json's "kind"
    per_victim = True  # planned once per int8 victim ...
    order = 65  # ... after its defenses (30), calibrations (40), attacks (50) and copy (60)
    table = "victim_sizes"  # results.json gets a table of that name

    def plan(self, scope: PlanScope) -> list[Stage]:
        victim = scope.victim
        spec = {"seed": scope.seed}  # what the stage is told; its key also holds the victim's
        label = f"victim-size | {victim_name(victim.spec, scope.with_cap)} | seed {scope.seed}"
        return [Stage(self.name, stage_key(self.name, spec, [victim.key]), label, spec,
                      (victim.key,), scope.seed)]

    def perform(self, task: StageTask, work: Any, folder: Path) -> dict[str, Any]:
        files = [p for p in Path(task.folders["victim"]).rglob("*") if p.is_file()]
        return {"bytes": sum(p.stat().st_size for p in files), "files": len(files)}

    def summary(self, result: dict[str, Any]) -> str:
        return f"{result['bytes']:,} bytes in {result['files']} files"

    def rows(self, stage: Stage, ctx: RowsContext) -> list[dict[str, Any]]:
        victim = ctx.by_key[stage.inputs[0]]
        return [{"seed": stage.seed, "victim": victim_name(victim.spec, ctx.with_cap),
                 **ctx.result(stage.key), "stage": stage.key[:16]}]


def demo() -> list[str]:
    """The new kind's stages in the smoke preset's plan (planning touches no file)."""
    from divqat.experiment import load_preset, plan_stages

    labels = [s.label for s in plan_stages(load_preset("smoke")) if s.kind == VictimSize.name]
    assert labels == ["victim-size | qat | seed 0", "victim-size | divqat a=2 | seed 0",
                      "victim-size | divqat-out a=2 | seed 0"], labels
    return labels
