"""How much work a stage is: the sizes of the datasets and the relative cost of the
architectures, for ``divqat run --plan``'s estimates (``StageKind.estimate``)."""

from __future__ import annotations

from dataclasses import dataclass

# Training cost per image relative to resnet8 at 28x28 (measured training throughput here:
# resnet8 about 2,000 img/s, resnet20 750, resnet18 41; the others by their multiply-adds).
ARCH_COST = {"resnet8": 1.0, "resnet20": 2.7, "resnet32": 4.5, "resnet56": 8.5, "resnet18": 49.0}
# Images in the train and test splits of the registered datasets (before holdout and limit),
# and their height x width; a dataset not listed here is loaded to count it.
SIZES = {"fashion-mnist": (60000, 10000, 784), "mnist": (4000, 1000, 784),
         "animal-mnist": (8000, 2000, 784), "digits": (1437, 360, 64),
         "cifar10": (50000, 10000, 1024), "cifar100": (50000, 10000, 1024),
         "svhn": (73257, 26032, 1024), "gtsrb": (39209, 12630, 1024)}


@dataclass(frozen=True)
class Sizes:
    train: int
    test: int
    pixels: int


def dataset_sizes(name: str, data_root: str | None = None) -> Sizes:
    """Train / test split sizes and pixels per image of a dataset: from ``SIZES``, else by
    loading it, else a guess (10,000 / 2,000 images, 32x32)."""
    if name in SIZES:
        return Sizes(*SIZES[name])
    try:
        from divqat.data import load_dataset

        train, test = load_dataset(name, "train", data_root), load_dataset(name, "test", data_root)
        return Sizes(len(train), len(test), int(train.images.shape[-1] * train.images.shape[-2]))
    except Exception:  # a plan must not fail for want of data
        return Sizes(10000, 2000, 1024)


__all__ = ["ARCH_COST", "SIZES", "Sizes", "dataset_sizes"]
