"""A model the user trained elsewhere -> an fp32 victim folder, the teacher QAT and DivQAT start from.

``divqat import --arch A --weights FILE --dataset D --out DIR`` calls ``import_victim``: it builds
the architecture for the dataset's channels and classes, loads the user's weights strictly (one
line naming the keys and shapes that do not fit), measures the test accuracy, and writes the same
folder ``divqat train --mode fp32`` writes (``victim.pt2``, ``victim.json``, ``weights.pt``,
``metrics.json``), recording where the weights came from (file name and sha256). Everything that
takes an fp32 victim (``train --teacher``, ``defend``, ``attack``, ``serve``, ``export``, and
``divqat run`` with ``victim.weights``) then starts from the user's model.

Normalization: the user's network was trained on inputs normalized some way; divqat puts the
normalization inside the deployed model, so it must be told which. ``mean``/``std`` default to the
statistics of (a sample of) the training images, which is what ``divqat train`` uses; a model
trained with ImageNet statistics needs ``mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from divqat.checks import check_int
from divqat.data import channel_stats, dataset_spec, load_dataset, training_split
from divqat.errors import ConfigError
from divqat.io import write_json
from divqat.models import VictimNet
from divqat.models.weights import file_digest, load_weights, read_state_dict
from divqat.pipelines.context import RunContext
from divqat.quant import export_dynamic
from divqat.train.trainer import accuracy, predict_logits
from divqat.victim import provenance, save_victim

# Published ImageNet statistics, which most torchvision and timm backbones were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImportRequest:
    """What ``divqat import`` can be told.

    Arguments:
        arch: the architecture the weights belong to (``resnet8``, ``torchvision:NAME``,
            ``timm:NAME``, ``package.module:function``).
        weights: a ``.pt``/``.pth`` state dict or a ``.safetensors`` file.
        dataset: the dataset the model classifies (its classes fix the head's size), e.g.
            ``image-folder@96``.
        out: where to write the victim folder.
        mean, std: the normalization the model was trained with, one value per channel (or one
            for all). (Default: None, the training images' statistics.)
        holdout: the last N training images were never trained on (an unseen in-distribution
            transfer set for attacks, as ``divqat train --holdout``). (Default: 0.)
    """

    arch: str
    weights: str | Path
    dataset: str
    out: str | Path = "runs/imported"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    holdout: int = 0

    def __post_init__(self) -> None:
        check_int("", "--holdout", self.holdout, low=0)
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give both --mean and --std, or neither (the training images' statistics)")


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise ConfigError(f"--{name} has {len(values)} values; the images have {channels} channel(s)")
    return tuple(float(v) for v in values)


def import_victim(req: ImportRequest, context: RunContext | None = None) -> dict:
    """Write the fp32 victim folder of the user's model; returns its metrics (test accuracy,
    test images, the weights' sha256)."""
    context = context or RunContext()
    spec = dataset_spec(req.dataset)
    train = load_dataset(req.dataset, "train", context.data_root)
    try:
        trained, _ = training_split(train, req.holdout)
    except ConfigError as e:
        raise ConfigError(f"--holdout {req.holdout}: {e}") from None
    test = load_dataset(req.dataset, "test", context.data_root)
    state = read_state_dict(req.weights)
    if req.mean is None or req.std is None:
        mean, std = channel_stats(trained.images)
    else:
        mean = _per_channel(req.mean, trained.channels, "mean")
        std = _per_channel(req.std, trained.channels, "std")
    net = VictimNet(req.arch, trained.channels, trained.num_classes, mean, std)
    what = (f"{Path(req.weights).name} ({len(state)} tensors) and {req.arch} for "
            f"{trained.num_classes} classes, {trained.channels} channel(s)")
    load_weights(net.net, state, strict=True, what=what)
    context.say(f"loaded {req.weights} into {req.arch}; evaluating on {len(test)} test images")

    start = time.perf_counter()
    net.eval()
    logits = predict_logits(net.to(context.device), test.images, device=context.device)
    net = net.cpu()
    metrics = {"dataset": spec.name, "arch": req.arch, "mode": "fp32", "imported": True,
               "test_accuracy": accuracy(logits, test.labels), "test_images": len(test),
               "train_images": len(trained), "weights_sha256": file_digest(req.weights),
               "evaluate_seconds": time.perf_counter() - start}
    example = torch.rand(4, *trained.images.shape[1:])
    program = export_dynamic(net, example)
    metadata = {
        "dataset": spec.name,
        "arch": req.arch,
        "mode": "fp32",
        "input_shape": list(trained.images.shape[1:]),
        "classes": list(test.classes),
        "mean": list(mean),
        "std": list(std),
        "hflip": bool(spec.hflip),
        "seed": None,
        "epochs": None,
        "limit": None,
        "holdout": req.holdout,
        "train_images": len(trained),
        "imported_from": {"file": Path(req.weights).name, "sha256": metrics["weights_sha256"]},
        "divqat": None,
        "target": None,
        "teacher": None,
        "versions": provenance("torchao"),
        "metrics": metrics,
    }
    out = Path(req.out)
    save_victim(out, program, metadata, net.state_dict())
    write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImportRequest", "import_victim"]
