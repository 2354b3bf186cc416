"""Shared fixtures: a tiny learnable dataset registered under a test-only name, and tiny victims
trained once per session from it (fp32, then QAT from that teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from divqat.data import DATASETS, DatasetSpec, ImageDataset, register_dataset

TINY = "tiny-bars"

# The smallest experiment that runs every stage kind of the default grid (tests/test_experiment.py,
# tests/test_ownership_experiment.py build theirs from it).
TINY_CONFIG = {
    "name": "tiny",
    "seeds": [0],
    "victim": {"dataset": TINY, "arch": "resnet8", "holdout": 96, "batch_size": 64},
    "fp32": {"epochs": 3},
    "qat": {"epochs": 1},
    "divqat": {"alphas": [2.0], "epochs": 1},
    "defenses": ["none", {"name": "dcp", "params": {"beta": 0.5}}],
    "attacks": [{"name": "knockoff", "transfer": "holdout", "labels_only": [False, True],
                 "budgets": [40, 80], "surrogate": {"epochs": 2, "batch_size": 32}}],
}
TINY_CLASSES = ("top", "upper", "lower", "bottom")


def make_bars(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Gray noise with one bright horizontal band whose position is the label: learnable in
    a few hundred steps, yet not trivially linear because of the noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TINY_CLASSES), n)
    images = rng.integers(0, 90, (n, 1, size, size))
    band = size // len(TINY_CLASSES)
    for i, k in enumerate(labels):
        images[i, 0, k * band:(k + 1) * band, :] += 120
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


def _load_tiny(split: str, root) -> ImageDataset:
    images, labels = make_bars(384 if split == "train" else 128, seed=0 if split == "train" else 1)
    return ImageDataset(TINY, split, images, labels, TINY_CLASSES)


if TINY not in DATASETS:
    register_dataset(DatasetSpec(TINY, _load_tiny, hflip=True, description="test-only synthetic bars"))


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread, for tests that run many tiny steps (the attacks' loops): on a shared
    2-core machine two OpenMP threads spin against each other and such loops run several times
    slower than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_victims(tmp_path_factory):
    """Paths of a tiny fp32 teacher and its QAT int8 victim, trained once for the session."""
    from divqat.pipelines.train import TrainRequest, train_victim

    root = tmp_path_factory.mktemp("victims")
    fp32 = root / "fp32"
    train_victim(TrainRequest(dataset=TINY, arch="resnet8", mode="fp32", epochs=6, out=fp32, progress=False))
    qat = root / "qat"
    train_victim(TrainRequest(dataset=TINY, arch="resnet8", mode="qat", teacher=fp32, epochs=1, out=qat,
                              progress=False))
    return {"fp32": fp32, "qat": qat}


class BarsVictim:
    """A hand-made victim for the tiny-bars data: logit k = how much brighter band k is than the
    image's mean (x 20). No training, deterministic, fast; its argmax is right on almost every
    tiny-bars image, so an attack that learns anything learns something real."""

    input_shape = (1, 16, 16)
    num_classes = len(TINY_CLASSES)

    def __init__(self) -> None:
        self.seen = 0  # every image it was shown: what a query budget must account for

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        bands = images.mean(dim=(1, 3)).reshape(len(images), self.num_classes, -1).mean(dim=2)
        return 20.0 * (bands - bands.mean(dim=1, keepdim=True))


@pytest.fixture
def bars_victim():
    return BarsVictim()


@pytest.fixture
def bars_test():
    """The tiny-bars test split as (float images in [0, 1], labels)."""
    images, labels = make_bars(128, seed=1)
    return torch.from_numpy(images).float() / 255, torch.from_numpy(labels)
