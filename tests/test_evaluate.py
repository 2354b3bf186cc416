"""Metrics of a defended victim: the distances on hand-computed posteriors, and evaluate_defense on
a tiny trained victim (none changes nothing, top-1 keeps every argmax, a flip is detected)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, _load_tiny, make_bars

from divqat import load_victim
from divqat.data import adapt, load_dataset, to_float
from divqat.defenses import Defense, create_defense
from divqat.errors import ConfigError, DatasetError
from divqat.pipelines.defend import (
    KL_CLAMP,
    evaluate_defense,
    load_queries,
    parse_query_set,
    posterior_distances,
)

KEYS = {"defense", "params", "defender_accuracy", "victim_accuracy", "test_images", "l1_distance",
        "kl_divergence", "argmax_changed", "queries", "ms_per_query_clean", "ms_per_query_defended",
        "latency_ratio"}


class Reversed(Defense):
    """Test defense that moves the argmax: reverses the class order."""

    name = "reversed"

    def forward(self, y, logits, images):
        return y.flip(1)


@pytest.fixture(scope="module")
def victim(tiny_victims):
    return load_victim(tiny_victims["fp32"])


@pytest.fixture(scope="module")
def test_set():
    return _load_tiny("test", None)


def test_posterior_distances_match_hand_computed_values():
    clean = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.8, 0.0]])
    defended = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]])
    d = posterior_distances(clean, defended)
    assert d["l1"].tolist() == pytest.approx([1.0, 0.0])
    # KL(clean || defended): zeros of the defended posterior are clamped at KL_CLAMP, and a class
    # the clean posterior gives 0 adds nothing (0 log 0 = 0).
    first = 0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25 / KL_CLAMP)
    assert d["kl"].tolist() == pytest.approx([first, 0.0])
    assert d["argmax_changed"].tolist() == [False, False]
    assert posterior_distances(clean, clean.roll(1, dims=1))["argmax_changed"].tolist() == [True, True]


def test_no_defense_changes_nothing(victim, test_set):
    m = evaluate_defense(victim, create_defense("none"), test_set)
    assert KEYS <= m.keys()
    logits = victim(to_float(test_set.images))
    expected = (logits.argmax(1) == torch.as_tensor(test_set.labels)).float().mean().item()
    assert m["defender_accuracy"] == pytest.approx(expected) == m["victim_accuracy"]
    assert m["defender_accuracy"] > 0.5  # chance is 0.25
    assert m["l1_distance"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert m["argmax_changed"] == 0.0
    assert m["queries"] == m["test_images"] == len(test_set)
    assert m["defense"] == "none" and m["params"] == {}
    # Timed separately (the victim alone, then the served query): both real, neither bounds the other.
    assert m["ms_per_query_clean"] > 0 and m["ms_per_query_defended"] > 0
    assert m["latency_ratio"] == pytest.approx(m["ms_per_query_defended"] / m["ms_per_query_clean"])


def test_top_1_keeps_every_argmax_but_moves_the_posteriors(victim, test_set):
    m = evaluate_defense(victim, create_defense("top-k", k=1), test_set, batch_size=50)
    assert m["argmax_changed"] == 0.0
    assert m["defender_accuracy"] == m["victim_accuracy"]
    assert m["l1_distance"] > 0
    assert 0 < m["kl_divergence"] < math.inf
    assert m["params"] == {"k": 1}


def test_a_defense_that_moves_the_argmax_is_detected(victim, test_set):
    queries, _ = make_bars(70, seed=5)
    m = evaluate_defense(victim, Reversed(), test_set, queries, batch_size=32)
    clean = victim(to_float(queries)).argmax(1)
    flipped = 3 - clean  # the argmax of the reversed posterior (no ties in trained logits)
    assert m["queries"] == 70
    assert m["argmax_changed"] == pytest.approx((flipped != clean).float().mean().item())
    assert m["argmax_changed"] > 0.5
    assert m["defender_accuracy"] < m["victim_accuracy"]
    assert m["l1_distance"] > 0.5


def test_bad_arguments_are_config_errors(victim, test_set):
    with pytest.raises(ConfigError, match="batch size"):
        evaluate_defense(victim, create_defense("none"), test_set, batch_size=0)
    with pytest.raises(ConfigError, match="empty"):
        evaluate_defense(victim, create_defense("none"), test_set, torch.zeros(0, 1, 16, 16))
    with pytest.raises(ConfigError, match="classes"):
        evaluate_defense(victim, create_defense("none"), load_dataset("digits", "test"))


@pytest.mark.parametrize(("text", "expected"), [
    ("mnist", ("mnist", "test")), ("digits:train", ("digits", "train")),
    (f" {TINY} : test ", (TINY, "test")), ("fmnist:test", ("fashion-mnist", "test")),
])
def test_parse_query_set(text, expected):
    assert parse_query_set(text) == expected


@pytest.mark.parametrize("text", ["", ":test", "mnist:", "mnist:test:x", "mnist:valid"])
def test_parse_query_set_refuses_bad_syntax(text):
    with pytest.raises(ConfigError, match="query set"):
        parse_query_set(text)


def test_parse_query_set_unknown_dataset_lists_the_names():
    with pytest.raises(DatasetError, match="choose one of: .*mnist"):
        parse_query_set("imagenet:test")


def test_load_queries_adapts_any_dataset_to_the_victim():
    name, x = load_queries("digits:test", (3, 16, 16), limit=7)
    digits = load_dataset("digits", "test")
    assert name == "digits:test" and x.shape == (7, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, adapt(to_float(digits.images[:7]), 3, 16))
    _, smaller = load_queries(f"{TINY}:train", (1, 8, 8), limit=3)  # resized down: stays in [0, 1]
    assert smaller.shape == (3, 1, 8, 8) and 0 <= smaller.min() and smaller.max() <= 1
    with pytest.raises(ConfigError, match="limit"):
        load_queries("digits", (1, 16, 16), limit=0)
