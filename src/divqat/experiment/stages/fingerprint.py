"""The ``fingerprint`` kind (``victim.target: edge``): the false claims of the program's
ownership fingerprint.

``divqat export`` writes an IPGuard fingerprint beside each edge victim's program (Cao, Jia,
Gong, AsiaCCS 2021; ``divqat.ownership.fingerprint``), and the copy stage finds the copied file
with it. What makes that evidence is that a model never taken from the victim does not match: one
stage per edge victim and seed tests the models never stolen from it against its fingerprint, as
``divqat verify --fingerprint`` would. They are the verify kind's independent models: the other
seeds' victims of the same label (from other teachers; with a shared teacher, ``fp32.seed``, they
are not independent and are left out) and the ``watermark.independent`` models when the config
has them. A matched one is a false claim. Planned after every seed (``after_seeds``); not planned
for a single seed without independent models, nor for x86 victims (no program, no fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.experiment.labels import victim_name
from divqat.experiment.results import FingerprintRow
from divqat.experiment.stages.base import StageKind, register_kind
from divqat.experiment.stages.verify import independent_models, role_folders
from divqat.ownership import SIGNIFICANCE

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


@register_kind
class Fingerprint(StageKind):
    name = "fingerprint"
    order = 85
    after_seeds = True
    table = "fingerprints"

    def plan(self, scope: PlanScope) -> list[Stage]:
        config = scope.config
        if config.victim.target != "edge":
            return []
        significance = SIGNIFICANCE if config.watermark is None else config.watermark.significance
        stages = []
        for victim in scope.of("victim"):
            names, models = independent_models(scope, victim)
            if not models:
                continue
            label = victim_name(victim.spec, scope.with_cap)
            spec = {"victim": label, "seed": scope.seed, "significance": significance, "independent": names}
            stages.append(self.stage(spec, f"fingerprint against {len(models)} independent models | {label} "
                                           f"| seed {scope.seed}", (victim.key, *models), scope.seed,
                                     ((victim.key,), models)))
        return stages

    def usable_inputs(self, stage: Stage, ok) -> list[str] | None:
        """The victim and the independent models that finished (a failed one is left out); none
        without the victim or without any independent model."""
        (victim,), models = stage.groups
        usable = [k for k in models if ok(k)]
        return [victim, *usable] if ok(victim) and usable else None

    def wire(self, stage: Stage, sources: list[tuple[Stage, str]]) -> tuple[dict[str, str], dict[str, Any]]:
        """The victim's folder as ``victim``, each independent model's as ``independent:LABEL``."""
        labels = dict(zip(stage.groups[1], stage.spec["independent"], strict=True))
        return ({f"independent:{labels[s.key]}" if s.key in labels else "victim": folder
                 for s, folder in sources}, {})

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        return work.fingerprint_tests(folder, task.folders["victim"], role_folders(task.folders, "independent"),
                                      task.spec["significance"])

    def summary(self, result: dict[str, Any]) -> str:
        if result.get("note"):
            return result["note"]
        return (f"{result['false_claims']} of {len(result['rows'])} independent models matched the "
                f"fingerprint ({result['points']} points)")

    def rows(self, stage: Stage, ctx: RowsContext) -> list[FingerprintRow]:
        r = ctx.result(stage.key)
        return [{"seed": stage.seed, "victim": stage.spec["victim"],
                 **{k: row[k] for k in ("model", "points", "agreed", "agreement", "chance", "p_value",
                                        "verified")},
                 "significance": r["significance"], "stage": stage.key[:16]} for row in r["rows"]]

    def estimate(self, spec: dict[str, Any], sizes) -> tuple[str, float]:
        # One batch of the fingerprint's points (100 by default) per independent model.
        return "fingerprint", float(len(spec["independent"]))

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "fingerprint"
