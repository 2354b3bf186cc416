"""`divqat verify`: a surrogate distilled on watermarked answers is verified and named by its key,
a model trained without them is not; suspects of every form load; another input shape is one line;
the query cost is bounded and stated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BarsVictim, make_bars
from torch import nn

from divqat.attacks import SurrogateTraining, TransferSet, create_attack, train_surrogate
from divqat.blackbox import BlackBox
from divqat.cli import main
from divqat.errors import ArtifactError, ConfigError
from divqat.models import VictimNet
from divqat.models.saved import load_model, save_model
from divqat.ownership import Watermark, save_marks
from divqat.pipelines.suspect import ModelSuspect, open_suspect
from divqat.pipelines.verify import plan_probes, verify_marks

SHAPE = (1, 16, 16)
RECIPE = SurrogateTraining(epochs=12, batch_size=64, augment=False, hflip=False, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stolen():
    """A knockoff thief of the bars victim behind a watermark at rate 0.2 (high, so that 400
    queries carry ~80 marks), another key's watermark on an honest client, and a model trained on
    the same images' true labels, never on the victim's answers."""
    images, labels = make_bars(400, seed=5)
    transfer = TransferSet("bars", torch.from_numpy(images), torch.from_numpy(labels))
    thief = Watermark(4, b"t" * 32, rate=0.2, key="thief")
    box = BlackBox(BarsVictim(), budget=400, watermark=thief)
    [copy] = create_attack("knockoff").steal(box, [400], RECIPE, transfer=transfer)
    honest = Watermark(4, b"h" * 32, rate=0.2, key="honest")
    test_images, _ = make_bars(300, seed=6)
    BlackBox(BarsVictim(), watermark=honest).query_labels(torch.from_numpy(test_images).float() / 255)
    independent, _ = train_surrogate(transfer.images, transfer.labels, RECIPE, SHAPE, 4)
    return {"copy": copy.surrogate.eval(), "independent": independent.eval(),
            "marks": [thief.log.marks(), honest.log.marks()]}


def test_the_stolen_copy_is_verified_and_names_its_key(stolen):
    suspect = ModelSuspect(stolen["copy"], "copy", SHAPE)
    record = verify_marks(suspect, stolen["marks"])
    thief, honest = record["rows"]
    assert thief["marks"] > 40 and thief["agreement"] > 0.4 and thief["p_value"] < 1e-15
    assert thief["chance"] < 0.1 and thief["verified"]
    assert not honest["verified"]  # the honest key's marks were never in the thief's answers
    assert record["verified_key"] == "thief" and record["verified_keys"] == ["thief"]
    asked = sum(m.marks + m.controls for m in stolen["marks"])
    assert record["queries"] == asked == suspect.queries


def test_a_model_trained_without_the_answers_is_not_verified(stolen):
    record = verify_marks(ModelSuspect(stolen["independent"], "independent", SHAPE), stolen["marks"])
    assert record["verified_key"] is None
    for row in record["rows"]:
        assert row["p_value"] > 1e-3 and row["agreement"] < 0.2


def test_max_queries_bounds_the_cost(stolen):
    record = verify_marks(ModelSuspect(stolen["copy"], "copy", SHAPE), stolen["marks"], max_queries=120)
    assert record["queries"] <= 120 and [r["marks"] for r in record["rows"]] == [30, 30]
    assert record["verified_key"] == "thief"  # 30 marks suffice against a chance of a few %
    assert plan_probes(stolen["marks"][:1], 1000)[0] == (stolen["marks"][0].marks, stolen["marks"][0].controls)
    with pytest.raises(ConfigError, match="fewer than 2"):
        plan_probes(stolen["marks"], 3)


def test_another_input_shape_is_refused_before_anything_is_asked(stolen):
    suspect = ModelSuspect(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)), "rgb", (3, 16, 16))
    with pytest.raises(ConfigError, match="takes 3x16x16 images, the marks are 1x16x16"):
        verify_marks(suspect, stolen["marks"])
    assert suspect.queries == 0


def test_suspects_of_every_form_load_and_agree(stolen, tmp_path):
    net = VictimNet("resnet8", 1, 4, (0.3,), (0.2,)).eval()
    images = torch.rand(20, *SHAPE)
    expected = net(images).argmax(dim=1)
    saved = save_model(tmp_path / "stolen.pt", net, SHAPE, 4, classes=list("abcd"), info={"budget": 9})
    loaded, meta = load_model(saved)
    assert torch.equal(loaded(images), net(images)) and meta["info"] == {"budget": 9}
    torch.export.save(torch.export.export(net, (images[:2],)), tmp_path / "net.pt2")
    torch.jit.save(torch.jit.trace(net, images[:2]), tmp_path / "net.ts")
    for path, shape in ((saved, SHAPE), (tmp_path / "net.pt2", SHAPE), (tmp_path / "net.ts", None)):
        with open_suspect(path) as suspect:
            assert suspect.input_shape == shape
            assert torch.equal(suspect.labels(images), expected) and suspect.queries == 20
    torch.save(net, tmp_path / "pickled.pt")
    with pytest.raises(ArtifactError, match="pickled modules are not loaded"):
        open_suspect(tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="API key"):
        open_suspect("http://127.0.0.1:9")
    # TorchScript says nothing of its input: the marks' shape is tried, and a failure is one line.
    torch.jit.save(torch.jit.trace(nn.Linear(5, 4), torch.rand(2, 5)), tmp_path / "other.ts")
    with pytest.raises(ConfigError, match="fails on 1x16x16 images"):
        verify_marks(open_suspect(tmp_path / "other.ts"), stolen["marks"])


def test_verify_cli_table_json_and_one_line_errors(stolen, tmp_path, capsys):
    marks = tmp_path / "marks"
    for m in stolen["marks"]:
        save_marks(m, marks / f"{m.key}.npz")
    suspect = save_model(tmp_path / "copy.pt", stolen["copy"], SHAPE, 4)
    assert main(["verify", "--suspect", str(suspect), "--marks", str(marks), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED" in out and "verified: the suspect repeats the marks of key 'thief'" in out
    assert f"{sum(m.marks + m.controls for m in stolen['marks'])} images asked" in out
    assert main(["verify", "--suspect", str(suspect), "--marks", str(marks), "--json",
                 "--max-queries", "120"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["verified_key"] == "thief" and record["queries"] <= 120

    independent = save_model(tmp_path / "independent.pt", stolen["independent"], SHAPE, 4)
    assert main(["verify", "--suspect", str(independent), "--marks", str(marks)]) == 0
    assert "not verified: no key's marks" in capsys.readouterr().out

    rgb = save_model(tmp_path / "rgb.pt", VictimNet("resnet8", 3, 4, (0.5,) * 3, (0.25,) * 3), (3, 16, 16), 4)
    assert main(["verify", "--suspect", str(rgb), "--marks", str(marks)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes 3x16x16 images, the marks are 1x16x16" in err
    assert main(["verify", "--suspect", str(rgb), "--marks", str(tmp_path / "none")]) == 2
    assert "no marks at" in capsys.readouterr().err


@pytest.mark.slow
def test_attack_watermarks_saves_the_surrogate_and_verify_finds_it(tiny_victims, tmp_path, capsys):
    """The whole loop on the tiny int8 victim: an attack behind the watermark saving its surrogate,
    then `divqat verify` on the stolen file (verified) and on the victim's own fp32 teacher, which
    the thief's answers never touched (not verified). The thief is label-only and trains without
    augmentation for 12 epochs: measured on this victim, a soft-label thief learned 2 of 86 marks
    in 12 epochs and all 86 in 40 (its swapped posteriors are a weaker signal than a one-hot
    label), and random crops keep a resnet8 from learning the marks of 384 noisy 16x16 images in a
    test's time."""
    from divqat.pipelines.attack import AttackRequest, attack_victim

    out = tmp_path / "steal"
    m = attack_victim(AttackRequest(tiny_victims["qat"], "knockoff", [384], transfer="tiny-bars:train",
                                    training=RECIPE, labels_only=True, watermark=0.2,
                                    save_surrogate=tmp_path / "stolen.pt", out=out))
    w = m["watermark"]
    assert 40 < w["marked"] < 120 and w["answered"] == 384 and w["marks_file"] == str(out / "marks.npz")
    assert m["surrogate_files"] == {"384": str(tmp_path / "stolen.pt")}
    assert 0.05 < w["test_answers_marked"] / 128 < 0.4  # an honest user loses about the rate
    assert main(["verify", "--suspect", str(tmp_path / "stolen.pt"), "--marks", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repeats the marks of key 'thief'" in printed, printed
    assert main(["verify", "--suspect", str(tiny_victims["fp32"]), "--marks", str(out / "marks.npz")]) == 0
    assert "not verified" in capsys.readouterr().out

    # The command line: the marks counted and printed, one file per budget.
    cli = tmp_path / "cli"
    assert main(["attack", "--victim", str(tiny_victims["qat"]), "--attack", "knockoff", "--transfer",
                 "tiny-bars:train", "--budget", "100", "200", "--epochs", "1", "--watermark", "0.1",
                 "--save-surrogate", str(tmp_path / "s.pt"), "--no-progress", "--out", str(cli)]) == 0
    printed = capsys.readouterr().out
    w = json.loads((cli / "metrics.json").read_text())["watermark"]
    assert f"watermark (rate 0.1): {w['marked']} of 200 answers marked" in printed
    assert (tmp_path / "s-100.pt").is_file() and (tmp_path / "s-200.pt").is_file()
    assert np.load(cli / "marks.npz")["mark_images"].dtype == np.uint8
    assert main(["attack", "--victim", str(tiny_victims["qat"]), "--attack", "copy", "--watermark", "0.1",
                 "--out", str(tmp_path / "copy")]) == 2
    assert "--attack copy sends no queries" in capsys.readouterr().err
