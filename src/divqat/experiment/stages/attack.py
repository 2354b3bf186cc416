"""The ``attack`` kind: one thief (attack x transfer set x soft or label-only) against one victim
behind one defense setting, one surrogate per query budget (``attack_victim`` with the budget
list); watched by the victim's calibrated detectors when the config has ``detectors:``.

With a watermark (``watermark:``, DAWN's rate) the victim's answers to the thief are watermarked
after the defense and its surrogates are saved, for the verify stage: one stage per rate and
budget, since each budget is then its own thief with its own marks (a smaller budget's surrogate
trained on a prefix of a larger thief's stream would be verified against marks it never saw).

A label-only thief behind a defense that may leave every label as it was also reads its twin,
the same thief behind no defense, and measures the twin's surrogates when the defense left every
label of the transfer set as it was (``may_share``; checked when it runs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.attacks import create_attack
from divqat.defenses import DEFENSES, NO_DEFENSE
from divqat.experiment.labels import attack_label, defense_label, thief_label
from divqat.experiment.results import (
    AttackRow,
    alarm_columns,
    defense_columns,
    victim_columns,
    victim_info,
)
from divqat.experiment.sizes import ARCH_COST, Sizes
from divqat.experiment.stages.base import StageKind, register_kind
from divqat.experiment.stages.defense import defense_setting
from divqat.pipelines.stages import AttackStageRequest
from divqat.registry import params_text

# A surrogate's test-split pass under bf16 autocast with BatchNorm folded, relative to fp32's
# (``eval_precision: bf16``; CPU seconds 0.85 against 2.00 for resnet8 on 5,000 images).
EVAL_BF16_COST = 0.43

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


def _thieves(attack: Any) -> list[tuple[float | None, list[int]]]:
    """(watermark rate, budgets) of each stage of an attack setting: one stage with every budget
    unwatermarked; watermarked, one per rate and budget."""
    if not attack.watermark:
        return [(None, list(attack.budgets))]
    return [(rate, [b]) for rate in attack.watermark for b in attack.budgets]


def may_share(attack: Any, defense: str, watched: bool) -> bool:
    """Whether a label-only ``attack`` behind ``defense`` may be shown exactly what it is shown
    behind no defense (``attack_victim``'s ``twin``; whether it is, is checked when it runs): the
    defense is a deterministic formula of each posterior, the thief queries only its transfer
    set, and no detector watches it."""
    return (DEFENSES.get(defense).fusable and not watched
            and create_attack(attack.name, **attack.params).queries_transfer_set_only)


@register_kind
class Attack(StageKind):
    name = "attack"
    order = 50
    per_victim = True
    table = "attacks"

    def plan(self, scope: PlanScope) -> list[Stage]:
        victim, seed = scope.victim, scope.seed
        calibrations = scope.of("calibrate")
        stages: list[Stage] = []
        # The attacks behind no defense first: a label-only thief behind a defense that may
        # leave every label as it was reads its twin behind none.
        twins: dict[tuple[int, str | None], str] = {}
        for defense in sorted(scope.of("defense"), key=lambda d: d.spec["name"] != NO_DEFENSE):
            dname = defense.spec["name"]
            dlabel = defense_label(dname, defense.spec["params"])
            for i, a in enumerate(scope.config.attacks):
                if a.defenses is not None and dname not in a.defenses:
                    continue
                for transfer in a.transfer:
                    for labels_only in a.labels_only:
                        for rate, budgets in _thieves(a):
                            spec = {"name": a.name, "params": a.params, "transfer": transfer,
                                    "labels_only": labels_only, "budgets": budgets,
                                    "surrogate": a.surrogate.recipe(), "seed": seed}
                            what = attack_label(a.name, a.params, transfer, labels_only)
                            if rate is not None:  # only then: the keys of other thieves stay
                                spec.update(watermark=rate, save_surrogates=True)
                                what += f" watermark {rate:g} at {budgets[0]}"
                            # Watched by the calibrated detectors (only when there are: the keys
                            # of configs without detectors stay what they were).
                            inputs = (victim.key, defense.key, *(c.key for c in calibrations))
                            twin = (twins.get((i, transfer)) if labels_only and dname != NO_DEFENSE
                                    and rate is None else None)  # marked answers differ: no twin
                            if twin is not None and may_share(a, dname, bool(calibrations)):
                                spec["labels_as_behind"] = NO_DEFENSE
                                inputs += (twin,)
                            label = f"attack {what} | {scope.who} | {dlabel} | seed {seed}"
                            stage = self.stage(spec, label, inputs, seed)
                            stages.append(stage)
                            if labels_only and dname == NO_DEFENSE and rate is None:
                                twins[(i, transfer)] = stage.key
        return stages

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        s = task.spec
        return work.attack(folder, task.folders["victim"],
                           defense_setting(task.context["defense"], s["seed"]), AttackStageRequest(
                               name=s["name"], params=s["params"], transfer=s["transfer"],
                               labels_only=s["labels_only"], budgets=s["budgets"],
                               surrogate=s["surrogate"], seed=s["seed"],
                               detectors={name: (task.folders[f"calibration:{name}"], params)
                                          for name, params in (task.context.get("detectors") or {}).items()},
                               twin=task.folders.get("twin"), watermark=s.get("watermark"),
                               save_surrogates=s.get("save_surrogates", False)))

    def provide(self, source: Stage, folder: str, folders: dict[str, str],
                context: dict[str, Any]) -> None:
        folders["twin"] = folder  # the same label-only thief behind no defense

    def summary(self, result: dict[str, Any]) -> str:
        line = "adversary accuracy " + ", ".join(f"{x['adversary_accuracy']:.1%} at {x['budget']}"
                                                 for x in result["results"])
        w = result.get("watermark")
        return line + (f"; {w['marked']} of {w['answered']} answers watermarked" if w else "")

    def rows(self, stage: Stage, ctx: RowsContext) -> list[AttackRow]:
        r = ctx.result(stage.key)
        victim_stage = ctx.by_key[stage.inputs[0]]
        victim = victim_info(victim_stage, ctx)
        teacher = ctx.result(victim_stage.inputs[0])
        defense = ctx.by_key[stage.inputs[1]]
        s = stage.spec
        w = r.get("watermark")
        # A watermarked thief names its rate in its setting, so that thieves of different rates
        # (and the same thief unwatermarked) are different settings in every table.
        marked = {} if w is None else {
            "watermark": w["rate"], "answers_marked": w["marked"], "test_answers_marked": w["test_answers_marked"],
            # The honest user's cost, both measured in this stage on the same test split.
            "defender_accuracy_unmarked": r["defender_accuracy"],
            "defender_accuracy_watermarked": w["defender_accuracy_watermarked"]}
        params = s["params"] if w is None else {**s["params"], "watermark": w["rate"]}
        return [{
            **victim_columns(victim),
            "teacher_accuracy": teacher.get("test_accuracy"),
            **defense_columns(defense, victim, ctx.result(defense.key), ctx),
            "attack": s["name"], "attack_params": params_text(params),
            "transfer": s["transfer"] or "", "transfer_set": r.get("transfer_set") or "",
            "labels_only": s["labels_only"], "thief": thief_label(s["labels_only"]),
            "budget": x["budget"], "queries_used": x["queries_used"],
            "surrogate": s["surrogate"]["arch"], "surrogate_epochs": s["surrogate"]["epochs"],
            "adversary_accuracy": x["adversary_accuracy"], "adversary_error": x["adversary_error"],
            "agreement": x["agreement"], "disagreement": 1.0 - x["agreement"],
            "agreement_clean": x["agreement_clean"],
            # The defense's distortion over this thief's own queries.
            "l1_distance": r["l1_distance"], "kl_divergence": r["kl_divergence"],
            "attack_seconds": x["seconds"], **alarm_columns(r, x["budget"]),
            # Measured on the surrogates of the same thief behind no defense: the defense
            # left every label of its transfer set as it was.
            "surrogates_shared": bool(r.get("surrogates_from")), **marked,
            "stage": stage.key[:16]} for x in r["results"]]

    def estimate(self, spec: dict[str, Any], sizes: Sizes) -> tuple[str, float]:
        scale = sizes.pixels / 784
        s = spec["surrogate"]
        cost = ARCH_COST.get(s["arch"], 1.0) * scale
        budgets = spec["budgets"]
        if spec.get("labels_as_behind"):  # the twin's surrogates measured: passes of the victim
            return "attack shared", sizes.test * 3 * scale
        if spec["transfer"] is None:  # data-free: the queries are the work
            return f"attack {spec['name']}", max(budgets) * scale
        passes = 0.0
        for b in budgets:
            steps_per_epoch = max(1, math.ceil(b / s.get("batch_size", 128)))
            epochs = max(s["epochs"], math.ceil(s.get("min_steps", 0) / steps_per_epoch))
            passes += epochs * b
        # The thieves that train more than one surrogate pass per stored query say how much more.
        passes *= create_attack(spec["name"], **spec["params"]).training_cost
        category = f"attack {spec['name']}" + (" bf16" if s.get("precision") == "bf16" else "")
        # The surrogates' test-split passes, cheaper in bf16 (measured 2.35x: docs/results.md).
        evaluated = sizes.test * len(budgets) * (EVAL_BF16_COST if s.get("eval_precision") == "bf16" else 1.0)
        return category, (passes + evaluated) * cost

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return label + (" (twin's surrogates)" if row.get("surrogates_shared") else "")
