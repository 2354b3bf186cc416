"""Building defenses for a saved victim (the misinformation model trained once and reused, MAD's
seeded surrogate) and the `divqat defend` / `divqat defenses` commands, errors included."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import _load_tiny

from divqat import load_victim
from divqat.cli import main
from divqat.data import to_float
from divqat.defenses import DCP, DEFENSES, MAD, AdaptiveMisinformation
from divqat.errors import ArtifactError, ConfigError
from divqat.models import VictimNet
from divqat.pipelines.defense_models import (
    MISINFORMATION_DIR,
    build_defense,
    ensure_misinformation_model,
    list_defenses,
    load_misinformation_model,
    random_surrogate,
    victim_training_images,
)
from divqat.victim import read_metadata

METRICS = {"defender_accuracy", "l1_distance", "kl_divergence", "argmax_changed", "ms_per_query_clean",
           "ms_per_query_defended", "defense", "params", "victim", "victim_mode", "query_set", "queries"}


@pytest.fixture(scope="module")
def victim_dir(tiny_victims, tmp_path_factory):
    """A private copy of the tiny fp32 victim: these tests write its misinformation model."""
    return shutil.copytree(tiny_victims["fp32"], tmp_path_factory.mktemp("defend") / "fp32")


@pytest.fixture(scope="module")
def misinformation(victim_dir):
    """The misinformation model, trained once for the module (2 epochs), and whether it was."""
    return ensure_misinformation_model(victim_dir, epochs=2, seed=0, progress=False)


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_misinformation_model_is_trained_saved_and_reused(victim_dir, misinformation):
    model, trained = misinformation
    assert trained and isinstance(model, VictimNet) and not model.training
    where = victim_dir / MISINFORMATION_DIR
    meta = read_metadata(where)
    assert meta["role"] == "misinformation-model" and meta["mode"] == "fp32"
    assert meta["epochs"] == 2 and meta["train_images"] == 384
    victim_meta = read_metadata(victim_dir)
    assert {k: meta[k] for k in ("arch", "mean", "std", "classes")} == {
        k: victim_meta[k] for k in ("arch", "mean", "std", "classes")}
    # Trained to be wrong: well below the victim on its test split, and below chance (0.25).
    test = _load_tiny("test", None)
    wrong = (model(to_float(test.images)).argmax(1) == torch.as_tensor(test.labels)).float().mean()
    assert wrong < 0.25 and meta["metrics"]["test_accuracy"] == pytest.approx(float(wrong))
    # Reused: no second training, the files untouched, the same weights.
    stamp = (where / "weights.pt").stat().st_mtime_ns
    messages = []
    again, trained_again = ensure_misinformation_model(victim_dir, epochs=3, seed=0, log=messages.append)
    assert not trained_again and (where / "weights.pt").stat().st_mtime_ns == stamp
    assert "using the misinformation model" in messages[0]
    assert "trained for 2 epochs" in messages[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    defense = build_defense("adaptive-misinformation", {"tau": 0.9}, victim_dir)
    assert isinstance(defense, AdaptiveMisinformation) and defense.tau == 0.9
    assert (where / "weights.pt").stat().st_mtime_ns == stamp


def test_misinformation_model_of_a_changed_victim_is_refused(victim_dir, misinformation, tmp_path):
    changed = shutil.copytree(victim_dir, tmp_path / "changed")
    meta = json.loads((changed / "victim.json").read_text())
    meta["epochs"] += 1  # as if retrained
    (changed / "victim.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="earlier version"):
        load_misinformation_model(changed)


def test_victim_training_images_respect_holdout_and_limit(victim_dir):
    meta = read_metadata(victim_dir)
    full = victim_training_images(meta)
    assert len(full) == 384
    held = victim_training_images({**meta, "train_images": None, "holdout": 84, "limit": 200})
    assert len(held) == 200 and (held.images == full.images[:200]).all()
    assert len(victim_training_images({**meta, "train_images": None, "holdout": 84, "limit": None})) == 300


def test_mad_gets_a_seeded_random_surrogate_of_the_victims_arch(victim_dir):
    defense = build_defense("mad", {"eps": 0.3}, victim_dir, seed=1)
    assert isinstance(defense, MAD) and defense.eps == 0.3
    assert isinstance(defense.surrogate, VictimNet) and defense.last_layer == "net.fc"
    same = random_surrogate(victim_dir, seed=1).state_dict()
    other = random_surrogate(victim_dir, seed=2).state_dict()
    assert all(torch.equal(same[k], v) for k, v in defense.surrogate.state_dict().items())
    assert not torch.equal(same["net.fc.weight"], other["net.fc.weight"])
    images = to_float(_load_tiny("test", None).images[:8])
    posteriors = torch.softmax(load_victim(victim_dir)(images), dim=1)
    defended = defense(posteriors, images=images)
    assert ((defended - posteriors).abs().sum(1) <= 0.3 + 1e-5).all()


def test_build_defense_formula_defenses_and_errors(victim_dir):
    assert isinstance(build_defense("dcp", {"beta": 0.4}), DCP)
    with pytest.raises(ConfigError, match="unknown defense"):
        build_defense("deception", {}, victim_dir)
    with pytest.raises(ConfigError, match="built from the victim"):
        build_defense("mad", {"surrogate": "x"}, victim_dir)
    with pytest.raises(ConfigError, match="victim directory"):
        build_defense("mad", {})
    with pytest.raises(ArtifactError, match="no victim directory"):
        build_defense("mad", {}, victim_dir.parent / "missing")


def test_bad_misinformation_parameters_fail_before_training(tiny_victims, tmp_path):
    victim = shutil.copytree(tiny_victims["fp32"], tmp_path / "v")
    with pytest.raises(ConfigError, match="tau"):
        build_defense("adaptive-misinformation", {"tau": -1}, victim)
    with pytest.raises(ConfigError, match="no parameter 'beta'"):
        build_defense("adaptive-misinformation", {"beta": 1}, victim)
    with pytest.raises(ConfigError, match="epochs"):
        build_defense("adaptive-misinformation", {}, victim, misinformation_epochs=0)
    assert not (victim / MISINFORMATION_DIR).exists()


def test_list_defenses_hides_the_model_arguments():
    rows = {r["name"]: r for r in list_defenses()}
    assert set(rows) == set(DEFENSES.names())
    assert rows["mad"]["params"]["eps"] == 0.5 and "surrogate" not in rows["mad"]["params"]
    assert "misinformation_model" not in rows["adaptive-misinformation"]["params"]
    assert rows["dcp"]["model"] is None and rows["mad"]["model"]


# ---------------------------------------------------------------- the CLI

def test_cli_defenses_lists_every_defense_with_defaults(capsys):
    code, out, _ = run(["defenses"], capsys)
    assert code == 0
    for name in DEFENSES.names():
        assert f"\n{name} " in f"\n{out}"
    assert "beta=0.5" in out and "k=1" in out and "decimals=2" in out and "eps=0.5" in out


def test_cli_defend_writes_metrics(victim_dir, tmp_path, capsys):
    out_dir = tmp_path / "dcp"
    code, out, _ = run(["defend", "--victim", str(victim_dir), "--defense", "dcp", "--param", "beta=0.5",
                        "--param", "gamma=0.2", "--queries", "digits:test", "--limit", "50",
                        "--no-progress", "--out", str(out_dir)], capsys)
    assert code == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert METRICS <= metrics.keys()
    assert metrics["defense"] == "dcp" and metrics["params"]["beta"] == 0.5 and metrics["params"]["gamma"] == 0.2
    assert metrics["query_set"] == "digits:test" and metrics["queries"] == 50
    assert metrics["victim"] == str(victim_dir) and metrics["victim_mode"] == "fp32"
    assert metrics["test_images"] == 128 and metrics["test_set"].endswith(":test")
    assert "defender accuracy" in out and "argmax changed" in out and "ms/query" in out
    assert str(out_dir / "metrics.json") in out


def test_cli_defend_int8_victim_on_its_own_test_split(tiny_victims, tmp_path, capsys):
    out_dir = tmp_path / "none"
    code, _, _ = run(["defend", "--victim", str(tiny_victims["qat"]), "--defense", "none", "--no-progress",
                      "--out", str(out_dir)], capsys)
    assert code == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    recorded = read_metadata(tiny_victims["qat"])["metrics"]["int8_test_accuracy"]
    assert metrics["victim_mode"] == "qat" and metrics["queries"] == metrics["test_images"] == 128
    assert metrics["defender_accuracy"] == pytest.approx(recorded)
    assert metrics["l1_distance"] == 0 and metrics["argmax_changed"] == 0


def test_cli_defend_times_warm_victim_and_served_path(tiny_victims, tmp_path, capsys):
    """Both sides of the latency ratio are timed after their compilation: a victim alone whose
    first call per batch size were timed would look hundreds of times slower than served."""
    out_dir = tmp_path / "dcp"
    code, _, _ = run(["defend", "--victim", str(tiny_victims["qat"]), "--defense", "dcp", "--param", "beta=0.9",
                      "--queries", "tiny-bars:train", "--no-progress", "--out", str(out_dir)], capsys)
    assert code == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["queries"] == 384  # batches of 256 and 128: two sizes, each warmed up
    assert 0.2 < metrics["latency_ratio"] < 5, metrics


def test_cli_defend_model_backed_defenses(victim_dir, misinformation, tmp_path, capsys):
    code, _, err = run(["defend", "--victim", str(victim_dir), "--defense", "adaptive-misinformation",
                        "--param", "tau=0.99", "--misinformation-epochs", "2", "--limit", "40",
                        "--no-progress", "--out", str(tmp_path / "am")], capsys)
    assert code == 0 and "using the misinformation model" in err  # trained by the fixture, reused
    metrics = json.loads((tmp_path / "am" / "metrics.json").read_text())
    assert metrics["params"]["tau"] == 0.99 and metrics["misinformation_model"].endswith(MISINFORMATION_DIR)
    assert metrics["l1_distance"] > 0
    code, _, _ = run(["defend", "--victim", str(victim_dir), "--defense", "mad", "--param", "eps=0.2",
                      "--limit", "40", "--no-progress", "--out", str(tmp_path / "mad")], capsys)
    metrics = json.loads((tmp_path / "mad" / "metrics.json").read_text())
    assert code == 0 and 0 < metrics["l1_distance"] <= 0.2 + 1e-6 and metrics["seed"] == 0


@pytest.mark.parametrize(("args", "words"), [
    (["--defense", "deception"], "unknown defense 'deception'"),
    (["--defense", "dcp", "--param", "betta=0.5"], "no parameter 'betta'"),
    (["--defense", "dcp", "--param", "beta=-1"], "beta must be in"),
    (["--defense", "dcp", "--param", "beta"], "expected key=value"),
    (["--defense", "top-k", "--param", "k=0"], "k must be an integer >= 1"),
    (["--defense", "dcp", "--queries", "mnist:val"], "split must be one of"),
    (["--defense", "dcp", "--queries", "mnist:test:x"], "bad query set"),
    (["--defense", "dcp", "--queries", "imagenet"], "unknown dataset 'imagenet'"),
    (["--defense", "mad", "--param", "surrogate=resnet8"], "built from the victim"),
    (["--defense", "adaptive-misinformation", "--param", "tau=-0.5"], "tau must be in"),
])
def test_cli_defend_bad_inputs_are_one_line(victim_dir, tmp_path, capsys, args, words):
    code, _, err = run(["defend", "--victim", str(victim_dir), *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 0 and words in err and err.startswith("divqat defend: error:")
    assert not (tmp_path / "o").exists()


def test_cli_defend_missing_victim(tmp_path, capsys):
    code, _, err = run(["defend", "--victim", str(tmp_path / "nowhere"), "--defense", "dcp",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 0 and "no victim directory" in err
