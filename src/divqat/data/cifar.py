"""CIFAR-10 and CIFAR-100 in their published "python version" layout (Krizhevsky, 2009).

Each file is a Python 2 pickle of a dict with bytes keys: b"data" is uint8 (N, 3072), rows
holding the red, green and blue 32x32 planes one after the other, so a reshape to
(N, 3, 32, 32) is the (N, C, H, W) layout with no copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from divqat.data._io import PARSE_ERRORS, check_labels, first_with, listed, require_root, unpickle
from divqat.data.base import DatasetSpec, ImageDataset, register_dataset
from divqat.errors import DatasetError

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_LAYOUT = ("DIR/cifar-10-batches-py/ holding data_batch_1 ... data_batch_5, test_batch and "
                  f"batches.meta (cifar-10-python.tar.gz from {URL}, extracted into DIR)")
CIFAR100_LAYOUT = ("DIR/cifar-100-python/ holding train, test and meta "
                   f"(cifar-100-python.tar.gz from {URL}, extracted into DIR)")


def read_cifar(name: str, split: str, root: Path | None, *, folder: str, layout: str,
               batches: dict[str, tuple[str, ...]], meta: str, names_key: bytes,
               labels_key: bytes) -> ImageDataset:
    root = require_root(name, root, layout)
    files = batches[split]
    candidates = [root / folder, root]
    found = first_with(candidates, (*files, meta))
    if found is None:
        raise DatasetError(f"{name}: no {', '.join(files)} and {meta} in {listed(candidates)}; "
                           f"expected {layout}")
    path = found / meta
    try:
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n)
                        for n in unpickle(path, encoding="bytes")[names_key])
        images, labels = [], []
        for f in files:
            path = found / f
            batch = unpickle(path, encoding="bytes")
            data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[labels_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
                    or batch_labels.shape != data.shape[:1]:
                raise DatasetError(f"{name}: {path} holds data {data.dtype} {data.shape} and "
                                   f"{batch_labels.shape} labels; expected uint8 (N, 3072) and (N,)")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(batch_labels)
    except PARSE_ERRORS as e:
        raise DatasetError(f"{name}: {path} is not a CIFAR python-version pickle "
                           f"({type(e).__name__}: {e}); expected {layout}") from e
    labels = check_labels(np.concatenate(labels), len(classes), found)
    return ImageDataset(name, split, np.concatenate(images), labels, classes)


def load_cifar10(split: str, root: Path | None) -> ImageDataset:
    return read_cifar(
        "cifar10", split, root, folder="cifar-10-batches-py", layout=CIFAR10_LAYOUT,
        batches={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta", names_key=b"label_names", labels_key=b"labels")


def load_cifar100(split: str, root: Path | None) -> ImageDataset:
    return read_cifar(
        "cifar100", split, root, folder="cifar-100-python", layout=CIFAR100_LAYOUT,
        batches={"train": ("train",), "test": ("test",)},
        meta="meta", names_key=b"fine_label_names", labels_key=b"fine_labels")


register_dataset(DatasetSpec(
    "cifar10", load_cifar10, hflip=True, needs_root=True, aliases=("cifar-10",),
    description="CIFAR-10, 50,000/10,000, 32x32 RGB, 10 classes (python-version pickles)"))
register_dataset(DatasetSpec(
    "cifar100", load_cifar100, hflip=True, needs_root=True, aliases=("cifar-100",),
    description="CIFAR-100, 50,000/10,000, 32x32 RGB, 100 fine classes (python-version pickles)"))
