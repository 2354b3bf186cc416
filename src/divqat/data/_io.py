"""Helpers the format readers share: where to look, safe unpickling, fixed splits, image decoding."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from divqat.errors import DatasetError

DATA_ENV = "DIVQAT_DATA"
"""Environment variable naming a data root, used when no --data-root is given."""

REPO_DATA = Path(__file__).resolve().parents[3] / "data"
"""The repository's data/ folder (where `make data` puts Fashion-MNIST), so an editable install
finds it from any working directory. Absent in a wheel install, and then simply skipped."""

SYSTEM_DATA = Path("/usr/share/datasets")
"""Where Debian's dataset-* packages install."""

SPLIT_SEED = 0
"""Seed of the fixed train/test splits of the sets that ship without one. It is part of the
dataset's definition, not of an experiment: every run must see the same test set."""

# What a truncated or garbled file raises while being parsed (gzip.BadGzipFile is an OSError).
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
    pickle.UnpicklingError, zlib.error,
)


def as_path(root: str | os.PathLike[str] | None) -> Path | None:
    return None if root is None else Path(root).expanduser()


def env_root() -> Path | None:
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def first_with(candidates: Iterable[Path], files: Sequence[str]) -> Path | None:
    """The first folder among ``candidates`` holding every one of ``files``."""
    for folder in candidates:
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def listed(paths: Iterable[Path]) -> str:
    return ", ".join(str(p) for p in dict.fromkeys(paths))


# Pickled numpy arrays need only these globals; refusing every other one means a data file can
# never run code (pickle.load alone would import and call whatever the file names).
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Files written before numpy 2 name numpy.core, which numpy 2 keeps only as a warning shim.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def unpickle(path: Path, *, encoding: str = "ASCII") -> Any:
    """Load a pickle (gzip'd when the name ends in .gz) that may hold only numpy arrays and
    builtins. encoding="bytes" reads Python 2 pickles such as CIFAR's with bytes keys."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return _NumpyUnpickler(f, encoding=encoding).load()


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train_indices, test_indices): ``test_fraction`` of every class goes to test.

    Both index arrays come shuffled, so the first rows of a split (--limit) cover every class
    even when the source file is sorted by class.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(rows) * test_fraction)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def read_image(path: Path, mode: str, size: tuple[int, int],
               box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """One image file -> uint8 (C, H, W) in ``mode`` ("L" or "RGB"), cropped to ``box``
    (left, upper, right, lower; clipped to the image) when given, then resized to ``size`` = (H, W)."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if box is not None:
                # Clip, or Pillow would pad a box reaching past the border with black.
                left, upper, right, lower = box
                im = im.crop((max(0, left), max(0, upper), min(im.width, right), min(im.height, lower)))
            if im.size != (size[1], size[0]):
                # Pillow's bilinear resize filters over the whole footprint when shrinking,
                # so small targets do not alias.
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, *PARSE_ERRORS) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def read_image_cropped(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image file -> uint8 (C, H, W) in ``mode`` ("L" or "RGB"), its shorter side resized to
    fit ``size`` = (H, W) and the rest center-cropped: the aspect ratio is kept, as a CNN trained
    on resized-and-cropped photos expects, instead of being squeezed."""
    height, width = size
    try:
        with Image.open(path) as im:
            # A JPEG can decode straight at 1/2, 1/4 or 1/8 scale (DCT scaling): several times
            # faster for photos much larger than the target. draft() never goes below the size
            # asked, here the size before the crop, so the final resize still does the filtering.
            scale = max(height / im.height, width / im.width)
            im.draft(mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            im = im.convert(mode)
            if im.size != (width, height):
                # Resamples straight from the centered crop box of the source (one filter pass).
                im = ImageOps.fit(im, (width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, *PARSE_ERRORS) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def image_mode(path: Path) -> str:
    """The Pillow mode of an image file, from its header only."""
    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, *PARSE_ERRORS) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def check_labels(labels: np.ndarray, num_classes: int, where: Path | str) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{where}: labels outside [0, {num_classes}): "
                           f"min {labels.min()}, max {labels.max()}")
    return labels


def require_root(name: str, root: Path | None, layout: str) -> Path:
    """The data root of a set that does not ship offline, or the DatasetError explaining it."""
    if root is None:
        raise DatasetError(f"{name} does not ship offline: pass --data-root DIR (or set {DATA_ENV}) "
                           f"with {layout}")
    if not root.is_dir():
        raise DatasetError(f"{name}: data root {root} is not a folder; expected {layout}")
    return root
