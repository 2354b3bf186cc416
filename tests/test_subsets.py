"""Class subsets of datasets (``NAME[a-b]``, ``NAME[a,b,c]``): parsing, relabelling, errors, and
their use everywhere a dataset is named (training, transfer and query sets, configs, the CLI)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import TINY, TINY_CLASSES

from divqat.cli import main
from divqat.data import dataset_spec, load_dataset, split_subset, subset_name
from divqat.errors import ConfigError, DatasetError
from divqat.experiment import parse_config
from divqat.pipelines.attack import load_transfer_set
from divqat.pipelines.defend import parse_query_set
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.victim import read_metadata


@pytest.mark.parametrize("text, name, classes, canonical", [
    ("fashion-mnist[0-4]", "fashion-mnist", (0, 1, 2, 3, 4), "fashion-mnist[0-4]"),
    ("fashion-mnist[5,6,7,8,9]", "fashion-mnist", (5, 6, 7, 8, 9), "fashion-mnist[5-9]"),
    (" mnist[ 7 , 2 ] ", "mnist", (7, 2), "mnist[7,2]"),
    ("mnist[0-2,9,4-5]", "mnist", (0, 1, 2, 9, 4, 5), "mnist[0-2,9,4-5]"),
    ("mnist[3]", "mnist", (3,), "mnist[3]"),
    ("mnist", "mnist", None, "mnist"),
])
def test_parse_and_canonical_spelling(text, name, classes, canonical):
    assert split_subset(text) == (name, classes)
    assert subset_name(name, classes) == canonical


@pytest.mark.parametrize("text, expected", [
    ("mnist[", "expected NAME[a-b]"),
    ("mnist[]", "'' is not a class index"),
    ("mnist[1;2]", "'1;2' is not a class index"),
    ("mnist[-1]", "not a class index"),
    ("mnist[4-2]", "runs backwards"),
    ("mnist[1,0-2]", "class 1 is listed twice"),
    ("mnist[0-1][2]", "expected NAME[a-b]"),
    ("[0-1]", "expected NAME[a-b]"),
])
def test_bad_syntax_is_one_line(text, expected):
    with pytest.raises(DatasetError, match=r"bad class subset") as info:
        dataset_spec(text)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_subset_keeps_the_classes_relabelled_in_the_order_given():
    full = load_dataset(TINY, "train")
    part = load_dataset(f"{TINY}[3,1]", "train")
    assert part.name == f"{TINY}[3,1]" and part.classes == (TINY_CLASSES[3], TINY_CLASSES[1])
    keep = np.flatnonzero(np.isin(full.labels, [3, 1]))
    np.testing.assert_array_equal(part.images, full.images[keep])  # order within the split kept
    np.testing.assert_array_equal(part.labels, np.where(full.labels[keep] == 3, 0, 1))
    assert part.labels.dtype == np.int64 and part.images.flags["C_CONTIGUOUS"]


def test_spec_of_a_subset_and_out_of_range_classes():
    spec = dataset_spec("fmnist[0 - 4]".replace(" ", ""))
    assert spec.name == "fashion-mnist[0-4]" and spec.hflip is True
    assert dataset_spec("cifar10[0-4]").needs_root
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'"):
        dataset_spec("imagenet[0-4]")
    with pytest.raises(DatasetError, match=r"tiny-bars\[2-5\]: class 4 is out of range; the dataset has "
                                           r"classes 0-3 \(top, upper, lower, bottom\)"):
        load_dataset(f"{TINY}[2-5]", "test")


def test_fashion_mnist_halves():
    low, high = load_dataset("fashion-mnist[0-4]", "test"), load_dataset("fashion-mnist[5-9]", "test")
    assert len(low) == len(high) == 5000
    assert high.classes == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    np.testing.assert_array_equal(np.bincount(high.labels), [1000] * 5)


def test_query_sets_and_configs_name_subsets_canonically():
    assert parse_query_set(f"{TINY}[0,1]:train") == (f"{TINY}[0-1]", "train")
    assert parse_query_set("fmnist[5-9]") == ("fashion-mnist[5-9]", "test")
    from test_experiment import TINY_CONFIG

    raw = copy.deepcopy(TINY_CONFIG)
    raw["victim"]["dataset"] = f"{TINY}[0,1,2]"
    raw["attacks"][0]["transfer"] = ["holdout", f"{TINY}[3]"]
    config = parse_config(raw)
    assert config.victim.dataset == f"{TINY}[0-2]"
    assert config.attacks[0].transfer == ("holdout", f"{TINY}[3]:train")
    raw["victim"]["dataset"] = f"{TINY}[0-2"
    with pytest.raises(ConfigError, match=r"victim\.dataset: bad class subset"):
        parse_config(raw)


def test_victim_records_its_subset_and_reloads_it(tmp_path):
    out = tmp_path / "fp32"
    metrics = train_victim(TrainRequest(dataset=f"{TINY}[3,0,1]", mode="fp32", epochs=1, holdout=20,
                                        out=out, progress=False, log_epochs=False))
    meta = read_metadata(out)
    assert meta["dataset"] == metrics["dataset"] == f"{TINY}[3,0-1]"
    assert meta["classes"] == [TINY_CLASSES[3], TINY_CLASSES[0], TINY_CLASSES[1]]
    train = load_dataset(meta["dataset"], "train")
    assert meta["train_images"] == len(train) - 20
    holdout = load_transfer_set("holdout", meta)
    assert holdout.name == f"{TINY}[3,0-1]:train[-20:]" and len(holdout.images) == 20
    np.testing.assert_array_equal(holdout.labels.numpy(), train.labels[-20:])
    other = load_transfer_set(f"{TINY}[2]", meta)  # the class the victim never saw
    assert other.name == f"{TINY}[2]:train" and set(other.labels.tolist()) == {0}
    # A QAT victim must start from a teacher of the same subset, however it is spelled: this one
    # passes the dataset check and stops at the next one (the architecture).
    with pytest.raises(ConfigError, match="is a resnet8, not a resnet20"):
        train_victim(TrainRequest(dataset=f"{TINY}[3,0,1]", arch="resnet20", mode="qat", teacher=out,
                                  epochs=1, out=tmp_path / "qat", progress=False, log_epochs=False))
    with pytest.raises(ConfigError, match="was trained on"):
        train_victim(TrainRequest(dataset=f"{TINY}[0-2]", mode="qat", teacher=out, epochs=1,
                                  out=tmp_path / "x", progress=False, log_epochs=False))


def test_cli_takes_a_subset_and_refuses_a_bad_one(tmp_path, capsys):
    code = main(["train", "--dataset", f"{TINY}[0-9]", "--epochs", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "class 4 is out of range" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="at least two"):
        train_victim(TrainRequest(dataset=f"{TINY}[1]", epochs=1, out=tmp_path / "y", progress=False))
