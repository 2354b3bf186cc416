"""Tiny end-to-end training in each mode, the victim artifact, and the CLI's errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY, _load_tiny

from divqat import load_victim
from divqat.cli import main
from divqat.data import to_float
from divqat.errors import ArtifactError, ConfigError, TrainingCollapsed
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.train import DivQATSettings
from divqat.train.losses import RECOMMENDED

METRIC_KEYS = {"test_accuracy", "int8_test_accuracy", "kl_to_teacher", "l1_to_teacher", "train_seconds"}


def _test_images():
    test = _load_tiny("test", None)
    return to_float(test.images), test.labels


def test_fp32_and_qat_artifacts_load_and_are_accurate(tiny_victims):
    x, labels = _test_images()
    fp32 = load_victim(tiny_victims["fp32"])
    qat = load_victim(tiny_victims["qat"])
    assert fp32.mode == "fp32" and qat.mode == "qat" and qat.int8
    assert qat.input_shape == (1, 16, 16) and qat.num_classes == 4
    acc_fp32 = (fp32(x).argmax(1) == torch.as_tensor(labels)).float().mean().item()
    acc_qat = (qat(x).argmax(1) == torch.as_tensor(labels)).float().mean().item()
    assert acc_fp32 > 0.5 and acc_qat > 0.5  # chance is 0.25
    metrics = json.loads((tiny_victims["qat"] / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert abs(metrics["int8_test_accuracy"] - acc_qat) < 1e-9
    meta = qat.metadata
    assert meta["versions"]["torch"].startswith("2.13") and meta["versions"]["torchao"] == "0.18.0"
    assert meta["arch"] == "resnet8" and meta["dataset"] == TINY and len(meta["mean"]) == 1


def test_int8_victim_reloads_in_fresh_process_with_same_predictions(tiny_victims, tmp_path):
    x, _ = _test_images()
    here = load_victim(tiny_victims["qat"])(x[:37])  # odd size: exercises the padded buckets
    torch.save(x[:37], tmp_path / "x.pt")
    code = (
        "import sys, torch, divqat\n"
        f"v = divqat.load_victim({str(tiny_victims['qat'])!r})\n"
        f"torch.save(v(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    there = torch.load(tmp_path / "y.pt")
    assert torch.equal(here.argmax(1), there.argmax(1))
    assert torch.allclose(here, there, atol=1e-5)


def test_divqat_alpha_zero_equals_qat_and_alpha_pushes_away(tiny_victims, tmp_path):
    x, _ = _test_images()
    common = dict(dataset=TINY, arch="resnet8", teacher=tiny_victims["fp32"], epochs=1, progress=False,
                  log_epochs=False)
    zero = train_victim(TrainRequest(mode="divqat", divqat=DivQATSettings(alpha=0.0), out=tmp_path / "a0", **common))
    qat = json.loads((tiny_victims["qat"] / "metrics.json").read_text())
    assert zero["int8_test_accuracy"] == qat["int8_test_accuracy"]
    assert zero["kl_to_teacher"] == pytest.approx(qat["kl_to_teacher"], rel=1e-6)
    assert torch.equal(load_victim(tmp_path / "a0")(x), load_victim(tiny_victims["qat"])(x))
    # At a learning rate where one epoch can move the model: the divergence term must push the
    # int8 victim's posteriors away from the teacher's, compared with alpha = 0 at the same rate.
    base = train_victim(TrainRequest(mode="divqat", divqat=DivQATSettings(alpha=0.0), lr=0.05,
                                     out=tmp_path / "b0", **common))
    pushed = train_victim(TrainRequest(mode="divqat", divqat=DivQATSettings(alpha=2.0), lr=0.05,
                                       out=tmp_path / "b2", **common))
    assert pushed["kl_to_teacher"] > 3 * base["kl_to_teacher"]
    assert load_victim(tmp_path / "b2").metadata["divqat"]["alpha"] == 2.0


def test_collapse_stops_without_saving(tiny_victims, tmp_path):
    out = tmp_path / "collapsed"
    with pytest.raises(TrainingCollapsed, match="nothing was saved"):
        train_victim(TrainRequest(dataset=TINY, mode="divqat", teacher=tiny_victims["fp32"], epochs=1,
                                  divqat=DivQATSettings(alpha=50.0), lr=0.1, out=out, progress=False,
                                  log_epochs=False))
    assert not (out / "victim.json").exists()


def test_bad_artifacts_give_clear_errors(tiny_victims, tmp_path):
    with pytest.raises(ArtifactError, match="no victim directory"):
        load_victim(tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "victim.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ArtifactError, match="not divqat victim metadata"):
        load_victim(foreign)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "victim.json").write_text((tiny_victims["qat"] / "victim.json").read_text())
    data = (tiny_victims["qat"] / "victim.pt2").read_bytes()
    (truncated / "victim.pt2").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="truncated"):
        load_victim(truncated)
    victim = load_victim(tiny_victims["fp32"])
    with pytest.raises(ValueError, match="shape"):
        victim(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        victim(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_request_validation(tiny_victims):
    with pytest.raises(ConfigError, match="--teacher"):
        TrainRequest(dataset=TINY, mode="qat")
    with pytest.raises(ConfigError, match="--alpha"):
        TrainRequest(dataset=TINY, mode="qat", teacher="x", divqat=DivQATSettings(alpha=1.0))
    with pytest.raises(ArtifactError, match="fp32 victim"):
        train_victim(TrainRequest(dataset=TINY, mode="qat", teacher=tiny_victims["qat"], epochs=1, progress=False))


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["train", "--dataset", TINY, "--mode", "qat", "--epochs", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--teacher" in err
    code = main(["train", "--dataset", "cifar10", "--epochs", "1", "--data-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(tmp_path / "none") in err
    code = main(["train", "--dataset", TINY, "--mode", "divqat", "--teacher", str(tmp_path / "missing"),
                 "--epochs", "1", "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no victim directory" in err


def test_cli_train_writes_metrics(tiny_victims, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--dataset", TINY, "--mode", "divqat", "--teacher", str(tiny_victims["fp32"]),
                 "--epochs", "1", "--limit", "128", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "int8 test accuracy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys() and metrics["train_images"] == 128
    assert len(metrics["history"]) == 1 and "div" in metrics["history"][0]
    # No DivQAT options given: the recommended setting, recorded in the artifact.
    assert load_victim(out).metadata["divqat"] == RECOMMENDED.as_dict()


def test_bf16_fine_tuning_trains_a_divqat_victim(tiny_victims, tmp_path, one_thread):
    from divqat.train.trainer import resolve_precision

    # The student's fake-quantized forward passes and the teacher's under bf16 autocast.
    m = train_victim(TrainRequest(dataset=TINY, arch="resnet8", mode="divqat", teacher=tiny_victims["fp32"],
                                  divqat=DivQATSettings(alpha=2.0), lr=0.05, epochs=1, precision="bf16",
                                  out=tmp_path / "divqat", progress=False, log_epochs=False))
    # What it really ran in (bf16 where the CPU has it, else fp32) is recorded.
    assert m["precision"] == resolve_precision("bf16")
    qat = json.loads((tiny_victims["qat"] / "metrics.json").read_text())
    assert m["int8_test_accuracy"] > 0.4 and m["kl_to_teacher"] > qat["kl_to_teacher"]  # chance: 25 %
    assert load_victim(tmp_path / "divqat").int8


def test_divqat_teacher_logits_in_bf16_are_fp32_and_close():
    from divqat.models import VictimNet
    from divqat.train.losses import DivQATLoss

    torch.manual_seed(0)
    teacher = VictimNet("resnet8", 1, 4, (0.3,), (0.3,)).eval()
    x = torch.rand(16, 1, 16, 16)
    fp32 = DivQATLoss(teacher, RECOMMENDED).teacher_logits(x)
    bf16 = DivQATLoss(teacher, RECOMMENDED, precision="bf16").teacher_logits(x)
    assert fp32.dtype == bf16.dtype == torch.float32 and not fp32.requires_grad
    with torch.no_grad():
        assert torch.allclose(fp32, teacher(x), atol=1e-5)  # folded BatchNorm, same answers
    assert torch.allclose(bf16, fp32, atol=0.1, rtol=0.05)
