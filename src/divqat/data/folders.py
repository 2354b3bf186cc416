"""Sets stored as one file per image: GTSRB (Stallkamp et al., 2012) and generic class folders.

Decoding tens of thousands of small files takes a while (GTSRB: about 50k); nothing is cached
to disk behind the user's back, callers that load often can keep the ImageDataset. An image
folder whose decoded images would exceed ``STREAM_BYTES`` is not decoded at all: it comes back
lazy (``divqat.data.streaming.FolderImages``) and training decodes its batches in worker
processes.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from divqat.data._io import (
    GRAY_MODES,
    PARSE_ERRORS,
    check_labels,
    image_mode,
    listed,
    read_image,
    require_root,
)
from divqat.data.base import SPLITS, DatasetSpec, ImageDataset, register_dataset
from divqat.data.sizes import sized_name
from divqat.data.streaming import FolderImages
from divqat.errors import ConfigError, DatasetError

# --- GTSRB ---------------------------------------------------------------------------------------

GTSRB_SIZE = (32, 32)
GTSRB_URL = "https://benchmark.ini.rub.de/gtsrb_dataset.html"
GTSRB_LAYOUT = (
    "DIR/GTSRB/Final_Training/Images/<00000..00042>/*.ppm with GT-<class>.csv in each class folder, "
    "DIR/GTSRB/Final_Test/Images/*.ppm, and GT-final_test.csv (the test labels) in "
    "Final_Test/Images, GTSRB or DIR: GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip "
    f"and GTSRB_Final_Test_GT.zip from {GTSRB_URL}, unzipped into DIR")

# The benchmark ships label ids only; these are the sign names in id order.
GTSRB_CLASSES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution",
    "Dangerous curve to the left", "Dangerous curve to the right", "Double curve", "Bumpy road",
    "Slippery road", "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians",
    "Children crossing", "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead", "Ahead only",
    "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)

Box = tuple[int, int, int, int]


def _gtsrb_candidates(root: Path) -> Iterator[Path]:
    """Folders that may be the GTSRB folder: root, root/GTSRB, and the same one level down
    (the zips are often unpacked into folders of their own names)."""
    yield root
    yield root / "GTSRB"
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        yield sub
        yield sub / "GTSRB"


def _read_gt_csv(path: Path) -> list[tuple[str, Box | None, int]]:
    """(filename, ROI box or None, class id) rows of a GTSRB annotation file."""
    try:
        with open(path, newline="") as f:
            rows = []
            for row in csv.DictReader(f, delimiter=";"):
                box = None
                if row.get("Roi.X1") not in (None, ""):
                    x1, y1, x2, y2 = (int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
                    # The ROI corners are inclusive pixel coordinates; Pillow's box excludes its
                    # right/lower edge. (Signs keep a >= 5 px margin, so one pixel is harmless.)
                    box = (x1, y1, x2 + 1, y2 + 1)
                rows.append((row["Filename"], box, int(row["ClassId"])))
    except (*PARSE_ERRORS, csv.Error) as e:
        raise DatasetError(f"gtsrb: cannot parse {path} as a GTSRB annotation file "
                           f"(Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId): "
                           f"{type(e).__name__}: {e}") from e
    return rows


def load_gtsrb(split: str, root: Path | None) -> ImageDataset:
    root = require_root("gtsrb", root, GTSRB_LAYOUT)
    sub = Path("Final_Training/Images" if split == "train" else "Final_Test/Images")
    candidates = list(_gtsrb_candidates(root))
    gtsrb = next((c for c in candidates if (c / sub).is_dir()), None)
    if gtsrb is None:
        raise DatasetError(f"gtsrb: no {sub} in {listed(candidates)}; expected {GTSRB_LAYOUT}")
    images_dir = gtsrb / sub

    samples: list[tuple[Path, Box | None, int]] = []
    if split == "train":
        for class_dir in sorted(p for p in images_dir.iterdir() if p.is_dir()):
            annotations = class_dir / f"GT-{class_dir.name}.csv"
            if annotations.is_file():
                samples += [(class_dir / f, box, c) for f, box, c in _read_gt_csv(annotations)]
            else:  # without annotations: whole images, class from the folder name
                try:
                    c = int(class_dir.name)
                except ValueError:
                    continue
                samples += [(p, None, c) for p in sorted(class_dir.glob("*.ppm"))]
    else:
        places = list(dict.fromkeys([images_dir, images_dir.parent, gtsrb, gtsrb.parent, root]))
        annotations = next((p / "GT-final_test.csv" for p in places
                            if (p / "GT-final_test.csv").is_file()), None)
        if annotations is None:
            raise DatasetError(f"gtsrb: the test labels GT-final_test.csv are in none of "
                               f"{listed(places)}; they come in GTSRB_Final_Test_GT.zip from "
                               f"{GTSRB_URL} (GT-final_test.test.csv has no labels)")
        samples = [(images_dir / f, box, c) for f, box, c in _read_gt_csv(annotations)]
    if not samples:
        raise DatasetError(f"gtsrb: no images found in {images_dir}; expected {GTSRB_LAYOUT}")

    images = np.stack([read_image(path, "RGB", GTSRB_SIZE, box)
                       for path, box, _ in samples])
    labels = check_labels(np.array([c for *_, c in samples]), len(GTSRB_CLASSES), images_dir)
    return ImageDataset("gtsrb", split, images, labels, GTSRB_CLASSES)


# --- generic class folders -----------------------------------------------------------------------

IMAGE_FOLDER_SIZE = (32, 32)
"""(H, W) every image-folder image is resized to without a chosen size (aspect ratio not kept).
``image-folder@H[xW]`` resizes the shorter side and center-crops instead (aspect kept)."""

IMAGE_FOLDER_LAYOUT = ("DIR/train/<class>/<image> and DIR/test/<class>/<image> (and optionally "
                       "DIR/val/<class>/<image>), the same class folders in each, any format "
                       "Pillow reads")

STREAM_BYTES = 2 * 1024**3
"""Decoded size (N * C * H * W bytes) above which an image-folder split stays on disk and is
decoded batch by batch (``FolderImages``) instead of held in memory. Overridden by the
environment variable ``DIVQAT_STREAM_BYTES`` or the ``stream_bytes`` keyword (0 streams always)."""

STREAM_ENV = "DIVQAT_STREAM_BYTES"


def stream_threshold(stream_bytes: int | None = None) -> int:
    """The threshold in force: ``stream_bytes``, else $DIVQAT_STREAM_BYTES, else STREAM_BYTES."""
    if stream_bytes is None:
        text = os.environ.get(STREAM_ENV)
        if not text:
            return STREAM_BYTES
        try:
            stream_bytes = int(text)
        except ValueError:
            raise ConfigError(f"{STREAM_ENV} must be a number of bytes, got {text!r}") from None
    if stream_bytes < 0:
        raise ConfigError(f"the streaming threshold must be >= 0 bytes, got {stream_bytes}")
    return stream_bytes


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    extensions = Image.registered_extensions()
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)


def load_image_folder(split: str, root: Path | None, size: tuple[int, int] | None = None, *,
                      stream_bytes: int | None = None) -> ImageDataset:
    """One split of DIR/{train,test[,val]}/<class>/<image>.

    size: None for the 32x32 of old (stretched); (H, W) to resize the shorter side and
        center-crop (``image-folder@H[xW]``), the dataset then named ``image-folder@...``.
    stream_bytes: decoded size above which the split comes back lazy (``stream_threshold``).
    """
    root = require_root("image-folder", root, IMAGE_FOLDER_LAYOUT)
    if not (root / split).is_dir():
        raise DatasetError(f"image-folder: no folder {root / split}; expected {IMAGE_FOLDER_LAYOUT}")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    folders = {s: _class_folders(d) for s, d in split_dirs.items()}
    classes = tuple(p.name for p in folders[split])
    for s, dirs in folders.items():
        if tuple(p.name for p in dirs) != classes:
            raise DatasetError(f"image-folder: {root / split} and {root / s} hold different class "
                               f"folders ({list(classes)} vs {[p.name for p in dirs]}); "
                               "the label ids would not match")
    files = {s: [(f, c) for c, d in enumerate(dirs) for f in _image_files(d)]
             for s, dirs in folders.items()}
    samples = files[split]
    if not samples:
        raise DatasetError(f"image-folder: no images under {root / split}; expected "
                           f"{IMAGE_FOLDER_LAYOUT}")
    # One channel count for both splits, or a model trained on one could not read the other.
    every_file = [f for pairs in files.values() for f, _ in pairs]
    mode = "L" if all(image_mode(f) in GRAY_MODES for f in every_file) else "RGB"
    # One reader for both paths, so a streamed split decodes to the very bytes an in-memory one holds.
    lazy = FolderImages([f for f, _ in samples], mode, size or IMAGE_FOLDER_SIZE,
                        fit="stretch" if size is None else "crop")
    images = lazy if lazy.nbytes > stream_threshold(stream_bytes) else lazy[:]
    labels = np.array([c for _, c in samples], dtype=np.int64)
    return ImageDataset(sized_name("image-folder", size), split, images, labels, classes)


register_dataset(DatasetSpec(
    "gtsrb", load_gtsrb, hflip=False, needs_root=True,
    description="German Traffic Sign Recognition Benchmark, 39,209/12,630, cropped to the sign "
                "and resized to 32x32 RGB, 43 classes"))
register_dataset(DatasetSpec(
    "image-folder", load_image_folder, hflip=True, needs_root=True,
    aliases=("imagefolder", "image_folder", "folder"), splits=SPLITS,
    sized_loader=load_image_folder,
    description="any DIR/{train,test[,val]}/<class>/<image> tree, resized to 32x32 (or "
                "image-folder@H[xW]: shorter side resized, center-cropped), gray if every image "
                "is gray else RGB; streamed from disk when larger than STREAM_BYTES decoded"))
