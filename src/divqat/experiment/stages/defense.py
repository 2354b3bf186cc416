"""The ``defense`` kind: one victim behind one defense setting, measured on the victim's test
split (defender accuracy, how far the answers moved, latency); its compiled program then serves
every attack on that victim and defense in the same worker."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.defenses import DEFENSES
from divqat.experiment.labels import defense_label, victim_kind
from divqat.experiment.results import DefenseRow, defense_columns, victim_columns, victim_info
from divqat.experiment.sizes import Sizes
from divqat.experiment.stages.base import StageKind, register_kind
from divqat.pipelines.stages import DefenseSetting

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


def defense_setting(spec: dict[str, Any], seed: int) -> DefenseSetting:
    return DefenseSetting(spec["name"], spec["params"], seed, spec.get("misinformation_epochs", 5))


def defense_specs(scope: PlanScope) -> list[dict[str, Any]]:
    """Every defense setting of the config (each defense's grid), as a defense stage is told
    it; for the victim being planned, only the defenses that serve it (``victims:``)."""
    out = []
    for d in scope.config.defenses:
        if scope.victim is not None and not d.serves(victim_kind(scope.victim.spec)):
            continue
        for params in d.grid():
            spec = {"name": d.name, "params": params, "seed": scope.seed}
            if DEFENSES.get(d.name).trains_model:
                spec["misinformation_epochs"] = d.misinformation_epochs
            out.append(spec)
    return out


@register_kind
class Defense(StageKind):
    name = "defense"
    order = 30
    per_victim = True
    table = "defenses"

    def plan(self, scope: PlanScope) -> list[Stage]:
        return [self.stage(spec, f"defense {defense_label(spec['name'], spec['params'])} | {scope.who} "
                                 f"| seed {scope.seed}", (scope.victim.key,), scope.seed)
                for spec in defense_specs(scope)]

    def provide(self, source: Stage, folder: str, folders: dict[str, str],
                context: dict[str, Any]) -> None:
        context["defense"] = source.spec

    def affinity(self, task: StageTask) -> tuple[str, ...]:
        return task.folders["victim"], repr(sorted(task.spec.items()))

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        return work.defense(folder, task.folders["victim"], defense_setting(task.spec, task.spec["seed"]))

    def summary(self, result: dict[str, Any]) -> str:
        return f"defender accuracy {result['defender_accuracy']:.1%}, L1 {result['l1_distance']:.4f}"

    def rows(self, stage: Stage, ctx: RowsContext) -> list[DefenseRow]:
        r = ctx.result(stage.key)
        victim = victim_info(ctx.by_key[stage.inputs[0]], ctx)
        return [{**victim_columns(victim), **defense_columns(stage, victim, r, ctx),
                 "victim_accuracy": r["victim_accuracy"],
                 "l1_distance": r["l1_distance"], "kl_divergence": r["kl_divergence"],
                 "queries": r["queries"], "stage": stage.key[:16]}]

    def estimate(self, spec: dict[str, Any], sizes: Sizes) -> tuple[str, float]:
        scale = sizes.pixels / 784
        units = sizes.test * scale
        if "misinformation_epochs" in spec:
            units += spec["misinformation_epochs"] * sizes.train * scale
        return f"defense {spec['name']}", units
