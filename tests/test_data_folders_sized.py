"""Image folders at a chosen size (``image-folder@H[xW]``), with a val/ split, and streamed from
disk (``FolderImages``): the streamed path must give the very bytes, batches and logits the
in-memory path gives."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divqat.data import (
    FolderImages,
    channel_stats,
    dataset_spec,
    is_lazy,
    load_dataset,
    parse_image_size,
    random_resized_crop,
    sized_name,
    split_size,
)
from divqat.data.folders import load_image_folder
from divqat.errors import DatasetError

CLASSES = ("ant", "bee", "cat")


def write_folder(root: Path, splits=("train", "test"), n=8, gray=False, size=(50, 40)) -> None:
    """Noise images of ``size`` = (W, H) with a bright left band, per class a different color."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
                pixels[:, :5] = 250
                pixels[..., c] += 100
                im = Image.fromarray(pixels)
                (im.convert("L") if gray else im).save(folder / f"{i}.png")


@pytest.fixture
def folder(tmp_path) -> Path:
    write_folder(tmp_path)
    return tmp_path


def test_parse_image_size_and_names():
    assert parse_image_size("96") == (96, 96) and parse_image_size(" 96x128 ") == (96, 128)
    assert sized_name("image-folder", (96, 96)) == "image-folder@96"
    assert sized_name("image-folder", (96, 128)) == "image-folder@96x128"
    assert sized_name("image-folder[0-2]", (64, 64)) == "image-folder@64[0-2]"
    assert sized_name("image-folder", None) == "image-folder"
    assert split_size("image-folder@64[0-2]") == ("image-folder[0-2]", (64, 64))
    assert split_size("image-folder[0-2]@64x32") == ("image-folder[0-2]", (64, 32))
    for bad in ("", "x96", "96x", "96x128x3", "-4", "4", "96128", "ninety", "96 x 128"):
        with pytest.raises(DatasetError, match="bad image size") as error:
            parse_image_size(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(DatasetError, match="one size at most"):
        split_size("image-folder@64@32")


def test_dataset_spec_composes_sizes_and_subsets():
    assert dataset_spec("folder@64").name == "image-folder@64"
    assert dataset_spec("image-folder@64[0-1]").name == "image-folder@64[0-1]"
    assert dataset_spec("image-folder[0-1]@64").name == "image-folder@64[0-1]"
    assert dataset_spec("image-folder@64x48").name == "image-folder@64x48"
    assert "val" in dataset_spec("image-folder@64").splits
    with pytest.raises(DatasetError, match="fixed image size"):
        dataset_spec("mnist@64")
    with pytest.raises(DatasetError, match="bad image size"):
        dataset_spec("image-folder@big")


def test_sized_folder_is_resized_and_center_cropped(folder):
    train = load_dataset("image-folder@24", "train", folder)
    assert train.name == "image-folder@24" and train.images.shape == (24, 3, 24, 24)
    assert train.classes == CLASSES and isinstance(train.images, np.ndarray)
    # 50x40 (W x H) -> shorter side 40 -> 24: width 30, center crop drops 3 px each side,
    # which cuts most of the 5 px bright band at the left edge (scaled to 3 px).
    reference = np.asarray(Image.open(folder / "train" / "ant" / "0.png").resize(
        (30, 24), Image.Resampling.BILINEAR, box=(0, 0, 50, 40)))[:, 3:27]
    assert np.abs(train.images[0].transpose(1, 2, 0).astype(int) - reference).max() <= 2
    wide = load_dataset("image-folder@24x32", "test", folder)
    assert wide.name == "image-folder@24x32" and wide.images.shape == (24, 3, 24, 32)
    # Without a size: today's 32x32, stretched, under the plain name.
    plain = load_dataset("image-folder", "train", folder)
    assert plain.name == "image-folder" and plain.images.shape == (24, 3, 32, 32)
    subset = load_dataset("image-folder[1-2]@24", "train", folder)
    assert subset.name == "image-folder@24[1-2]" and subset.classes == CLASSES[1:]
    np.testing.assert_array_equal(subset.images, train.images[8:])


def test_gray_folder_stays_gray(tmp_path):
    write_folder(tmp_path, gray=True, n=2)
    assert load_dataset("image-folder@16x20", "train", tmp_path).images.shape == (6, 1, 16, 20)


def test_val_split(folder):
    with pytest.raises(DatasetError, match="val"):
        load_dataset("image-folder@24", "val", folder)
    write_folder(folder, splits=("val",), n=3)
    val = load_dataset("image-folder@24", "val", folder)
    assert val.split == "val" and val.images.shape == (9, 3, 24, 24)
    with pytest.raises(DatasetError, match="unknown split 'val' of mnist"):
        load_dataset("mnist", "val")


def test_streamed_folder_gives_the_same_bytes(folder, monkeypatch):
    memory = load_image_folder("train", folder, (24, 24))
    streamed = load_image_folder("train", folder, (24, 24), stream_bytes=0)
    assert is_lazy(streamed.images) and not is_lazy(memory.images)
    assert streamed.images.shape == memory.images.shape and len(streamed) == len(memory)
    idx = np.array([5, 0, 23, 5])
    np.testing.assert_array_equal(streamed.images[idx], memory.images[idx])
    np.testing.assert_array_equal(streamed.images[torch.tensor(idx)], memory.images[idx])
    np.testing.assert_array_equal(streamed.images[3:9:2], memory.images[3:9:2])
    np.testing.assert_array_equal(streamed.images[-1], memory.images[-1])
    assert streamed.images[np.array([], dtype=np.int64)].shape == (0, 3, 24, 24)
    # Views stay lazy and pick the same rows.
    head = streamed.subset(slice(2, 10))
    assert is_lazy(head.images)
    np.testing.assert_array_equal(head.images[:], memory.images[2:10])
    some = streamed.select_classes((2, 0))
    assert is_lazy(some.images) and some.name == "image-folder@24[2,0]"
    np.testing.assert_array_equal(some.images[:], memory.select_classes((2, 0)).images)
    np.testing.assert_array_equal(some.labels, memory.select_classes((2, 0)).labels)
    # Workers get it by pickle: the file list only.
    again = pickle.loads(pickle.dumps(streamed.images))
    np.testing.assert_array_equal(again[:4], memory.images[:4])
    # The environment variable forces it too, for load_dataset; the unsized path streams alike.
    monkeypatch.setenv("DIVQAT_STREAM_BYTES", "0")
    plain = load_dataset("image-folder", "test", folder)
    assert is_lazy(plain.images)
    monkeypatch.delenv("DIVQAT_STREAM_BYTES")
    np.testing.assert_array_equal(plain.images[:], load_dataset("image-folder", "test", folder).images)


def test_channel_stats_of_lazy_images_and_samples(folder):
    memory = load_image_folder("train", folder, (24, 24))
    streamed = load_image_folder("train", folder, (24, 24), stream_bytes=0)
    assert channel_stats(streamed.images) == channel_stats(memory.images)
    sampled = channel_stats(streamed.images, sample=10)
    assert sampled == channel_stats(memory.images, sample=10) != channel_stats(memory.images)
    assert channel_stats(memory.images, sample=1000) == channel_stats(memory.images)


def test_random_resized_crop_is_seeded_and_keeps_shape():
    x = torch.rand(6, 3, 20, 28)
    out = random_resized_crop(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, random_resized_crop(x, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(out, random_resized_crop(x, generator=torch.Generator().manual_seed(2)))
    # The whole image at scale 1 and ratio W/H: the identity, or its mirror.
    full = random_resized_crop(x, scale=(1.0, 1.0), ratio=(28 / 20, 28 / 20),
                               generator=torch.Generator().manual_seed(0))
    for f, s in zip(full, x, strict=True):
        assert torch.allclose(f, s, atol=1e-5) or torch.allclose(f, s.flip(-1), atol=1e-5)
    kept = random_resized_crop(x, scale=(1.0, 1.0), ratio=(28 / 20, 28 / 20), hflip=False)
    assert torch.allclose(kept, x, atol=1e-5)
    with pytest.raises(TypeError):
        random_resized_crop(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_folder_images_checks():
    with pytest.raises(ValueError):
        FolderImages([], "CMYK", (8, 8))
    empty = FolderImages([], "L", (8, 8))
    assert empty.shape == (0, 1, 8, 8) and len(empty) == 0 and empty.dtype == np.uint8


# --- training and evaluation through the streamed path --------------------------------------------

class Recorder:
    """Cross-entropy that keeps every batch it is shown."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, logits, targets, inputs, progress):
        self.batches.append((inputs.detach().clone(), targets.clone()))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss, {"loss": loss.detach()}


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, len(CLASSES)))


def train_once(data, crop: str, workers: int):
    from divqat.train.trainer import FitConfig, fit

    model, objective = tiny_net(), Recorder()
    cfg = FitConfig(epochs=2, batch_size=5, lr=0.05, crop=crop, workers=workers, seed=3,
                    progress=False, log_epochs=False)
    history = fit(model, data.images, data.labels, objective, cfg)
    return model, objective.batches, history


@pytest.mark.parametrize("crop, workers", [("auto", 0), ("resized", 0), ("resized", 2)])
def test_streamed_fit_sees_the_same_batches(folder, crop, workers):
    memory = load_image_folder("train", folder, (24, 24))
    streamed = load_image_folder("train", folder, (24, 24), stream_bytes=0)
    m_model, m_batches, m_history = train_once(memory, crop, 0)
    s_model, s_batches, s_history = train_once(streamed, crop, workers)
    assert len(m_batches) == len(s_batches) == 2 * 5
    for (mx, my), (sx, sy) in zip(m_batches, s_batches, strict=True):
        assert torch.equal(mx, sx) and torch.equal(my, sy)
    assert m_history.epochs == s_history.epochs
    for (name, a), (_, b) in zip(m_model.state_dict().items(), s_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_auto_crop_keeps_small_images_on_the_pad_crop(folder):
    from divqat.train.trainer import resolve_crop

    assert resolve_crop("auto", (32, 32)) == resolve_crop("auto", (28, 28)) == "pad"
    assert resolve_crop("auto", (64, 96)) == resolve_crop("resized", (8, 8)) == "resized"
    memory = load_image_folder("train", folder, (24, 24))
    _, auto_batches, _ = train_once(memory, "auto", 0)
    _, pad_batches, _ = train_once(memory, "pad", 0)
    assert all(torch.equal(a[0], p[0]) for a, p in zip(auto_batches, pad_batches, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_predict_logits(folder, workers):
    from divqat.train.trainer import predict_logits

    memory = load_image_folder("test", folder, (24, 24))
    streamed = load_image_folder("test", folder, (24, 24), stream_bytes=0)
    model = tiny_net().eval()
    expected = predict_logits(model, memory.images, batch_size=7)
    assert torch.equal(predict_logits(model, streamed.images, batch_size=7, workers=workers), expected)
