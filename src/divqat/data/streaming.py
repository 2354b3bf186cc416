"""Image folders too large to hold in memory: uint8 images that stay on disk until indexed.

``FolderImages`` stands where an ``ImageDataset`` otherwise holds its (N, C, H, W) uint8 array.
It keeps the file list only, never a decoded image, so its memory does not grow with N (50,000
paths are a few MB; the same images at 96x96 RGB would be 1.4 GB). ``images[idx]`` decodes
those files and returns the numpy array the in-memory set would have returned, byte for byte
(the same reader does both), so code that indexes batches keeps working; ``subset`` gives a
lazy view. It pickles as its file list, so DataLoader worker processes get it cheaply
(``divqat.train.trainer.fit`` decodes batches there).
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch

from divqat.data._io import read_image, read_image_cropped

FITS = ("crop", "stretch")
"""How a file is brought to (H, W): shorter side resized then center-cropped (aspect kept), or
resized to (H, W) outright (the 32x32 image-folder of old)."""


class FolderImages:
    """Lazy uint8 images (N, C, H, W), decoded from ``files`` on every access.

    files: one path per image, in dataset order. mode: "L" or "RGB" (C = 1 or 3).
    size: (H, W). fit: "crop" or "stretch" (FITS).
    Indexing follows numpy: an int gives (C, H, W); a slice, an index or boolean array, a list or
    a tensor give (n, C, H, W). Nothing decoded is cached.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files: Sequence[str | PathLike[str]] | np.ndarray, mode: str,
                 size: tuple[int, int], fit: str = "crop") -> None:
        if mode not in ("L", "RGB") or fit not in FITS:
            raise ValueError(f"FolderImages needs mode L or RGB and fit in {FITS}, got {mode!r}, {fit!r}")
        self.files = np.array([str(f) for f in files], dtype=object)
        self.mode, self.fit = mode, fit
        self.size = (int(size[0]), int(size[1]))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.files), 1 if self.mode == "L" else 3, *self.size

    @property
    def nbytes(self) -> int:
        """What the decoded array would take."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} files, {self.mode}, {self.size[0]}x{self.size[1]}, {self.fit})"

    def _rows(self, key: Any) -> np.ndarray:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        return np.arange(len(self.files))[key]

    def _decode(self, path: str) -> np.ndarray:
        if self.fit == "crop":
            return read_image_cropped(path, self.mode, self.size)
        return read_image(path, self.mode, self.size)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            return self._decode(self.files[int(key)])
        rows = self._rows(key)
        if rows.ndim != 1:
            raise IndexError(f"FolderImages takes an int, a slice or a 1-d index, got shape {rows.shape}")
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = self._decode(self.files[row])
        return out

    def subset(self, key: Any) -> FolderImages:
        """A lazy view on some rows (a slice, an index or boolean array): nothing is decoded."""
        view = FolderImages.__new__(FolderImages)
        view.files, view.mode, view.fit, view.size = self.files[self._rows(key)], self.mode, self.fit, self.size
        return view

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # np.asarray(images) decodes everything: explicit, for the small sets (a test split) that
        # code written for in-memory arrays converts whole.
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def is_lazy(images: Any) -> bool:
    """Whether ``images`` decode on access (``FolderImages``) rather than sit in memory."""
    return isinstance(images, FolderImages)


__all__ = ["FITS", "FolderImages", "is_lazy"]
