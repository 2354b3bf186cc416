"""Train a victim end to end: data -> fp32 teacher, or fp32 teacher -> QAT / DivQAT int8 victim.

This is what ``divqat train`` calls; it returns the metrics it also writes to ``OUT/metrics.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from divqat.checks import check_choice, check_int
from divqat.data import (
    STATS_SAMPLE,
    channel_stats,
    dataset_spec,
    is_lazy,
    load_dataset,
    to_float,
    training_split,
)
from divqat.errors import ConfigError, TrainingCollapsed
from divqat.io import write_json
from divqat.models import VictimNet, check_arch
from divqat.models.weights import file_digest, load_weights, read_state_dict
from divqat.quant import convert_to_int8, export_dynamic, prepare_qat
from divqat.quant.edge import TARGETS, require_executorch
from divqat.train.losses import CrossEntropy, DivQATSettings
from divqat.train.ood import divqat_objective
from divqat.train.outliers import load_outliers
from divqat.train.trainer import (
    PRECISIONS,
    FitConfig,
    accuracy,
    fit,
    predict_logits,
    resolve_precision,
)
from divqat.victim import (
    INT8_MODES,
    Victim,
    load_fp32_net,
    provenance,
    read_metadata,
    save_victim,
)

MODES = ("fp32", "qat", "divqat")
# Per-mode defaults (algorithms.md, section 1: QAT fine-tunes at about 1/10 of the fp32 rate).
DEFAULT_LR = {"fp32": 0.1, "qat": 0.01, "divqat": 0.01}
DEFAULT_SCHEDULE = {"fp32": "onecycle", "qat": "cosine", "divqat": "cosine"}
# QAT freezes quantization ranges and BatchNorm statistics for the last quarter of the steps.
DEFAULT_FREEZE_AT = 0.75


@dataclass
class TrainRequest:
    """Everything ``divqat train`` can be told. Defaults match the CLI's."""

    dataset: str
    # A spec (``resnet8``, ``torchvision:NAME``, ``timm:NAME``, ``package.module:function``), or in
    # Python an ``nn.Module`` built for the dataset's channels and classes (recorded by its class
    # path; a qat/divqat run from its teacher gets the same module again).
    arch: str | nn.Module = "resnet8"
    mode: str = "fp32"
    out: str | Path = "runs/victim"
    epochs: int = 10
    teacher: str | Path | None = None
    divqat: DivQATSettings = field(default_factory=DivQATSettings)
    limit: int | None = None
    holdout: int = 0
    seed: int = 0
    batch_size: int = 128
    lr: float | None = None
    schedule: str | None = None
    freeze_at: float = DEFAULT_FREEZE_AT
    # "bf16": forward passes under bf16 autocast where the CPU has it (fp32 elsewhere); for
    # qat/divqat the fake-quantized student's and the DivQAT teacher's.
    precision: str = "fp32"
    target: str = "x86"
    # fp32 only: start from these weights (a backbone the user brings), loading every tensor whose
    # name and shape fit; the rest (e.g. a head for another number of classes) start fresh.
    init: str | Path | None = None
    data_root: str | Path | None = None
    device: str = "cpu"
    progress: bool = True
    log_epochs: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.mode in INT8_MODES and self.teacher is None:
            raise ConfigError(f"--mode {self.mode} fine-tunes an fp32 victim: give it with --teacher DIR "
                              "(train one first with `divqat train --mode fp32 --out DIR`)")
        if self.mode == "fp32" and self.teacher is not None:
            raise ConfigError("--teacher only applies to --mode qat or divqat")
        if self.mode != "divqat" and self.divqat.alpha != 0:
            raise ConfigError(f"--alpha only applies to --mode divqat (got --mode {self.mode})")
        if self.mode != "divqat" and (self.divqat.divergence_on != "in" or self.divqat.distill):
            raise ConfigError(f"--divergence-on and --distill only apply to --mode divqat (got --mode {self.mode})")
        check_int("", "--limit", self.limit, low=1, optional=True)
        check_int("", "--holdout", self.holdout, low=0)
        check_int("", "--epochs", self.epochs, low=1)
        check_int("", "--seed", self.seed)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        check_choice("", "--target", self.target, TARGETS)
        if self.init is not None and self.mode != "fp32":
            raise ConfigError(f"--init only applies to --mode fp32; --mode {self.mode} starts from "
                              "its --teacher (import a finished model with `divqat import`)")
        if self.mode == "fp32" and self.target != "x86":
            raise ConfigError("--target only applies to --mode qat or divqat (it picks the int8 "
                              "scheme); an fp32 victim goes to the device as it is: `divqat export`")


def _training_split(req: TrainRequest):
    train = load_dataset(req.dataset, "train", req.data_root)
    try:
        return training_split(train, req.holdout, req.limit)[0]
    except ConfigError as e:
        raise ConfigError(f"--holdout {req.holdout}: {e}") from None


def _check_collapse(logits: torch.Tensor, labels, reference: float, what: str) -> float:
    """Accuracy of ``logits``; raises ``TrainingCollapsed`` when a model whose teacher was clearly
    better than chance now answers no better than always naming the most frequent class, or
    answers (almost) everything with one class: the signature of a diverged DivQAT run."""
    labels = torch.as_tensor(labels)
    acc = accuracy(logits, labels)
    k = logits.shape[1]
    majority = float(torch.bincount(labels, minlength=k).max()) / len(labels)
    one_class = float(torch.bincount(logits.argmax(1), minlength=k).max()) / len(labels)
    if reference > majority + 0.2 and (acc < majority + 0.05 or one_class > 0.95):
        raise TrainingCollapsed(
            f"{what} collapsed: {acc:.1%} test accuracy, {one_class:.0%} of answers one class "
            f"(the teacher had {reference:.1%}); nothing was saved. Lower alpha, or bound the "
            "divergence (--divergence js, --cap, --ramp)."
        )
    return acc


def teacher_distances(teacher_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean KL(p_teacher || p) and mean L1 |p_teacher - p| over a set of (N, K) logits: how far
    training moved a victim from its fp32 teacher (``kl_to_teacher`` in its metrics). Computed in
    log space from the logits, unclamped; the per-query distances between a victim's clean and
    defended posteriors are ``divqat.pipelines.defend.posterior_distances``."""
    log_p = F.log_softmax(teacher_logits.double(), dim=1)
    log_q = F.log_softmax(logits.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q.clamp(min=-1e4))).sum(dim=1).mean()
    l1 = (log_p.exp() - log_q.exp()).abs().sum(dim=1).mean()
    return {"kl_to_teacher": float(kl), "l1_to_teacher": float(l1)}


def arch_name(arch: str | nn.Module) -> str:
    """What a victim records as its architecture: the canonical spec, or for a module handed in
    from Python its class as ``package.module:Class`` (a factory spec, so the architecture can be
    rebuilt wherever that class takes ``num_classes`` and ``in_channels``)."""
    if isinstance(arch, nn.Module):
        return f"{type(arch).__module__}:{type(arch).__qualname__}"
    return check_arch(arch)


def _init_from(net: VictimNet, path: str | Path, arch: str) -> dict:
    """Load the tensors of ``path`` that fit ``net``'s architecture; what was loaded and skipped."""
    report = load_weights(net.net, read_state_dict(path), strict=False,
                          what=f"{Path(path).name} and {arch}")
    skipped = [name for name, *_ in report.mismatched] + report.missing
    return {"file": Path(path).name, "sha256": file_digest(path), "loaded": len(report.loaded),
            "fresh": skipped, "ignored": report.unexpected}


def train_victim(req: TrainRequest) -> dict:
    """Train, evaluate and save one victim; returns its metrics.

    A qat/divqat victim keeps at least its teacher's held-out images out of its own training
    too (``holdout`` is raised to the teacher's), so they stay unseen by the deployed model.
    """
    if req.target == "edge":
        require_executorch()  # before minutes of training, not after
    if req.mode in INT8_MODES and req.teacher is not None:
        teacher_holdout = int(read_metadata(req.teacher).get("holdout") or 0)
        if req.holdout < teacher_holdout:
            req = dataclasses.replace(req, holdout=teacher_holdout)
    spec = dataset_spec(req.dataset)  # aliases and class subsets ("fashion-mnist[0-4]") too
    train = _training_split(req)
    if train.num_classes < 2:
        raise ConfigError(f"{spec.name} has {train.num_classes} class; a victim needs at least two")
    test = load_dataset(req.dataset, "test", req.data_root)
    lr = req.lr if req.lr is not None else DEFAULT_LR[req.mode]
    schedule = req.schedule or DEFAULT_SCHEDULE[req.mode]
    hflip = bool(spec.hflip) if spec is not None else False
    example = torch.rand(4, *train.images.shape[1:])
    cfg = FitConfig(epochs=req.epochs, batch_size=req.batch_size, lr=lr, schedule=schedule, hflip=hflip,
                    seed=req.seed, device=req.device, progress=req.progress, log_epochs=req.log_epochs,
                    desc=req.mode, precision=req.precision,
                    freeze_at=req.freeze_at if req.mode in INT8_MODES else None)
    torch.manual_seed(req.seed)
    arch = arch_name(req.arch)
    metrics: dict = {"dataset": spec.name, "arch": arch, "mode": req.mode, "seed": req.seed,
                     "train_images": len(train), "epochs": req.epochs}
    if req.mode in INT8_MODES:
        metrics["target"] = req.target
    teacher_meta: dict = {}
    outliers = None

    if req.mode == "fp32":
        # A lazy folder's statistics from a fixed sample: a full pass would decode every file.
        mean, std = channel_stats(train.images, sample=STATS_SAMPLE if is_lazy(train.images) else None)
        user_net = copy.deepcopy(req.arch) if isinstance(req.arch, nn.Module) else req.arch
        net = VictimNet(user_net, train.channels, train.num_classes, mean, std)
        if req.init is not None:
            metrics["init"] = _init_from(net, req.init, arch)
        # A net torch.export cannot capture fails here, in one line, not after the training;
        # the random state is left as it was, so the training is what it would have been.
        with torch.random.fork_rng():
            export_dynamic(net.eval(), example)
        net.train()
        objective = CrossEntropy()
        model = net
    else:
        teacher, teacher_meta = load_fp32_net(
            req.teacher, arch=req.arch if isinstance(req.arch, nn.Module) else None)
        if dataset_spec(teacher_meta["dataset"]).name != spec.name:
            raise ConfigError(f"the teacher at {req.teacher} was trained on {teacher_meta['dataset']!r}, "
                              f"not {req.dataset!r}")
        if teacher_meta["arch"] != arch:
            raise ConfigError(f"the teacher at {req.teacher} is a {teacher_meta['arch']}, not a {arch}")
        mean, std = tuple(teacher_meta["mean"]), tuple(teacher_meta["std"])
        teacher = teacher.to(req.device, memory_format=torch.channels_last)
        model = prepare_qat(copy.deepcopy(teacher).cpu(), example, target=req.target)
        objective = CrossEntropy()
        if req.mode == "divqat":
            if req.divqat.divergence_on != "in":  # DivQAT on outliers (divqat.train.ood)
                outliers = load_outliers(req.divqat.outliers, tuple(train.images.shape[1:]),
                                         training_set=f"{spec.name}:train[:{len(train)}]",
                                         data_root=req.data_root)
                metrics["outlier_set"] = outliers.name
            objective = divqat_objective(teacher, req.divqat, outliers, resolve_precision(req.precision, req.device))
        teacher_acc = teacher_meta["metrics"]["test_accuracy"]
        metrics["teacher_test_accuracy"] = teacher_acc

    def on_epoch_end(epoch: int, m) -> dict:
        m.eval()
        logits = predict_logits(m, test.images, device=req.device, channels_last=True)
        if req.mode in INT8_MODES:
            return {"test_accuracy": _check_collapse(logits, test.labels, teacher_acc, f"{req.mode} at epoch {epoch + 1}")}
        return {"test_accuracy": accuracy(logits, test.labels)}

    start = time.perf_counter()
    history = fit(model, train.images, train.labels, objective, cfg, on_epoch_end)
    metrics["train_seconds"] = time.perf_counter() - start
    if req.precision != "fp32":  # what it really ran in (bf16 falls back where the CPU lacks it)
        metrics["precision"] = history.precision
    metrics["history"] = history.epochs
    metrics["test_accuracy"] = history.epochs[-1]["test_accuracy"]

    model.eval()
    weights = None
    if req.mode == "fp32":
        model = model.cpu().to(memory_format=torch.contiguous_format)
        program = export_dynamic(model, example)
        weights = model.state_dict()
    else:
        program = convert_to_int8(model.cpu(), example)
        int8 = Victim(program.module(), {"mode": req.mode, "input_shape": list(example.shape[1:]),
                                         "classes": list(test.classes), "target": req.target},
                      Path(req.out))
        int8_logits = predict_logits(int8, test.images)
        metrics["int8_test_accuracy"] = _check_collapse(int8_logits, test.labels, teacher_acc,
                                                        f"the int8 {req.mode} victim")
        teacher_logits = predict_logits(teacher.cpu().to(memory_format=torch.contiguous_format), test.images)
        metrics.update(teacher_distances(teacher_logits, int8_logits))
        if outliers is not None:  # how far the answers moved on outliers (made from test images)
            probe = outliers(to_float(test.images[:2000]), torch.Generator().manual_seed(req.seed))
            probe = probe.mul(255).round().to(torch.uint8)
            moved = teacher_distances(predict_logits(teacher, probe), predict_logits(int8, probe))
            metrics.update({f"{k}_outliers": v for k, v in moved.items()})

    metadata = {
        "dataset": spec.name,
        "arch": arch,
        "mode": req.mode,
        "input_shape": list(train.images.shape[1:]),
        "classes": list(test.classes),
        "mean": list(mean),
        "std": list(std),
        "hflip": hflip,
        "seed": req.seed,
        "epochs": req.epochs,
        "limit": req.limit,
        "holdout": req.holdout,
        "train_images": len(train),
        "lr": lr,
        "schedule": schedule,
        "divqat": req.divqat.as_dict() if req.mode == "divqat" else None,
        # The int8 scheme: "x86" (inductor, oneDNN) or "edge" (XNNPACK, `divqat export`).
        "target": req.target if req.mode in INT8_MODES else None,
        "teacher": str(req.teacher) if req.teacher is not None else None,
        **({"init": metrics["init"]} if "init" in metrics else {}),
        "versions": provenance("torchao"),
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
    }
    out = Path(req.out)
    save_victim(out, program, metadata, weights)
    write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["MODES", "TrainRequest", "teacher_distances", "train_victim"]
