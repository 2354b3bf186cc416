"""The evidence a watermark leaves: per API key, the marked inputs with their labels, and the
control inputs with the labels the mark would have given them (``divqat.ownership.watermark``).

``KeyMarks`` is one key's record; ``save_marks`` writes it as one ``.npz`` file (numpy arrays and
a JSON header, no pickle), the form ``divqat attack --watermark`` leaves in its folder;
``divqat.ownership.mark_store.load_marks`` reads a ``.npz`` file, a service's key database
(``MarkStore``: every key that was marked) or a folder of either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from divqat.errors import ArtifactError
from divqat.io import atomic_write

MARK, CONTROL = "mark", "control"
FORMAT = "divqat-marks"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True, eq=False)  # arrays: compared field by field where needed
class KeyMarks:
    """One key's watermark evidence.

    key: the key's name. input_shape: (C, H, W). num_classes: K. rate: the marking rate.
    mark_images: uint8 (M, C, H, W), the marked inputs as the victim saw them (round(255 x));
    mark_labels: (M,) int64, the wrong label each was answered with; mark_times: (M,) float64,
    when (Unix seconds; NaN unknown). control_images / control_labels / control_times: the same
    for unmarked inputs of the same stream (hash in [rate, 2 rate)), with the label the mark would
    have given them. answered, marked: answers given and answers marked in all, where counted.
    source: where the record was read from.
    """

    key: str
    input_shape: tuple[int, int, int]
    num_classes: int
    rate: float
    mark_images: np.ndarray
    mark_labels: np.ndarray
    mark_times: np.ndarray
    control_images: np.ndarray
    control_labels: np.ndarray
    control_times: np.ndarray
    answered: int | None = None
    marked: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for kind in (MARK, CONTROL):
            images, labels = getattr(self, f"{kind}_images"), getattr(self, f"{kind}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_shape):
                raise ArtifactError(f"marks of key {self.key!r}: {kind} images must be uint8 "
                                    f"(N, {', '.join(map(str, self.input_shape))}), got {images.dtype} "
                                    f"{images.shape}")
            if labels.shape != (len(images),) or getattr(self, f"{kind}_times").shape != (len(images),):
                raise ArtifactError(f"marks of key {self.key!r}: one {kind} label and time per image")
            if len(labels) and not (0 <= labels.min() and labels.max() < self.num_classes):
                raise ArtifactError(f"marks of key {self.key!r}: {kind} labels outside 0..{self.num_classes - 1}")

    @property
    def marks(self) -> int:
        return len(self.mark_labels)

    @property
    def controls(self) -> int:
        return len(self.control_labels)

    def header(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "key": self.key,
                "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "rate": self.rate, "answered": self.answered, "marked": self.marked}


def save_marks(marks: KeyMarks, path: str | Path) -> Path:
    """Write one key's marks as ``.npz`` (uint8 images, int64 labels, float64 times, a JSON
    header); returns the path. No secret is written: verifying needs only the labels."""
    path = Path(path)
    arrays = {f"{kind}_{part}": getattr(marks, f"{kind}_{part}") for kind in (MARK, CONTROL)
              for part in ("images", "labels", "times")}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, header=np.array(json.dumps(marks.header())), **arrays)

    atomic_write(path, write)
    return path


def read_npz(path: str | Path) -> KeyMarks:
    """One key's marks from a ``.npz`` written by ``save_marks``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {name: data[name] for name in data.files if name != "header"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not a divqat marks file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a divqat marks file (no \"format\": \"{FORMAT}\")")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has marks format version {header.get('format_version')}; this "
                            f"divqat reads {FORMAT_VERSION}")
    try:
        return KeyMarks(header["key"], tuple(header["input_shape"]), int(header["num_classes"]),
                        float(header["rate"]), **{k: arrays[k] for k in (
                            "mark_images", "mark_labels", "mark_times", "control_images",
                            "control_labels", "control_times")},
                        answered=header.get("answered"), marked=header.get("marked"), source=str(path))
    except KeyError as e:
        raise ArtifactError(f"{path} lacks {e.args[0]}: not a complete divqat marks file") from None


__all__ = ["CONTROL", "MARK", "KeyMarks", "read_npz", "save_marks"]
