"""Datasets and transforms.

    from divqat.data import load_dataset, to_float, adapt
    train = load_dataset("fashion-mnist", "train")            # uint8 (60000, 1, 28, 28)
    x = adapt(to_float(train.images[:256]), channels=3, size=32)  # float (256, 3, 32, 32)

A class subset is written after the name: ``load_dataset("fashion-mnist[0-4]")`` keeps those
classes, relabelled 0..k-1 (``divqat.data.subsets``). An image folder takes a size the same
way: ``load_dataset("image-folder@96", "train", root)`` (``divqat.data.sizes``); one too large
for memory comes back lazy and is decoded batch by batch (``divqat.data.streaming``).

Importing this package registers every format: the offline sets (fashion-mnist, mnist,
animal-mnist, digits) and the ones read from --data-root (cifar10, cifar100, svhn, gtsrb,
image-folder).
"""

from divqat.data import cifar, folders, offline, svhn  # noqa: F401  (registers the datasets)
from divqat.data.base import (
    DATASETS,
    SPLITS,
    DatasetSpec,
    ImageDataset,
    dataset_names,
    dataset_spec,
    load_dataset,
    register_dataset,
    training_split,
)
from divqat.data.sizes import parse_image_size, sized_name, split_size
from divqat.data.streaming import FolderImages, is_lazy
from divqat.data.subsets import split_subset, subset_name
from divqat.data.transforms import (
    STATS_SAMPLE,
    Normalize,
    adapt,
    augment,
    channel_stats,
    check_victim_input,
    random_resized_crop,
    to_float,
    to_victim_input,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "STATS_SAMPLE",
    "DatasetSpec",
    "FolderImages",
    "ImageDataset",
    "Normalize",
    "adapt",
    "check_victim_input",
    "augment",
    "channel_stats",
    "dataset_names",
    "dataset_spec",
    "is_lazy",
    "load_dataset",
    "parse_image_size",
    "random_resized_crop",
    "register_dataset",
    "sized_name",
    "split_size",
    "split_subset",
    "subset_name",
    "to_float",
    "to_victim_input",
    "training_split",
]
