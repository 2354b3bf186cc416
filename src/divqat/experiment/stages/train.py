"""The training kinds: the fp32 teacher (``fp32``: one per seed, or one shared when ``fp32.seed``
is set), the int8 victims (``victim``: qat, and divqat per alpha, cap and variant, fine-tuned
from the teacher; with ``victim.target: edge`` each also writes ``victim.pte``), and the
independent models of ``watermark.independent`` (``independent``: trained as the teacher, with
their own architecture and seed, never stolen from: the verify stage's false claims)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from divqat.experiment.labels import victim_name
from divqat.experiment.results import IndependentRow, VictimRow, victim_info
from divqat.experiment.sizes import ARCH_COST, Sizes
from divqat.experiment.stages.base import StageKind, register_kind
from divqat.models.weights import file_digest
from divqat.pipelines.import_model import ImportRequest
from divqat.pipelines.train import TrainRequest
from divqat.train.losses import DivQATSettings

if TYPE_CHECKING:
    from divqat.experiment.stages.base import PlanScope, RowsContext, Stage, StageTask


def _data(scope: PlanScope) -> dict[str, Any]:
    v = scope.config.victim
    return {"dataset": v.dataset, "arch": v.arch, "limit": v.limit, "holdout": v.holdout,
            "batch_size": v.batch_size}


class _Training(StageKind):
    """What the teacher and the victims share: the work, the rows, the estimate."""

    table = "victims"

    def perform(self, task: StageTask, work, folder: Path) -> dict[str, Any]:
        s = task.spec
        if "weights" in s:  # the user's own trained model: imported, not trained
            return work.import_model(ImportRequest(
                arch=s["arch"], weights=s["weights"], dataset=s["dataset"], out=folder,
                mean=tuple(s["mean"]) if s.get("mean") else None,
                std=tuple(s["std"]) if s.get("std") else None, holdout=s["holdout"]))
        settings = DivQATSettings(**s["divqat"]) if s["mode"] == "divqat" else DivQATSettings()
        return work.train(TrainRequest(
            dataset=s["dataset"], arch=s["arch"], mode=s["mode"], out=folder, epochs=s["epochs"],
            teacher=task.folders.get("teacher"), divqat=settings, limit=s["limit"],
            holdout=s["holdout"], seed=s["seed"], batch_size=s["batch_size"], lr=s["lr"],
            precision=s.get("precision", "fp32"), target=s.get("target", "x86")))

    def rows(self, stage: Stage, ctx: RowsContext) -> list[VictimRow]:
        r = ctx.result(stage.key)
        return [{**victim_info(stage, ctx), "test_accuracy": r.get("test_accuracy"),
                 "teacher_accuracy": r.get("teacher_test_accuracy"),
                 "train_images": r.get("train_images"), "epochs": r.get("epochs"),
                 "train_seconds": r.get("train_seconds"),
                 "kl_to_teacher_outliers": r.get("kl_to_teacher_outliers"),
                 "collapsed": bool(r.get("collapsed")), "message": r.get("message"),
                 "stage": stage.key[:16]}]

    def estimate(self, spec: dict[str, Any], sizes: Sizes) -> tuple[str, float]:
        if "weights" in spec:  # an import evaluates the test split once: about one epoch's tenth
            return self.category(spec), sizes.test * ARCH_COST.get(spec["arch"], 1.0) * sizes.pixels / 784 / 3
        n = sizes.train - int(spec.get("holdout") or 0)
        if spec.get("limit"):
            n = min(n, spec["limit"])
        units = spec["epochs"] * max(n, 1) * ARCH_COST.get(spec["arch"], 1.0) * sizes.pixels / 784
        category = self.category(spec)
        if spec.get("precision") == "bf16":
            category += " bf16"
        return category, units

    def category(self, spec: dict[str, Any]) -> str:
        raise NotImplementedError


@register_kind
class Teacher(_Training):
    """The fp32 teacher of a seed (shared by every seed when ``fp32.seed`` is set)."""

    name = "fp32"
    order = 10

    def plan(self, scope: PlanScope) -> list[Stage]:
        config = scope.config
        v = config.victim
        if v.weights is not None:
            # One teacher for every seed: the user's model; the file's digest in the key, so
            # other weights under the same name are a new teacher.
            spec = {**_data(scope), "mode": "fp32", "weights": v.weights,
                    "weights_sha256": file_digest(v.weights),
                    "mean": list(v.mean) if v.mean else None, "std": list(v.std) if v.std else None}
            return [self.stage(spec, "fp32 teacher (imported)", (), scope.seed)]
        seed = scope.seed if config.fp32.seed is None else config.fp32.seed
        spec = {**_data(scope), "mode": "fp32", "epochs": config.fp32.epochs, "lr": config.fp32.lr,
                "seed": seed}
        if config.fp32.precision != "fp32":  # absent when fp32: the keys of older configs hold
            spec["precision"] = config.fp32.precision
        return [self.stage(spec, f"fp32 teacher | seed {seed}", (), seed)]

    def provide(self, source: Stage, folder: str, folders: dict[str, str],
                context: dict[str, Any]) -> None:
        folders["teacher"] = folder

    def category(self, spec: dict[str, Any]) -> str:
        return "fp32"

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "fp32 teacher"

    def summary(self, result: dict[str, Any]) -> str:
        imported = " (imported)" if result.get("imported") else ""
        return f"test accuracy {result['test_accuracy']:.1%}{imported}"


@register_kind
class Victim(_Training):
    """The int8 victims of a seed: qat, then divqat per setting (alphas x caps, then variants)."""

    name = "victim"
    order = 20

    def plan(self, scope: PlanScope) -> list[Stage]:
        config, seed = scope.config, scope.seed
        teacher = scope.of(Teacher.name)[0]
        modes: list[tuple[str, Any, Any]] = [("qat", config.qat, None)]
        modes += [("divqat", d, settings) for d, settings in config.divqat.victims()]  # variants too
        victims = []
        for mode, train, settings in modes:
            spec = {**_data(scope), "mode": mode, "epochs": train.epochs, "lr": train.lr, "seed": seed}
            if config.victim.target != "x86":  # only then: the keys of x86 victims stay what they were
                spec["target"] = config.victim.target
            if train.precision != "fp32":  # likewise: the keys of fp32 fine-tuning stay
                spec["precision"] = train.precision
            if mode == "divqat":
                spec["divqat"] = settings.as_dict()
                if train.name != "divqat":  # a variant's label; the section's keys stay as they were
                    spec["name"] = train.name
            victims.append(self.stage(spec, f"victim {victim_name(spec, scope.with_cap)} | seed {seed}",
                                      (teacher.key,), seed))
        return victims

    def provide(self, source: Stage, folder: str, folders: dict[str, str],
                context: dict[str, Any]) -> None:
        folders["victim"] = folder

    def summary(self, result: dict[str, Any]) -> str:
        return (f"int8 accuracy {result['int8_test_accuracy']:.1%}, KL to fp32 "
                f"{result['kl_to_teacher']:.4f}")

    def category(self, spec: dict[str, Any]) -> str:
        return f"victim {spec['mode']}"

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "victim " + ("qat" if label == "victim qat" else "divqat")


def independent_label(spec: dict[str, Any]) -> str:
    """"resnet20 seed 11": an independent model, by its architecture and seed."""
    return f"{spec['arch']} seed {spec['seed']}"


@register_kind
class Independent(_Training):
    """An independent model of ``watermark.independent``: an fp32 model trained as the teacher
    on the victims' training images, with its own architecture and seed. The same stage for
    every seed of the run (its key does not hold the run's seed)."""

    name = "independent"
    order = 15
    table = "independents"

    def plan(self, scope: PlanScope) -> list[Stage]:
        config = scope.config
        if config.watermark is None:
            return []
        stages = []
        for model in config.watermark.independent:
            spec = {**_data(scope), "arch": model.arch, "mode": "fp32", "epochs": config.fp32.epochs,
                    "lr": config.fp32.lr, "seed": model.seed}
            if config.fp32.precision != "fp32":
                spec["precision"] = config.fp32.precision
            stages.append(self.stage(spec, f"independent {independent_label(spec)}", (), model.seed))
        return stages

    def summary(self, result: dict[str, Any]) -> str:
        return f"test accuracy {result['test_accuracy']:.1%}"

    def rows(self, stage: Stage, ctx: RowsContext) -> list[IndependentRow]:
        r = ctx.result(stage.key)
        return [{"model": independent_label(stage.spec), "arch": stage.spec["arch"], "seed": stage.seed,
                 "test_accuracy": r.get("test_accuracy"), "train_seconds": r.get("train_seconds"),
                 "stage": stage.key[:16]}]

    def category(self, spec: dict[str, Any]) -> str:
        return "fp32"  # trained as the teacher is: the teacher's measured rate

    def time_name(self, label: str, row: dict[str, Any]) -> str:
        return "independent model"
