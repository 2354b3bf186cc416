"""IPGuard fingerprints (divqat.ownership.fingerprint): copies of a tiny victim match, an
independently trained one does not; the file round-trips; int8 programs get input gradients."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY, _load_tiny
from torch import nn

from divqat.cli import main
from divqat.data import to_float
from divqat.errors import ArtifactError, ConfigError
from divqat.models import VictimNet
from divqat.models.saved import save_model
from divqat.ownership import KeyMarks, Verdict, save_marks
from divqat.ownership.fingerprint import (
    MARGIN,
    Fingerprint,
    NoFingerprintPoints,
    calibrate,
    file_sha256,
    fingerprint_path,
    generate_fingerprint,
    hinge_loss,
    load_fingerprint,
    load_fingerprints,
    match,
    match_file,
)
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.pipelines.verify import VerifyRequest, verify_suspect
from divqat.quant import quiet_torchao, straight_through
from divqat.train.losses import CrossEntropy
from divqat.train.trainer import FitConfig, fit
from divqat.victim import PROGRAM, load_fp32_net

POINTS = 60


@pytest.fixture(scope="module")
def nets(tiny_victims, tmp_path_factory):
    """The tiny victim (conftest's fp32 resnet8, seed 0) and a resnet8 trained independently on
    the same data (seed 1)."""
    independent = tmp_path_factory.mktemp("fingerprint") / "independent"
    train_victim(TrainRequest(dataset=TINY, arch="resnet8", mode="fp32", epochs=6, seed=1,
                              out=independent, progress=False, log_epochs=False))
    return {"victim": load_fp32_net(tiny_victims["fp32"])[0], "victim_dir": tiny_victims["fp32"],
            "independent": load_fp32_net(independent)[0], "independent_dir": independent,
            "qat": tiny_victims["qat"]}


@pytest.fixture(scope="module")
def fingerprint(nets):
    test = _load_tiny("test", None)
    return generate_fingerprint(nets["victim"], to_float(test.images), points=POINTS,
                                program_sha256=["ab" * 32])


def labels(net: nn.Module):
    @torch.no_grad()
    def run(x):
        return net(x).argmax(1)

    return run


def test_points_sit_just_across_the_victims_boundary(nets, fingerprint):
    fp = fingerprint
    assert len(fp) == POINTS and fp.points.dtype == torch.uint8 and fp.input_shape == (1, 16, 16)
    assert fp.params["margin"] == MARGIN and fp.params["points"] == POINTS
    with torch.no_grad():
        logits = nets["victim"](fp.inputs())
    assert torch.equal(logits.argmax(1), fp.labels)
    assert bool((fp.labels != fp.sources).all())
    # The paper's loss is zero on every stored (8-bit) point: the label leads the source by at
    # least the margin, the source is the runner-up ...
    assert float(hinge_loss(logits, fp.sources, fp.labels, MARGIN).max()) == 0.0
    # ... and no point went far beyond it (each stops at its first zero loss).
    lead = logits.gather(1, fp.labels[:, None]) - logits.gather(1, fp.sources[:, None])
    assert float(lead.median()) < 4 * MARGIN


def test_the_victim_itself_and_its_file_are_verified(nets, fingerprint):
    v = match(fingerprint, labels(nets["victim"]))
    assert isinstance(v, Verdict) and v.verified and v.agreed == POINTS and v.probes == POINTS
    assert v.chance == pytest.approx(0.25)  # 1/K: the victim never answers a point's source
    other = match_file(fingerprint, b"another program")
    assert not other.verified and other.p_value == 1.0
    data = b"the victim's program"
    fp = Fingerprint(fingerprint.points, fingerprint.labels, fingerprint.sources, 4,
                     (hashlib.sha256(data).hexdigest(),))
    exact = match_file(fp, data)
    assert exact.verified and exact.evidence == "identical file" and exact.p_value < 1e-70


def test_a_fine_tuned_copy_is_verified(nets, fingerprint):
    thief = _load_tiny("train", None)
    copy_ = copy.deepcopy(nets["victim"])
    fit(copy_, thief.images, thief.labels, CrossEntropy(),
        FitConfig(epochs=1, lr=0.01, schedule="cosine", seed=3, progress=False, log_epochs=False))
    copy_.eval()
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum())
                    for a, b in zip(copy_.parameters(), nets["victim"].parameters(), strict=True))
    assert moved > 0
    v = match(fingerprint, labels(copy_))
    assert v.verified, v


def test_a_pruned_copy_is_verified(nets, fingerprint):
    from torch.nn.utils import prune

    copy_ = copy.deepcopy(nets["victim"])
    layers = [(m, "weight") for m in copy_.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.3)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in layers)
    total = sum(m.weight.numel() for m, _ in layers)
    assert zeros / total == pytest.approx(0.3, abs=0.01)
    v = match(fingerprint, labels(copy_))
    assert v.verified, v


def test_an_independent_model_is_not_verified(nets, fingerprint):
    answers = labels(nets["independent"])(fingerprint.inputs())
    v = match(fingerprint, labels(nets["independent"]))
    assert not v.verified and v.p_value > 1e-3, v
    assert "no reference model" in v.evidence
    # What it is granted by chance is its own agreement with the points' sources (the other side
    # of each point's boundary), at least 1/K.
    from_sources = int((answers == fingerprint.sources).sum()) / len(fingerprint)
    assert v.chance == max(0.25, from_sources)


def test_calibration_records_reference_models_as_a_floor_of_chance(nets, fingerprint):
    fp = calibrate(fingerprint, [labels(nets["independent"])])
    (recorded,) = fp.reference_agreement
    assert recorded == match(fingerprint, labels(nets["independent"])).agreement
    v = match(fp, labels(nets["victim"]))
    assert v.chance == max(0.25, recorded) and "1 reference model" in v.evidence and v.verified


def test_save_and_load_round_trip(tmp_path, fingerprint):
    fp = calibrate(fingerprint, [lambda x: torch.zeros(len(x), dtype=torch.long)])
    path = fp.save(fingerprint_path(tmp_path / "victim.pte"))
    assert path.name == "victim.fingerprint.safetensors"
    assert path.stat().st_size < 20_000  # 60 points of 16x16 uint8 and a small header
    back = load_fingerprint(path)
    for name in ("points", "labels", "sources"):
        assert torch.equal(getattr(back, name), getattr(fp, name))
    assert (back.num_classes, back.program_sha256, back.reference_agreement, back.params) == (
        fp.num_classes, fp.program_sha256, fp.reference_agreement, fp.params)


def test_foreign_or_missing_files_and_bad_answers_are_one_line_errors(tmp_path, fingerprint):
    from safetensors.torch import save_file

    with pytest.raises(ArtifactError, match="no fingerprint at"):
        load_fingerprint(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ArtifactError, match="not a readable fingerprint"):
        load_fingerprint(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="not a readable fingerprint"):
        load_fingerprint(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match=r"60 labels \(N,\) or scores \(60, 4\)"):
        match(fingerprint, lambda x: torch.zeros(len(x), 3))
    with pytest.raises(ConfigError, match="fingerprint.points must be an integer >= 1"):
        generate_fingerprint(nn.Linear(2, 2), torch.rand(4, 1, 2, 2), points=0)


def test_no_point_crossing_the_boundary_is_its_own_one_line_error(nets):
    # A margin no point reaches in one step: nothing to record (`divqat export` then writes its
    # program without a fingerprint, tests/test_edge.py).
    test = _load_tiny("test", None)
    with pytest.raises(NoFingerprintPoints, match="no fingerprint point crossed the victim's boundary "
                                                  "in 1 steps from 16 images") as e:
        generate_fingerprint(nets["victim"], to_float(test.images[:16]), points=4, margin=1e4, steps=1)
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)


def test_int8_programs_get_input_gradients_through_straight_through(nets):
    quiet_torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.load(nets["qat"] / PROGRAM).module()
    x = torch.rand(3, 1, 16, 16, requires_grad=True)

    def input_gradient(module):
        out = module(x)
        if not out.requires_grad:
            return None
        return torch.autograd.grad(out[:, 0].sum(), x, allow_unused=True)[0]

    # The converted program rounds each activation to an int8 tensor: no gradient reaches x.
    assert input_gradient(program) is None
    twin = straight_through(program)
    with torch.no_grad():
        assert torch.equal(twin(x), program(x))  # the same forward values
    assert float(input_gradient(twin).abs().sum()) > 0


# ---------------------------------------------------------------- divqat verify --fingerprint

@pytest.fixture
def recorded(nets, fingerprint, tmp_path):
    """The victim saved as a model file (the suspect file a thief would carry away), and a folder
    holding its fingerprint with that file's sha256 recorded, as `divqat export` records the
    program's."""
    copy_file = save_model(tmp_path / "copy.pt", nets["victim"], (1, 16, 16), 4)
    fp = dataclasses.replace(fingerprint, program_sha256=(file_sha256(copy_file),))
    folder = tmp_path / "fingerprints"
    path = fp.save(fingerprint_path(folder / "victim.pte"))
    return {"file": copy_file, "folder": folder, "path": path}


def test_verify_names_the_exact_copy_by_its_file_and_its_points(nets, recorded, capsys):
    assert main(["verify", "--suspect", str(recorded["file"]), "--fingerprint", str(recorded["folder"]),
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"suspect: model file {recorded['file']} (resnet8); {POINTS} images asked" in out
    assert "identical" in out and "VERIFIED" in out
    assert (f"verified: the suspect carries the fingerprint {recorded['path']} (the identical file "
            "(sha256))") in out
    assert "key" not in out.split("\n")[1]  # no marks given: no marks table
    # The victim's folder: not a file, so no hash; its labels on the points are the fingerprint's.
    assert main(["verify", "--suspect", str(nets["victim_dir"]), "--fingerprint", str(recorded["path"]),
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    (row,) = record["fingerprints"]
    assert row["identical_file"] is None and row["agreed"] == row["points"] == POINTS
    assert row["verified"] and row["p_value"] < 1e-20 and record["verified"]
    assert record["verified_fingerprint"] == str(recorded["path"]) and record["queries"] == POINTS
    assert record["verified_key"] is None and record["rows"] == [] and record["marks_from"] is None


def test_verify_does_not_claim_an_independent_model(nets, recorded, capsys):
    assert main(["verify", "--suspect", str(nets["independent_dir"]), "--fingerprint",
                 str(recorded["folder"])]) == 0
    out = capsys.readouterr().out
    assert "not verified: no fingerprint's labels are repeated beyond chance at significance 1e-06" in out
    record = verify_suspect(VerifyRequest(nets["independent_dir"], fingerprints=(recorded["path"],)))
    (row,) = record["fingerprints"]
    assert not row["verified"] and row["p_value"] > 1e-3 and not record["verified"]
    # Its own file is not the victim's either.
    other = save_model(recorded["folder"].parent / "other.pt", nets["independent"], (1, 16, 16), 4)
    (row,) = verify_suspect(VerifyRequest(other, fingerprints=(recorded["folder"],)))["fingerprints"]
    assert row["identical_file"] is False and not row["verified"]


def test_verify_with_marks_and_fingerprints_and_its_one_line_refusals(nets, recorded, tmp_path, capsys):
    # Marks of a key the victim never answered (labels it would not give): both tables, one cost.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 1, 16, 16), dtype=np.uint8)
    labels_ = rng.integers(0, 4, 40)
    marks = save_marks(KeyMarks("k", (1, 16, 16), 4, 0.1, images[:20], labels_[:20], np.zeros(20),
                                images[20:], labels_[20:], np.zeros(20)), tmp_path / "marks.npz")
    record = verify_suspect(VerifyRequest(recorded["file"], marks, (recorded["path"],)))
    assert record["queries"] == 40 + POINTS and len(record["rows"]) == 1
    assert record["verified_fingerprint"] == str(recorded["path"]) and record["verified"]
    assert main(["verify", "--suspect", str(recorded["file"]), "--marks", str(marks), "--fingerprint",
                 str(recorded["path"]), "--max-queries", str(POINTS + 10)]) == 0
    out = capsys.readouterr().out
    assert f"{POINTS + 10} images asked" in out and "key" in out and "fingerprint" in out
    with pytest.raises(ConfigError, match=r"fingerprints are asked whole \(60 points\)"):
        verify_suspect(VerifyRequest(recorded["file"], marks, (recorded["path"],), max_queries=POINTS))

    # Neither marks nor fingerprints; a suspect of another input shape; an empty folder.
    assert main(["verify", "--suspect", str(recorded["file"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--marks" in err and "--fingerprint" in err
    rgb = save_model(tmp_path / "rgb.pt", VictimNet("resnet8", 3, 4, (0.5,) * 3, (0.25,) * 3), (3, 16, 16), 4)
    assert main(["verify", "--suspect", str(rgb), "--fingerprint", str(recorded["folder"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes 3x16x16 images, the fingerprints are 1x16x16" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no fingerprint in"):
        load_fingerprints(tmp_path / "empty")
