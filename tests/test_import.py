"""`divqat import` and `divqat train --init`: a user's weights file becomes an fp32 victim (the
teacher QAT and DivQAT start from), or the starting point of training; every misfit is one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

from divqat.cli import main
from divqat.errors import ArtifactError, ConfigError
from divqat.models import create_model
from divqat.models.weights import load_weights, read_state_dict
from divqat.pipelines.import_model import ImportRequest, import_victim
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.victim import load_fp32_net, load_victim


def _bare_weights(fp32_dir) -> dict[str, torch.Tensor]:
    """The trained tiny teacher's weights as a user would save them: the bare architecture's
    state dict, without divqat's normalization in front."""
    net, _ = load_fp32_net(fp32_dir)
    return net.net.state_dict()


def test_imported_teacher_answers_as_the_trained_one(tiny_victims, tmp_path):
    torch.save(_bare_weights(tiny_victims["fp32"]), tmp_path / "mine.pt")
    metrics = import_victim(ImportRequest("resnet8", tmp_path / "mine.pt", TINY, out=tmp_path / "imp"))
    trained = json.loads((tiny_victims["fp32"] / "metrics.json").read_text())
    # Same weights, same normalization (the training images' statistics): the same answers.
    assert metrics["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    meta = json.loads((tmp_path / "imp" / "victim.json").read_text())
    assert meta["mode"] == "fp32" and meta["imported_from"]["file"] == "mine.pt"
    assert len(meta["imported_from"]["sha256"]) == 64
    x = torch.rand(5, 1, 16, 16)
    assert torch.allclose(load_victim(tmp_path / "imp")(x), load_victim(tiny_victims["fp32"])(x), atol=1e-5)
    # ... and it is a teacher QAT fine-tunes.
    qat = train_victim(TrainRequest(dataset=TINY, arch="resnet8", mode="qat", teacher=tmp_path / "imp",
                                    epochs=1, out=tmp_path / "qat", progress=False, log_epochs=False))
    assert qat["int8_test_accuracy"] > 0.5


def test_wrappings_and_safetensors_are_read(tiny_victims, tmp_path):
    from safetensors.torch import save_file

    state = _bare_weights(tiny_victims["fp32"])
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ck.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("ck.pt", "w.safetensors"):
        read = read_state_dict(tmp_path / name)
        net = create_model("resnet8", 1, 4)
        report = load_weights(net, read)
        assert report.fits and len(report.loaded) > 10
        assert torch.equal(net.state_dict()["fc.weight"], state["fc.weight"])


def test_misfits_are_one_line(tiny_victims, tmp_path, capsys):
    state = _bare_weights(tiny_victims["fp32"])
    torch.save(state, tmp_path / "mine.pt")
    # Another architecture: missing keys named.
    with pytest.raises(ConfigError, match="missing from the file"):
        import_victim(ImportRequest("resnet20", tmp_path / "mine.pt", TINY, out=tmp_path / "a"))
    # A head for other classes: the shapes named.
    wrong = dict(state, **{"fc.weight": torch.zeros(7, 64), "fc.bias": torch.zeros(7)})
    torch.save(wrong, tmp_path / "head.pt")
    with pytest.raises(ConfigError, match=r"fc.weight \[7, 64\] in the file vs \[4, 64\]"):
        import_victim(ImportRequest("resnet8", tmp_path / "head.pt", TINY, out=tmp_path / "b"))
    # A pickled module, and not a weights file at all: ArtifactError naming what to save.
    torch.save(create_model("resnet8", 1, 4), tmp_path / "whole.pt")
    with pytest.raises(ArtifactError, match="state_dict"):
        read_state_dict(tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable"):
        read_state_dict(tmp_path / "junk.pt")
    # Through the command: exit 2, one line, nothing written.
    code = main(["import", "--arch", "resnet8", "--weights", str(tmp_path / "head.pt"), "--dataset", TINY,
                 "--out", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "of another shape" in err
    assert not (tmp_path / "c").exists()


def test_init_loads_what_fits_and_trains_the_rest(tiny_victims, tmp_path):
    state = _bare_weights(tiny_victims["fp32"])
    state.update({"fc.weight": torch.zeros(1000, 64), "fc.bias": torch.zeros(1000)})  # a backbone's head
    torch.save(state, tmp_path / "backbone.pt")
    m = train_victim(TrainRequest(dataset=TINY, arch="resnet8", epochs=1, out=tmp_path / "ft",
                                  init=tmp_path / "backbone.pt", progress=False, log_epochs=False))
    assert m["init"]["fresh"] == ["fc.weight", "fc.bias"]
    assert m["init"]["loaded"] == len(state) - 2
    meta = json.loads((tmp_path / "ft" / "victim.json").read_text())
    assert meta["init"]["file"] == "backbone.pt"
    with pytest.raises(ConfigError, match="--init only applies"):
        TrainRequest(dataset=TINY, mode="qat", teacher=tmp_path / "ft", init=tmp_path / "backbone.pt")
