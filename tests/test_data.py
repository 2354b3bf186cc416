"""Dataset formats (tiny fixtures written in each published on-disk layout), the offline sets,
the errors a user meets, and the tensor transforms."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from divqat.data import (
    DatasetSpec,
    Normalize,
    _io,
    adapt,
    augment,
    channel_stats,
    dataset_names,
    dataset_spec,
    load_dataset,
    to_float,
)
from divqat.errors import DatasetError

RNG = np.random.default_rng(0)


def random_images(n: int, c: int, h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, c, h, w), dtype=np.uint8)


@pytest.fixture
def no_default_places(tmp_path, monkeypatch):
    """Hide the real data: no $DIVQAT_DATA, an empty cwd, no repo data/, no /usr/share."""
    monkeypatch.delenv(_io.DATA_ENV, raising=False)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.setattr(_io, "REPO_DATA", empty / "repo-data")
    monkeypatch.setattr(_io, "SYSTEM_DATA", empty / "system")


# --- Fashion-MNIST: IDX -------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 5, n_test: int = 3) -> dict[str, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[split] = images, labels
    return arrays


@pytest.mark.parametrize("sub", ["fashion-mnist", "."])
def test_fashion_mnist_idx_from_root(tmp_path, no_default_places, sub):
    arrays = write_fashion_mnist(tmp_path / sub)
    for split in ("train", "test"):
        ds = load_dataset("fashion-mnist", split, root=tmp_path)
        images, labels = arrays[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(images), 1, 28, 28)
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.images[:, 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_fashion_mnist_found_through_env_and_alias(tmp_path, no_default_places, monkeypatch):
    write_fashion_mnist(tmp_path / "fashion-mnist", n_train=4)
    monkeypatch.setenv(_io.DATA_ENV, str(tmp_path))
    assert len(load_dataset("fmnist", "train")) == 4


def test_fashion_mnist_missing_names_the_places_and_the_fix(tmp_path, no_default_places):
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "fashion-mnist") in message
    assert "make data" in message and "dataset-fashion-mnist" in message


def test_truncated_idx_is_a_dataset_error(tmp_path, no_default_places):
    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])  # the gzip stream stops mid-way
    with pytest.raises(DatasetError, match=str(images)):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_idx_with_fewer_bytes_than_its_header_promises(tmp_path, no_default_places):
    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01")
    with pytest.raises(DatasetError, match="truncated or garbled"):
        load_dataset("fashion-mnist", "test", root=tmp_path)
    with gzip.open(labels, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00")  # float32 IDX
    with pytest.raises(DatasetError, match="not an IDX file of unsigned bytes"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


# --- CIFAR --------------------------------------------------------------------------------------

def dump_py2_style(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(folder: Path, per_batch: int = 2) -> np.ndarray:
    folder.mkdir(parents=True)
    data = random_images(6 * per_batch, 3, 32, 32).reshape(-1, 3072)
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        dump_py2_style(folder / name, {b"batch_label": name.encode(), b"data": data[rows],
                                       b"labels": [(i + k) % 10 for k in range(per_batch)],
                                       b"filenames": [b"x.png"] * per_batch})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump_py2_style(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return data


def test_cifar10_python_pickles(tmp_path):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar-10", "test", root=tmp_path / "cifar-10-batches-py")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values.
    np.testing.assert_array_equal(train.images[3, 1].ravel(), data[3, 1024:2048])
    np.testing.assert_array_equal(train.labels[:4], [0, 1, 1, 2])
    np.testing.assert_array_equal(test.labels, [5, 6])
    assert train.labels.dtype == np.int64 and train.classes[1] == "automobile"


def test_cifar100_python_pickles(tmp_path):
    data = random_images(4, 3, 32, 32).reshape(-1, 3072)
    for name, rows in (("train", slice(0, 3)), ("test", slice(3, 4))):
        n = rows.stop - rows.start
        dump_py2_style(tmp_path / name, {b"data": data[rows], b"fine_labels": [99, 0, 42][:n],
                                         b"coarse_labels": [1] * n})
    fine = [f"class{i}".encode() for i in range(100)]
    dump_py2_style(tmp_path / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"x"]})
    train = load_dataset("cifar100", "train", root=tmp_path)
    assert train.images.shape == (3, 3, 32, 32) and train.num_classes == 100
    np.testing.assert_array_equal(train.labels, [99, 0, 42])
    assert train.classes[42] == "class42"
    np.testing.assert_array_equal(load_dataset("cifar100", "test", root=tmp_path).images[0].ravel(),
                                  data[3])


def test_garbled_cifar_pickle_is_a_dataset_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "test_batch").write_bytes(os.urandom(64))
    with pytest.raises(DatasetError, match=str(folder / "test_batch")):
        load_dataset("cifar10", "test", root=tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump_py2_style(folder / "test_batch", {b"data": _RunsCode(), b"labels": []})
    with pytest.raises(DatasetError, match="refusing"):
        load_dataset("cifar10", "test", root=tmp_path)


# --- SVHN ---------------------------------------------------------------------------------------

def test_svhn_mat_files(tmp_path, monkeypatch):
    (tmp_path / "svhn").mkdir()
    x = RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "svhn" / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [10]])})
    monkeypatch.setenv(_io.DATA_ENV, str(tmp_path))  # the env var stands in for --data-root
    ds = load_dataset("svhn", "train")
    assert ds.images.shape == (4, 3, 32, 32) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0])  # 10 is the digit 0
    np.testing.assert_array_equal(ds.images[2], x[..., 2].transpose(2, 0, 1))
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_dataset("svhn", "test", root=tmp_path)


# --- GTSRB --------------------------------------------------------------------------------------

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def write_sign(path: Path, class_id: int) -> str:
    """A 40x36 red ppm whose ROI (5..34 x 6..29, inclusive) is a solid color per class."""
    pixels = np.zeros((36, 40, 3), np.uint8)
    pixels[..., 0] = 255
    pixels[6:30, 5:35] = (0, 5 * class_id, 200)
    Image.fromarray(pixels).save(path)
    return f"{path.name};40;36;5;6;34;29;{class_id}\n"


def write_gtsrb(base: Path) -> None:
    for class_id in (0, 2):
        folder = base / "GTSRB" / "Final_Training" / "Images" / f"{class_id:05d}"
        folder.mkdir(parents=True)
        rows = [write_sign(folder / f"00000_{i:05d}.ppm", class_id) for i in range(2)]
        (folder / f"GT-{class_id:05d}.csv").write_text(GT_HEADER + "".join(rows))
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = [write_sign(test / f"{i:05d}.ppm", c) for i, c in enumerate((42, 7, 0))]
    (base / "GT-final_test.csv").write_text(GT_HEADER + "".join(rows))  # from GTSRB_Final_Test_GT.zip


def test_gtsrb_crops_to_the_roi_and_resizes(tmp_path):
    write_gtsrb(tmp_path)
    train = load_dataset("gtsrb", "train", root=tmp_path)
    assert train.images.shape == (4, 3, 32, 32) and train.num_classes == 43
    np.testing.assert_array_equal(train.labels, [0, 0, 2, 2])
    # Only the sign is left: no red border pixel survives the crop.
    np.testing.assert_array_equal(train.images[2], np.broadcast_to(
        np.array([0, 10, 200], np.uint8)[:, None, None], (3, 32, 32)))
    test = load_dataset("gtsrb", "test", root=tmp_path / "GTSRB")
    np.testing.assert_array_equal(test.labels, [42, 7, 0])
    assert test.classes[14] == "Stop"


def test_gtsrb_without_test_labels(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").unlink()
    with pytest.raises(DatasetError, match="GT-final_test.csv"):
        load_dataset("gtsrb", "test", root=tmp_path)


# --- image folders ------------------------------------------------------------------------------

def write_folder(root: Path, classes=("cat", "dog"), mode="L", n=2) -> None:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new(mode, (12, 10), color=(40 * c + i) if mode == "L" else (c, i, 7)).save(
                    folder / f"{i}.png")


def test_image_folder_gray_and_rgb(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "README.txt").write_text("not an image, ignored")
    ds = load_dataset("image-folder", "train", root=tmp_path)
    assert ds.images.shape == (4, 1, 32, 32) and ds.classes == ("cat", "dog")
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
    assert ds.images[3].min() == ds.images[3].max() == 41
    # One color image anywhere makes both splits RGB, so one model fits both.
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "test" / "dog" / "color.jpg")
    assert load_dataset("image-folder", "train", root=tmp_path).images.shape == (4, 3, 32, 32)


def test_image_folder_errors(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DatasetError, match="different class folders"):
        load_dataset("image-folder", "train", root=tmp_path)
    (tmp_path / "test" / "bird").rmdir()
    broken = tmp_path / "test" / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=str(broken)):
        load_dataset("image-folder", "test", root=tmp_path)


# --- the offline sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, n_train, n_test, size, hflip", [
    ("fashion-mnist", 60_000, 10_000, (28, 28), True),
    ("mnist", 4_000, 1_000, (28, 28), False),
    ("animal-mnist", 8_000, 2_000, (28, 28), True),
    ("digits", 1_438, 359, (8, 8), False),
])
def test_offline_sets(name, n_train, n_test, size, hflip):
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.size == test.size == size and train.channels == 1
    assert train.num_classes == 10 and dataset_spec(name).hflip is hflip
    assert set(np.unique(test.labels)) == set(range(10))
    assert train.images.max() > 200  # scaled to the full uint8 range


def test_fixed_splits_are_stratified_disjoint_and_repeatable():
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    np.testing.assert_array_equal(load_dataset("mnist", "test").images, test.images)
    seen = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in seen for row in test.images)


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "gtsrb", "image-folder"])
def test_needs_root(name, monkeypatch):
    monkeypatch.delenv(_io.DATA_ENV, raising=False)
    assert dataset_spec(name).needs_root
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset(name, "train")


def test_missing_root_folder(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "absent")):
        load_dataset("cifar10", "train", root=tmp_path / "absent")
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_unknown_name_and_split():
    with pytest.raises(DatasetError, match="cifar10, cifar100, digits"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="train, test"):
        load_dataset("mnist", "validation")
    assert "fashion-mnist" in dataset_names() and "fmnist" not in dataset_names()
    assert all(isinstance(dataset_spec(n), DatasetSpec) for n in dataset_names())


# --- transforms ---------------------------------------------------------------------------------

def test_channel_stats_matches_numpy():
    images = random_images(10, 3, 5, 4)
    mean, std = channel_stats(images, chunk=3)
    x = images / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-9)


def test_to_float():
    x = to_float(np.array([[[[0, 255]]]], np.uint8))
    assert x.dtype == torch.float32 and x.tolist() == [[[[0.0, 1.0]]]]
    with pytest.raises(TypeError):
        to_float(torch.zeros(1, 1, 2, 2))


def test_adapt_channels_and_sizes():
    gray = torch.rand(2, 1, 28, 28)
    rgb = adapt(gray, channels=3, size=32)
    assert rgb.shape == (2, 3, 32, 32)
    assert torch.equal(rgb[:, :, 2:30, 2:30], gray.expand(-1, 3, -1, -1))  # centred, 2 px each side
    assert rgb[:, :, :2].abs().sum() == 0 and rgb[:, :, :, 30:].abs().sum() == 0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert torch.allclose(adapt(red, 1, (8, 8)), torch.full((1, 1, 8, 8), 0.299))
    shrunk = adapt(torch.full((3, 3, 32, 32), 0.5), 1, (28, 28))  # RGB -> gray, antialiased resize
    assert shrunk.shape == (3, 1, 28, 28) and torch.allclose(shrunk, torch.tensor(0.5))
    assert adapt(torch.rand(1, 1, 8, 8), 1, (16, 4)).shape == (1, 1, 16, 4)  # one side larger
    assert adapt(gray, 1, (28, 28)) is gray


def test_normalize_exports():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(4, 3, 6, 6)
    expected = (x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)
    model = torch.nn.Sequential(norm, torch.nn.Conv2d(3, 2, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    other = torch.rand(7, 3, 6, 6)
    assert torch.allclose(exported.module()(other), model(other), atol=1e-6)
    assert set(dict(norm.named_buffers())) == {"mean", "std"}


def test_augment_shapes_determinism_and_flips():
    x = torch.arange(16 * 2 * 8 * 8, dtype=torch.float32).view(16, 2, 8, 8)
    out = augment(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment(x, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(out, augment(x, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(augment(x, pad=0, hflip=False), x)

    flipped = augment(x, pad=0, hflip=True, generator=torch.Generator().manual_seed(0))
    is_flip = [torch.equal(f, s.flip(-1)) for f, s in zip(flipped, x, strict=True)]
    is_same = [torch.equal(f, s) for f, s in zip(flipped, x, strict=True)]
    assert all(a != b for a, b in zip(is_flip, is_same, strict=True)) and any(is_flip) and any(is_same)

    # Every crop is a window of the zero-padded image, never mirrored when hflip=False.
    cropped = augment(x, pad=2, hflip=False, generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for out_i, pad_i in zip(cropped, padded, strict=True):
        windows = [pad_i[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out_i, w) for w in windows)
