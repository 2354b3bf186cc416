"""The shared attack pieces (query cache, soft cross-entropy, the black-box check) and
`divqat attack` / `divqat attacks` on a saved int8 victim, errors included."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from divqat.attacks import (
    QueryCache,
    SurrogateTraining,
    TransferSet,
    check_blackbox,
    create_attack,
    soft_cross_entropy,
    train_surrogate,
)
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.cli import main
from divqat.errors import ConfigError
from divqat.pipelines.attack import AttackRequest, attack_victim, load_transfer_set
from divqat.pipelines.context import RunContext
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.victim import read_metadata

ATTACK_METRICS = {"adversary_accuracy", "adversary_error", "agreement", "queries_used",
                  "defender_accuracy", "l1_distance"}


def steal(victim, attack, *, log=None, **request):
    """``attack_victim`` with the request's fields as keywords, the default context and ``log``."""
    return attack_victim(AttackRequest(victim, attack, **request), RunContext(log=log))


def test_soft_cross_entropy_is_cross_entropy_on_one_hot_and_labels():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(labels, 4).float()), ce)
    assert torch.allclose(soft_cross_entropy(logits, labels), ce)
    # Against a soft target the minimum is at the target itself (the thief copies the posterior).
    target = torch.softmax(torch.randn(6, 4), dim=1)
    assert soft_cross_entropy(target.log(), target) < soft_cross_entropy(logits, target)


def test_query_cache_prefix_is_what_a_smaller_budget_bought(bars_victim):
    box = BlackBox(bars_victim, budget=100)
    cache = QueryCache()
    first, second = torch.rand(30, 1, 16, 16), torch.rand(50, 1, 16, 16)
    a = cache.query(box, first)
    b = cache.query(box, second)
    assert len(cache) == 80 == box.queries_used
    images, answers = cache.take(40)
    assert torch.equal(images, torch.cat([first, second[:10]]))
    assert torch.equal(answers, torch.cat([a, b[:10]]))
    assert box.queries_used == 80  # taking from the cache queries nothing


def test_query_cache_stores_labels_from_a_label_only_box(bars_victim):
    box = BlackBox(bars_victim, budget=10, label_only=True)
    cache = QueryCache()
    labels = cache.query(box, torch.rand(10, 1, 16, 16))
    assert labels.dtype == torch.int64 and labels.shape == (10,)


def test_attacks_take_only_a_black_box(bars_victim):
    with pytest.raises(TypeError, match="BlackBox"):
        check_blackbox(bars_victim)
    with pytest.raises(TypeError, match="BlackBox"):
        check_blackbox(DefendedVictim(bars_victim))
    transfer = TransferSet("t", torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="BlackBox"):
        create_attack("knockoff").steal(bars_victim, [8], SurrogateTraining(epochs=1, progress=False),
                                        transfer=transfer)


def test_unknown_attack_and_parameter_errors_name_the_choices():
    with pytest.raises(ConfigError, match="knockoff"):
        create_attack("knockof")
    with pytest.raises(ConfigError, match="batch_size"):
        create_attack("knockoff", batchsize=3)
    with pytest.raises(ConfigError, match="epochs"):
        SurrogateTraining(epochs=0)
    with pytest.raises(ConfigError, match="resnet8"):
        SurrogateTraining(arch="resnet9")
    with pytest.raises(ConfigError, match="min_steps"):
        SurrogateTraining(min_steps=-1)


def test_min_steps_gives_small_query_sets_more_epochs(bars_victim):
    training = SurrogateTraining(epochs=5, batch_size=128, min_steps=300)
    assert training.epochs_for(500) == 75     # 4 steps an epoch
    assert training.epochs_for(5000) == 8     # 40 steps an epoch
    assert training.epochs_for(50_000) == 5   # epochs already give more than 300 steps
    assert SurrogateTraining(epochs=5).epochs_for(500) == 5  # no floor by default
    # The surrogate really trains that long: one history entry per epoch.
    images = torch.rand(40, 1, 16, 16)
    floor = SurrogateTraining(epochs=1, batch_size=16, min_steps=9, progress=False)
    _, history = train_surrogate(images, bars_victim(images).softmax(dim=1), floor, (1, 16, 16), 4)
    assert len(history) == 3  # 3 steps an epoch, 9 steps


def test_attack_victim_steals_the_tiny_int8_victim(tiny_victims, tmp_path):
    training = SurrogateTraining(epochs=4, batch_size=32, progress=False)
    out = tmp_path / "attack"
    m = steal(tiny_victims["qat"], "knockoff", budgets=[200, 64], transfer="tiny-bars:train",
              training=training, out=out)
    assert ATTACK_METRICS <= set(m)
    assert [r["budget"] for r in m["results"]] == [64, 200]
    assert [r["queries_used"] for r in m["results"]] == [64, 200]
    assert m["queries_used"] == 200  # the sweep cost the largest budget, not the sum
    assert m["adversary_accuracy"] > 0.6  # 4 classes: chance is 25 %
    assert m["agreement"] == pytest.approx(m["agreement_clean"])  # no defense: same victim argmax
    assert m["l1_distance"] == 0 and m["defender_accuracy"] == m["victim_accuracy"]
    assert json.loads((out / "metrics.json").read_text())["results"] == m["results"]


def test_label_only_thief_behind_a_defense_that_keeps_every_label_measures_its_twins_surrogates(
        tiny_victims, tmp_path, monkeypatch):
    """DCP with beta = 0 changes no answer: the label-only thief behind it is shown what it is
    shown behind none, so its surrogates are the twin's; trained again they come out the same."""
    from divqat.pipelines import attack as attack_module

    training = SurrogateTraining(epochs=2, batch_size=32, progress=False)
    common = dict(budgets=[40, 80], transfer="tiny-bars:train", training=training, labels_only=True)
    twin = steal(tiny_victims["qat"], "knockoff", out=tmp_path / "none", **common)
    assert (tmp_path / "none" / attack_module.PREDICTIONS).is_file()
    dcp = dict(defense="dcp", defense_params={"beta": 0.0}, **common)
    trained = steal(tiny_victims["qat"], "knockoff", out=tmp_path / "trained", **dcp)
    lines: list[str] = []
    shared = steal(tiny_victims["qat"], "knockoff", out=tmp_path / "shared", twin=tmp_path / "none",
                   log=lines.append, **dcp)
    assert "surrogates_from" not in trained and shared["surrogates_from"]["folder"] == str(tmp_path / "none")
    assert any("changed none of the" in line for line in lines)
    measured = ("budget", "queries_used", "adversary_accuracy", "agreement", "agreement_clean")
    for a, b, c in zip(twin["results"], trained["results"], shared["results"], strict=True):
        assert {k: c[k] for k in measured} == {k: b[k] for k in measured}  # trained again: the same
        assert c["adversary_accuracy"] == a["adversary_accuracy"]
    # The defense's own figures are this defense's, not the twin's.
    assert shared["defense"] == "dcp" and shared["defense_params"]["beta"] == 0.0
    assert shared["queries_used"] == twin["queries_used"] == 80
    # A run folder copied elsewhere (the thieves preset starts from a copy of the default run):
    # the twin names the victim by its old path and is still this thief's twin.
    record_file = tmp_path / "none" / "metrics.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "victim": f"/elsewhere/stages/victim/{record['victim'].rsplit('/', 1)[-1]}"}))
    moved = steal(tiny_victims["qat"], "knockoff", out=tmp_path / "moved", twin=tmp_path / "none", **dcp)
    assert moved["surrogates_from"]["folder"] == str(tmp_path / "none")
    assert [r["adversary_accuracy"] for r in moved["results"]] == [r["adversary_accuracy"] for r in shared["results"]]

    # A defense that changes a label of the transfer set: the thief trains its own surrogates.
    monkeypatch.setattr(attack_module, "labels_changed", lambda served, images: 3)
    lines.clear()
    own = steal(tiny_victims["qat"], "knockoff", twin=tmp_path / "none", log=lines.append, **dcp)
    assert "surrogates_from" not in own
    assert any("changes the label of 3 of" in line for line in lines)
    # A twin that kept no predictions (an older divqat's): the same, and the check is not run.
    (tmp_path / "none" / attack_module.PREDICTIONS).rename(tmp_path / "kept")
    monkeypatch.setattr(attack_module, "labels_changed", lambda served, images: pytest.fail("checked"))
    lines.clear()
    own = steal(tiny_victims["qat"], "knockoff", twin=tmp_path / "none", log=lines.append, **dcp)
    assert "surrogates_from" not in own and any("kept no predictions.pt" in line for line in lines)
    (tmp_path / "kept").rename(tmp_path / "none" / attack_module.PREDICTIONS)
    # Another thief's folder is refused rather than measured.
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="not this thief"):
        steal(tiny_victims["qat"], "knockoff", twin=tmp_path / "none",
              **{**dcp, "budgets": [40, 80], "training": SurrogateTraining(epochs=3, batch_size=32,
                                                                         progress=False)})
    # A corrupt predictions.pt is named, with what to do.
    (tmp_path / "none" / attack_module.PREDICTIONS).write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="predictions.pt is unreadable .*delete"):
        steal(tiny_victims["qat"], "knockoff", twin=tmp_path / "none", **dcp)


def test_attack_cli_label_only_behind_a_defense(tiny_victims, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["attack", "--victim", str(tiny_victims["qat"]), "--attack", "knockoff",
                 "--defense", "dcp", "--param", "beta=0.5", "--transfer", "tiny-bars:train",
                 "--budget", "100", "--epochs", "2", "--labels-only", "--no-progress", "--out", str(out)])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["labels_only"] is True and m["defense"] == "dcp" and m["defense_params"]["beta"] == 0.5
    assert m["queries_used"] == 100
    assert "adversary accuracy" in capsys.readouterr().out


def test_attack_cli_errors_are_one_line(tiny_victims, tmp_path, capsys):
    base = ["attack", "--victim", str(tiny_victims["qat"]), "--budget", "10", "--out", str(tmp_path / "x")]
    assert main([*base, "--attack", "knockoff", "--transfer", "holdout"]) == 2
    assert "--holdout" in capsys.readouterr().err
    assert main([*base, "--attack", "knockoff"]) == 2
    assert "needs a transfer set" in capsys.readouterr().err
    assert main([*base, "--attack", "nope", "--transfer", "mnist"]) == 2
    assert "knockoff" in capsys.readouterr().err
    assert main([*base, "--attack", "knockoff", "--transfer", "no-such-set"]) == 2
    assert "fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_holdout_transfer_set_is_what_the_victims_never_trained_on(tiny_victims, tmp_path):
    fp32 = tmp_path / "fp32"
    train_victim(TrainRequest(dataset="tiny-bars", mode="fp32", epochs=1, holdout=84, out=fp32, progress=False))
    qat = tmp_path / "qat"
    # The QAT victim keeps its teacher's held-out images out of its own fine-tuning too.
    train_victim(TrainRequest(dataset="tiny-bars", mode="qat", teacher=fp32, epochs=1, out=qat, progress=False))
    meta = read_metadata(qat)
    assert meta["holdout"] == 84 and meta["train_images"] == 300
    transfer = load_transfer_set("holdout", meta)
    from conftest import _load_tiny

    train = _load_tiny("train", None)
    assert len(transfer) == 84
    assert torch.equal(transfer.images, torch.from_numpy(train.images[300:]))
    assert transfer.name == "tiny-bars:train[-84:]"


def test_every_registered_attack_knows_its_name_and_lists_its_defaults():
    from divqat.attacks import ATTACKS, describe_attacks

    rows = {name: defaults for name, _, defaults in describe_attacks()}
    assert set(rows) == {"knockoff", "knockoff-adaptive", "jbda", "dfme", "maze", "recovery", "fixmatch",
                         "averaging", "sybil"}
    for name in ATTACKS.names():
        assert ATTACKS.get(name).name == name  # error messages name the attack
        assert create_attack(name).params() == rows[name]


def test_data_free_attacks_refuse_label_only(tiny_victims, tmp_path):
    with pytest.raises(ConfigError, match="posteriors"):
        steal(tiny_victims["qat"], "dfme", budgets=[100], labels_only=True, out=tmp_path / "x")


def test_surrogates_measured_in_bf16_agree_with_fp32(bars_victim, monkeypatch, one_thread):
    from divqat.pipelines import attack as attack_module
    from divqat.train import trainer

    images = torch.rand(256, 1, 16, 16)
    training = SurrogateTraining(epochs=3, batch_size=32, precision="bf16", eval_precision="bf16",
                                 progress=False)
    surrogate, _ = train_surrogate(images, bars_victim(images).softmax(dim=1), training, (1, 16, 16), 4)
    test = torch.rand(300, 1, 16, 16)
    fp32 = attack_module.surrogate_predictions(surrogate, test)
    bf16 = attack_module.surrogate_predictions(surrogate, test, precision="bf16")
    assert fp32.shape == bf16.shape == (300,)
    assert (fp32 == bf16).float().mean() >= 0.95  # bf16 rounding flips only near-ties
    assert surrogate.training is False  # measured in eval mode; the folded copy left it as it was
    # Where the CPU has no native bf16 the measurement is fp32's, exactly.
    monkeypatch.setattr(trainer, "bf16_supported", lambda: False)
    assert torch.equal(attack_module.surrogate_predictions(surrogate, test, precision="bf16"), fp32)
    assert training.recipe()["eval_precision"] == "bf16"
    assert "eval_precision" not in SurrogateTraining().recipe()  # the keys of older configs hold
    with pytest.raises(ConfigError, match="eval_precision"):
        SurrogateTraining(eval_precision="fp16")
