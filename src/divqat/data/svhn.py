"""SVHN cropped digits (Netzer et al., 2011) in the published MATLAB format 2 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from divqat.data._io import PARSE_ERRORS, check_labels, first_with, listed, require_root
from divqat.data.base import DatasetSpec, ImageDataset, register_dataset
from divqat.errors import DatasetError

SVHN_LAYOUT = ("DIR/svhn/ holding train_32x32.mat and test_32x32.mat (the 'Format 2: cropped "
               "digits' files from http://ufldl.stanford.edu/housenumbers/)")


def load_svhn(split: str, root: Path | None) -> ImageDataset:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    root = require_root("svhn", root, SVHN_LAYOUT)
    name = f"{split}_32x32.mat"
    candidates = [root / "svhn", root / "SVHN", root]
    found = first_with(candidates, (name,))
    if found is None:
        raise DatasetError(f"svhn: no {name} in {listed(candidates)}; expected {SVHN_LAYOUT}")
    path = found / name
    try:
        mat = loadmat(path, variable_names=("X", "y"))
        x, y = mat["X"], mat["y"]
    except (*PARSE_ERRORS, MatReadError, NotImplementedError) as e:
        raise DatasetError(f"svhn: cannot read {path} ({type(e).__name__}: {e}); "
                           f"expected {SVHN_LAYOUT}") from e
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DatasetError(f"svhn: {path} holds X {x.dtype} {x.shape} and y {y.shape}; "
                           "expected uint8 (32, 32, 3, N) and (N, 1)")
    # X is stored (H, W, C, N), MATLAB's column-major habit.
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # the files label the digit 0 as 10
    return ImageDataset("svhn", split, images, check_labels(labels, 10, path),
                        tuple(str(d) for d in range(10)))


register_dataset(DatasetSpec(
    "svhn", load_svhn, hflip=False, needs_root=True,
    description="Street View House Numbers, cropped digits, 73,257/26,032, 32x32 RGB"))
