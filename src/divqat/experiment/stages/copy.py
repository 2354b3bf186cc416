"""The ``copy`` kind (``victim.target: edge``): the on-device thief, who copies the victim's
program file and runs it, with no query at all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.experiment.results import CopyRow, victim_columns, victim_info
from divqat.experiment.stages.base import StageKind, register_kind

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


@register_kind
class Copy(StageKind):
    name = "copy"
    order = 60
    per_victim = True
    table = "copies"

    def plan(self, scope: PlanScope) -> list[Stage]:
        if scope.config.victim.target != "edge":  # only a device program can be copied
            return []
        return [self.stage({"name": "copy", "seed": scope.seed},
                           f"copy the device program | {scope.who} | seed {scope.seed}",
                           (scope.victim.key,), scope.seed)]

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        return work.copy(folder, task.folders["victim"])

    def summary(self, result: dict[str, Any]) -> str:
        test = result.get("fingerprint")
        owner = "" if test is None else f"; the owner's fingerprint: {'verified' if test['verified'] else 'not verified'}"
        return (result.get("note") or (f"the copy's accuracy {result['adversary_accuracy']:.1%}, "
                                       f"agreement {result['agreement']:.1%}, 0 queries")) + owner

    def rows(self, stage: Stage, ctx: RowsContext) -> list[CopyRow]:
        r = ctx.result(stage.key)
        return [{**victim_columns(victim_info(ctx.by_key[stage.inputs[0]], ctx)), "attack": "copy",
                 "thief": "file copy", "budget": 0, "queries_used": 0,
                 **{k: r.get(k) for k in ("adversary_accuracy", "adversary_error", "agreement",
                                          "max_posterior_difference", "note")},
                 "program_bytes": r["program"]["bytes"], "attack_seconds": r["attack_seconds"],
                 **_fingerprint_columns(r.get("fingerprint")), "stage": stage.key[:16]}]

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "copy (device program)"


def _fingerprint_columns(test: dict[str, Any] | None) -> dict[str, Any]:
    """The copy row's view of the owner's fingerprint test (``copy_attack``'s ``fingerprint``)."""
    if test is None:
        return {"fingerprint_verified": None, "fingerprint_agreement": None}
    return {"fingerprint_verified": test["verified"],
            "fingerprint_agreement": None if test["agreed"] is None else test["agreed"] / test["points"]}
