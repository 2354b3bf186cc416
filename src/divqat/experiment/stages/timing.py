"""The ``timing`` kind: the latency of every int8 victim of a seed behind every defense of the
config, measured in turns in one stage (batches of the test split, each timed through every
victim alone and served behind every defense, in a new random order each round; medians over
the rounds): the only timings that compare across victims and defenses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.experiment.labels import defense_label, victim_name
from divqat.experiment.results import LATENCY, TimingRow
from divqat.experiment.stages.base import StageKind, register_kind
from divqat.experiment.stages.defense import defense_setting, defense_specs

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask

TIMING = {"batch_size": 256, "batches": 4, "rounds": 10}


@register_kind
class Timing(StageKind):
    name = "timing"
    order = 70
    after_victims = True
    table = "timings"
    rows_first = True  # the defense and attack rows take their latency from these

    def plan(self, scope: PlanScope) -> list[Stage]:
        victims = scope.of("victim")
        defenses = []
        for spec in defense_specs(scope):
            entry = {"label": defense_label(spec["name"], spec["params"]), "name": spec["name"],
                     "params": spec["params"]}
            if "misinformation_epochs" in spec:
                entry["misinformation_epochs"] = spec["misinformation_epochs"]
            defenses.append(entry)
        groups = tuple((v.key, *(d.key for d in scope.of("defense", v))) for v in victims)
        # A defense that serves only some victims (its ``victims:``) is timed behind those
        # (said only then: the keys of other configs' timing stages stay what they were).
        behind = {victim_name(v.spec, scope.with_cap): {defense_label(d.spec["name"], d.spec["params"])
                                                         for d in scope.of("defense", v)} for v in victims}
        for entry in defenses:
            served = [v for v, labels in behind.items() if entry["label"] in labels]
            if len(served) < len(victims):
                entry["victims"] = served
        spec = {"victims": [victim_name(v.spec, scope.with_cap) for v in victims],
                "defenses": defenses, **TIMING, "seed": scope.seed}
        inputs = tuple(k for group in groups for k in group)
        label = f"timing {len(victims)} victims x {len(defenses)} defenses side by side | seed {scope.seed}"
        return [self.stage(spec, label, inputs, scope.seed, groups)]

    def usable_inputs(self, stage: Stage, ok) -> list[str] | None:
        """The victims whose victim and defense stages all finished; the others are left out
        (a collapsed DivQAT victim has nothing to time)."""
        usable = [k for group in stage.groups if all(ok(k) for k in group) for k in group]
        return usable or None

    def wire(self, stage: Stage, sources: list[tuple[Stage, str]]) -> tuple[dict[str, str], dict[str, Any]]:
        folder = dict((s.key, f) for s, f in sources)
        return ({f"victim:{label}": folder[group[0]]
                 for label, group in zip(stage.spec["victims"], stage.groups, strict=True)
                 if group[0] in folder}, {})

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        s = task.spec
        victims = {role.split(":", 1)[1]: path for role, path in task.folders.items()
                   if role.startswith("victim:")}
        settings = [(d["label"], defense_setting(d, s["seed"])) for d in s["defenses"]]
        only = {d["label"]: d["victims"] for d in s["defenses"] if "victims" in d}
        return work.timing(folder, victims, settings, batch_size=s["batch_size"],
                           batches=s["batches"], rounds=s["rounds"], seed=s["seed"], only=only)

    def summary(self, result: dict[str, Any]) -> str:
        return f"{len(result['rows'])} victim x defense pairs timed side by side"

    def rows(self, stage: Stage, ctx: RowsContext) -> list[TimingRow]:
        timed = ctx.shared.setdefault("timed", {})
        rows = []
        for row in ctx.result(stage.key)["rows"]:
            entry = {"seed": stage.seed, "victim": row["victim"], "defense_label": row["defense_label"],
                     **{k: row[k] for k in LATENCY}, "stage": stage.key[:16]}
            rows.append(entry)
            timed[(stage.seed, row["victim"], row["defense_label"])] = entry
        return rows

    def estimate(self, spec: dict[str, Any], sizes) -> tuple[str, float]:
        return "timing", float(sum(len(d.get("victims", spec["victims"])) for d in spec["defenses"]))

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "timing"
