"""The ``verify`` kind (``watermark:``): ``divqat verify`` for every stolen surrogate of a victim,
and the false claims on models never stolen from.

One stage per victim and seed that watermarked thieves attacked. Each thief's saved surrogate is
tested against that thief's own marks (DAWN, Szyller et al., ACM MM 2021: the mark agreement
against the chance measured on the surrogate's answers to the controls, a one-sided binomial
p-value, verified below ``watermark.significance``). The independent models are tested against
every thief's marks: a verified one is a false claim. They are the other seeds' victims of the
same label (trained from another teacher: with a shared teacher, ``fp32.seed``, they are not
independent and are left out) and the models of ``watermark.independent`` (same training images,
other architectures and seeds). Planned after every seed (``after_seeds``), since it reads the
other seeds' victims."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.experiment.labels import defense_label, thief_label, victim_name
from divqat.experiment.results import VerificationRow
from divqat.experiment.stages.base import StageKind, register_kind
from divqat.experiment.stages.train import independent_label
from divqat.registry import params_text

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


def victim_model_label(stage: Stage, with_cap: bool = False) -> str:
    """"qat seed 1": another seed's victim standing as an independent model."""
    return f"{victim_name(stage.spec, with_cap)} seed {stage.seed}"


def independent_models(scope: PlanScope, victim: Stage) -> tuple[list[str], tuple[str, ...]]:
    """The models never stolen from ``victim``, as (their labels, their stage keys): the other
    seeds' victims of its label trained from another teacher (with a shared teacher,
    ``fp32.seed``, they are not independent and are left out), then the config's
    ``independent`` models."""
    label = victim_name(victim.spec, scope.with_cap)
    others = [v for other in scope.seeds if other.seed != scope.seed for v in other.of("victim")
              if victim_name(v.spec, scope.with_cap) == label and v.inputs != victim.inputs]
    extra = scope.of("independent")
    return ([victim_model_label(v, scope.with_cap) for v in others] + [independent_label(m.spec) for m in extra],
            tuple(m.key for m in (*others, *extra)))


def role_folders(folders: dict[str, str], role: str) -> dict[str, str]:
    """A stage's input folders wired as ``ROLE:NAME``, by NAME."""
    return {name.split(":", 1)[1]: path for name, path in folders.items() if name.startswith(f"{role}:")}


@register_kind
class Verify(StageKind):
    name = "verify"
    order = 80
    after_seeds = True
    table = "verifications"

    def plan(self, scope: PlanScope) -> list[Stage]:
        config = scope.config
        if config.watermark is None:
            return []
        stages = []
        for victim in scope.of("victim"):
            thieves = [a for a in scope.of("attack", victim) if "watermark" in a.spec]
            if not thieves:
                continue
            label = victim_name(victim.spec, scope.with_cap)
            names, models = independent_models(scope, victim)
            spec = {"victim": label, "seed": scope.seed, "significance": config.watermark.significance,
                    "thieves": [a.label for a in thieves], "independent": names}
            inputs = (*(a.key for a in thieves), *models)
            groups = (tuple(a.key for a in thieves), models)
            stages.append(self.stage(spec, f"verify {len(thieves)} stolen surrogates and "
                                           f"{len(spec['independent'])} independent models | {label} "
                                           f"| seed {scope.seed}", inputs, scope.seed, groups))
        return stages

    def usable_inputs(self, stage: Stage, ok) -> list[str] | None:
        """The thieves and independent models that finished: a failed one is left out (and its
        absence shows in the rows); none when no thief finished."""
        thieves, independent = stage.groups
        if not any(ok(k) for k in thieves):
            return None
        return [k for k in (*thieves, *independent) if ok(k)]

    def wire(self, stage: Stage, sources: list[tuple[Stage, str]]) -> tuple[dict[str, str], dict[str, Any]]:
        """Each thief's folder as ``attack:KEY``, each independent model's as ``independent:LABEL``."""
        labels = dict(zip(stage.groups[1], stage.spec["independent"], strict=True))
        return ({f"independent:{labels[s.key]}" if s.key in labels else f"attack:{s.key}": folder
                 for s, folder in sources}, {})

    def affinity(self, task: StageTask) -> tuple[str, ...]:
        return ()

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        return work.verify(folder, role_folders(task.folders, "attack"), role_folders(task.folders, "independent"),
                           task.spec["significance"])

    def summary(self, result: dict[str, Any]) -> str:
        rows = result["rows"]
        stolen = [r for r in rows if r["suspect_kind"] == "surrogate"]
        tests = [r for r in rows if r["suspect_kind"] == "independent"]
        return (f"{sum(r['verified'] for r in stolen)} of {len(stolen)} stolen surrogates verified; "
                f"{result['false_claims']} false claims in {len(tests)} tests of "
                f"{result['independent_models']} independent models")

    def rows(self, stage: Stage, ctx: RowsContext) -> list[VerificationRow]:
        r = ctx.result(stage.key)
        out = []
        for row in r["rows"]:
            thief = ctx.by_key[row["thief"]]
            s = thief.spec
            defense = ctx.by_key[thief.inputs[1]].spec
            attack = ctx.records[thief.key]["result"] if thief.key in ctx.records else {}
            out.append({
                "seed": stage.seed, "victim": stage.spec["victim"], "suspect": row["suspect_kind"],
                "model": row["model"] or "stolen surrogate", "attack": s["name"],
                "attack_params": params_text(s["params"]), "transfer": s["transfer"] or "",
                "transfer_set": attack.get("transfer_set") or "", "thief": thief_label(s["labels_only"]),
                "defense_label": defense_label(defense["name"], defense["params"]),
                "budget": s["budgets"][-1] if row["budget"] is None else row["budget"],
                "rate": s["watermark"], **{k: row[k] for k in ("marks", "agreed", "agreement", "controls",
                                                               "chance", "p_value", "verified", "queries")},
                "significance": r["significance"], "stage": stage.key[:16]})
        return out

    def estimate(self, spec: dict[str, Any], sizes) -> tuple[str, float]:
        # One test per surrogate, one per independent model and thief; each asks a few hundred
        # images at most (the marks and controls of one thief's stream).
        return "verify", float(len(spec["thieves"]) * (1 + len(spec["independent"])))

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "verify"
