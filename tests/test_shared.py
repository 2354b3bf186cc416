"""The shared ground: parameter checks, atomic writes, the holdout rule, defense checking without
models, the surrogate recipe and the query boundary attacks see."""

import json

import numpy as np
import pytest
import torch

from divqat.attacks import SurrogateTraining, check_blackbox
from divqat.blackbox import BlackBox
from divqat.boundary import QueryBoundary
from divqat.checks import check_bool, check_choice, check_int, check_number
from divqat.data import ImageDataset, training_split
from divqat.defenses import MAD, PENDING_MODEL, check_defense
from divqat.errors import ConfigError
from divqat.io import atomic_write, write_json
from divqat.registry import params_text, parse_params


def test_checks_name_the_key_and_refuse_bools_and_floats_for_ints():
    with pytest.raises(ConfigError, match=r"^attacks\[0\]\.surrogate\.epochs must be an integer >= 1, got 0$"):
        check_int("attacks[0].surrogate", "epochs", 0, low=1)
    for bad in (True, 2.0, "3"):
        with pytest.raises(ConfigError, match="integer"):
            check_int("x", "n", bad, low=0)
    assert check_int("x", "n", None, low=0, optional=True) is None
    assert check_int("", "seed", -3) == -3  # no bound: any integer
    with pytest.raises(ConfigError, match=r"^dcp\.beta must be in \[0, 1\], got 2$"):
        check_number("dcp", "beta", 2, low=0, high=1)
    with pytest.raises(ConfigError, match=r"\(0, inf\)"):
        check_number("qat", "lr", 0, low=0, low_open=True)
    for bad in (True, float("nan"), float("inf"), "0.5"):
        with pytest.raises(ConfigError, match="finite number"):
            check_number("x", "y", bad)
    assert check_number("x", "y", 1) == 1.0 and isinstance(check_number("x", "y", 1), float)
    with pytest.raises(ConfigError, match="true or false"):
        check_bool("x", "flag", 1)
    with pytest.raises(ConfigError, match=r"x\.kind must be one of a, b; got 'c'"):
        check_choice("x", "kind", "c", ("a", "b"))


def test_params_text_inverts_parse_params():
    params = {"beta": 0.5, "k": 1, "flag": True}
    assert parse_params(params_text(params).split()) == params


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"a": 1})

    def broken(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp file left


def _dataset(n):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    return ImageDataset("toy", "train", images, np.zeros(n, dtype=np.int64), ("a",))


def test_training_split_is_a_prefix_and_the_held_out_tail():
    trained, held = training_split(_dataset(10), holdout=3)
    assert trained.images.ravel().tolist() == list(range(7))
    assert held.images.ravel().tolist() == [7, 8, 9]
    trained, held = training_split(_dataset(10), holdout=3, limit=4)
    assert trained.images.ravel().tolist() == [0, 1, 2, 3] and len(held) == 3  # limit never eats the holdout
    assert len(training_split(_dataset(10))[1]) == 0
    for bad in (10, -1, 2.0):
        with pytest.raises(ConfigError, match="holdout"):
            training_split(_dataset(10), holdout=bad)


def test_model_backed_defenses_are_checked_without_their_model():
    assert check_defense("mad", {"eps": 0.3}) is MAD
    with pytest.raises(ConfigError, match=r"mad\.eps must be in \[0, 2\]"):
        check_defense("mad", {"eps": 5})
    with pytest.raises(ConfigError, match="built from the victim"):
        check_defense("mad", {"surrogate": None})
    with pytest.raises(ConfigError, match="unknown defense"):
        check_defense("dpc", {})
    with pytest.raises(RuntimeError, match="parameter checking only"):
        PENDING_MODEL(torch.zeros(1, 1, 2, 2))


def test_surrogate_recipe_round_trips_and_keeps_old_stage_keys():
    training = SurrogateTraining(epochs=3, lr=0.05)
    recipe = training.recipe()
    assert "min_steps" not in recipe  # 0: left out, as before min_steps existed
    assert SurrogateTraining(**recipe) == SurrogateTraining(epochs=3, lr=0.05)
    assert SurrogateTraining(min_steps=10).recipe()["min_steps"] == 10
    with pytest.raises(ConfigError, match=r"surrogate\.epochs"):
        SurrogateTraining(epochs=0)


def test_attacks_take_only_a_query_boundary():
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    box = BlackBox(victim, budget=5, input_shape=(1, 2, 2), num_classes=3)
    assert isinstance(box, QueryBoundary) and check_blackbox(box) is box
    box.query(torch.rand(2, 1, 2, 2))
    assert (box.queries_used, box.queries_left) == (2, 3)
    with pytest.raises(TypeError, match="BlackBox"):
        check_blackbox(victim)
