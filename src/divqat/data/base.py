"""The dataset contract shared by every loader: uint8 images (N, C, H, W), int64 labels, class names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np

from divqat.data._io import as_path, env_root
from divqat.data.sizes import sized_name, split_size
from divqat.data.streaming import FolderImages, is_lazy
from divqat.data.subsets import check_classes, split_subset, subset_name
from divqat.errors import ConfigError, DatasetError
from divqat.registry import Registry
from divqat.stopwatch import phase

SPLITS = ("train", "test", "val")
"""Every split a dataset may have: all have train and test; val only where the data ships one
(an image folder with a val/ folder). ``DatasetSpec.splits`` says which a dataset has."""


@dataclass(frozen=True)
class ImageDataset:
    """One split of a dataset.

    images: uint8, shape (N, C, H, W), C in {1, 3}: a numpy array in memory, or for image
        folders too large for memory a ``FolderImages`` that decodes the rows indexed
        (``divqat.data.streaming``; ``images[idx]`` returns the same array either way).
    labels: int64, shape (N,), values in [0, len(classes)).
    classes: the class names, index = label.
    """

    name: str
    split: str
    images: np.ndarray | FolderImages
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W) with C in (1, 3), got "
                             f"{self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 (N,), got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: np.ndarray | slice | range) -> ImageDataset:
        """A view on some rows (for --limit, held-out transfer sets, tiny tests); lazy images
        stay lazy."""
        if isinstance(indices, range):
            indices = slice(indices.start, indices.stop, indices.step)
        images = self.images.subset(indices) if is_lazy(self.images) else self.images[indices]
        return ImageDataset(self.name, self.split, images, self.labels[indices], self.classes)

    def select_classes(self, classes: tuple[int, ...]) -> ImageDataset:
        """The images of ``classes`` only, relabelled 0..k-1 in the order given, named
        ``NAME[...]`` (``divqat.data.subsets``); their order within the split is kept."""
        name = subset_name(self.name, tuple(classes))
        check_classes(name, tuple(classes), self.classes)
        relabel = np.full(len(self.classes), -1, dtype=np.int64)
        relabel[list(classes)] = np.arange(len(classes))
        new = relabel[self.labels]
        keep = np.flatnonzero(new >= 0)
        images = self.images.subset(keep) if is_lazy(self.images) else np.ascontiguousarray(self.images[keep])
        return ImageDataset(name, self.split, images, new[keep],
                            tuple(self.classes[k] for k in classes))


def training_split(train: ImageDataset, holdout: int = 0,
                   limit: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """The one rule for which training images a victim sees: ``(trained on, held out)``.

    The last ``holdout`` images of the training split are kept out of every victim trained with
    them (the thief's unseen in-distribution transfer set, ``--transfer holdout``); of the rest,
    the first ``limit`` are trained on (all when None). So a victim's training images are always
    a prefix of the split, and its held-out images its tail.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < len(train):
        raise ConfigError(f"holdout must be an integer from 0 to {len(train) - 1} ({train.name} "
                          f"has {len(train)} training images), got {holdout!r}")
    n = len(train) - holdout
    trained = train.subset(slice(0, n if limit is None else min(n, limit)))
    return trained, train.subset(slice(n, len(train)))


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about a dataset before loading it.

    loader(split, root) -> ImageDataset; root is the user's --data-root (may be None for
    datasets that ship offline). hflip says whether horizontal flips preserve the label
    (yes for clothes and objects; no for digits, house numbers and traffic signs).
    splits: the splits it has (train and test always). sized_loader(split, root, (H, W)), where
    given, loads it at a size the user chooses, ``NAME@H[xW]`` (``divqat.data.sizes``).
    """

    name: str
    loader: Callable[[str, Path | None], ImageDataset]
    hflip: bool
    description: str
    needs_root: bool = False
    aliases: tuple[str, ...] = field(default=())
    splits: tuple[str, ...] = ("train", "test")
    sized_loader: Callable[[str, Path | None, tuple[int, int]], ImageDataset] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to DATASETS under its name (its aliases resolve in dataset_spec)."""
    return DATASETS.register(spec.name)(spec)


def dataset_names() -> list[str]:
    """The registered dataset names, sorted (aliases not included)."""
    return DATASETS.names()


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name`` or one of its aliases; DatasetError lists the names.

    A class subset ``NAME[a-b]`` / ``NAME[a,b,c]`` (``divqat.data.subsets``) gets a spec of its
    own whose name is the canonical spelling and whose loader keeps only those classes. So does a
    size ``NAME@H[xW]`` (``divqat.data.sizes``; the two compose: ``image-folder@64[0-2]``).
    """
    name, size = split_size(name)
    base, classes = split_subset(name)
    if classes is not None:
        spec = dataset_spec(sized_name(base, size))
        loader = spec.loader

        def load_subset(split: str, root: Path | None) -> ImageDataset:
            return loader(split, root).select_classes(classes)

        shown = subset_name(spec.name, classes)
        return DatasetSpec(shown, load_subset, hflip=spec.hflip, needs_root=spec.needs_root,
                           description=f"classes {shown[len(spec.name):]} of {spec.name}, "
                                       "relabelled 0..k-1", splits=spec.splits)
    if size is not None:
        spec = dataset_spec(base)
        sized_loader = spec.sized_loader
        if sized_loader is None:
            takes = [n for n in dataset_names() if DATASETS.get(n).sized_loader is not None]
            raise DatasetError(f"{spec.name} has a fixed image size; only {', '.join(takes)} "
                               f"can be loaded at a chosen one (NAME@H or NAME@HxW)")
        chosen = size

        def load_sized(split: str, root: Path | None) -> ImageDataset:
            return sized_loader(split, root, chosen)

        shown = sized_name(spec.name, size)
        return DatasetSpec(shown, load_sized, hflip=spec.hflip, needs_root=spec.needs_root,
                           description=f"{spec.name} at {shown[len(spec.name) + 1:]} px",
                           splits=spec.splits)
    key = name.strip().lower()
    if key in DATASETS:
        return DATASETS.get(key)
    for registered in DATASETS:
        spec = DATASETS.get(registered)
        if key in spec.aliases:
            return spec
    raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")


def load_dataset(name: str, split: str = "train", root: str | PathLike[str] | None = None) -> ImageDataset:
    """Load one split of a registered dataset into memory.

    name: a registered name or alias (see dataset_names()), optionally with a class subset:
        ``fashion-mnist[0-4]``, ``mnist[1,7]`` (those classes only, relabelled 0..k-1), and for
        sets that take one a size: ``image-folder@96``, ``image-folder@96x128[0-2]``.
    split: "train" or "test" ("val" where the set has one, ``spec.splits``); sets without an
        official split get a fixed stratified one.
    root: the user's --data-root. Sets that ship offline also look in their usual places;
        the others (needs_root) read from root, or from $DIVQAT_DATA when root is None.
    Returns uint8 images (N, C, H, W) and int64 labels (N,); image folders too large for memory
    come back lazy (``divqat.data.streaming``). Missing or corrupt data raises
    one DatasetError naming the paths looked at and how to get the data.
    """
    spec = dataset_spec(name)
    if split not in spec.splits:
        raise DatasetError(f"unknown split {split!r} of {spec.name}; choose one of: {', '.join(spec.splits)}")
    root_path = as_path(root)
    if root_path is None and spec.needs_root:
        root_path = env_root()
    with phase("data"):
        return spec.loader(split, root_path)
