"""The user's own model and data, end to end: a torchvision CNN on an RGB image folder at its own
size goes fp32 -> `divqat import` -> DivQAT -> defend -> knockoff -> serve -> `.pte`; a user's
factory by ``module:function`` and an ``nn.Module`` handed in from Python train like a built-in
architecture; a model torch.export cannot capture is one line before any training."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from test_serve import TIMEOUT, ThreadServer
from user_nets import TinyCNN

from divqat.blackbox import DefendedVictim
from divqat.cli import main
from divqat.pipelines.train import TrainRequest, train_victim
from divqat.serve.app import create_app
from divqat.serve.store import KeyStore
from divqat.victim import load_fp32_net, load_victim

CLASSES = ("red", "green", "blue", "gray")
ARCH = "torchvision:mobilenet_v3_small"


def _photo(label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """An RGB photo whose dominant colour is the label, with a noisy bright patch anywhere."""
    h, w = size
    img = rng.integers(0, 70, (h, w, 3))
    if label < 3:
        img[..., label] += 150
    else:
        img += 90
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    img[y:y + 8, x:x + 8] = 255
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """DIR/{train,test}/<colour>/*.png at 30x40 px (not square: the loader crops)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 12)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _photo(k, rng, (30, 40)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_torchvision_model_goes_import_divqat_defend_attack_serve_export(photos, tmp_path, capsys):
    data = ["--data-root", str(photos), "--no-progress"]
    sized = ["--dataset", "image-folder", "--image-size", "24", *data]
    # The user's model, trained elsewhere and saved as a plain state dict.
    assert main(["train", *sized, "--arch", ARCH, "--epochs", "3", "--out", str(tmp_path / "theirs")]) == 0
    net, _ = load_fp32_net(tmp_path / "theirs")
    torch.save(net.net.state_dict(), tmp_path / "mine.pt")

    assert main(["import", *sized, "--arch", ARCH, "--weights", str(tmp_path / "mine.pt"),
                 "--out", str(tmp_path / "imported")]) == 0
    meta = json.loads((tmp_path / "imported" / "victim.json").read_text())
    assert meta["dataset"] == "image-folder@24" and meta["input_shape"] == [3, 24, 24]
    assert meta["arch"] == ARCH and meta["imported_from"]["file"] == "mine.pt"

    assert main(["train", *sized, "--arch", ARCH, "--mode", "divqat", "--teacher", str(tmp_path / "imported"),
                 "--epochs", "1", "--target", "edge", "--out", str(tmp_path / "divqat")]) == 0
    victim_dir = tmp_path / "divqat"
    assert main(["defend", "--victim", str(victim_dir), "--defense", "dcp", *data,
                 "--out", str(tmp_path / "defended")]) == 0
    # The thief picks its own architecture: a divqat ResNet against the MobileNet victim.
    assert main(["attack", "--victim", str(victim_dir), "--attack", "knockoff", "--transfer",
                 "image-folder@24:test", "--budget", "48", "--surrogate", "resnet8", "--epochs", "1",
                 *data, "--out", str(tmp_path / "stolen")]) == 0
    stolen = json.loads((tmp_path / "stolen" / "metrics.json").read_text())
    assert stolen["queries_used"] == 48 and stolen["victim_arch"] == ARCH
    capsys.readouterr()

    # Served: a PNG at another size and shape is decoded and fitted to the victim's input.
    victim = load_victim(victim_dir)
    db = tmp_path / "keys.db"
    server = ThreadServer(create_app(DefendedVictim(victim), db, classes=CLASSES, dataset="image-folder@24"))
    store = KeyStore(db)
    try:
        _, key = store.create_key("alice", 10)
        png = io.BytesIO()
        _photo(1, np.random.default_rng(5), (50, 70)).save(png, format="PNG")
        answer = httpx.post(f"{server.url}/v1/predict", files={"image": ("a.png", png.getvalue(), "image/png")},
                            # The first query compiles the int8 program with the defense fused:
                            # a MobileNet takes tens of seconds on two cores.
                            headers={"Authorization": f"Bearer {key}"}, timeout=10 * TIMEOUT)
        assert answer.status_code == 200, answer.text
        assert np.array(answer.json()["posteriors"]).shape == (1, len(CLASSES))
    finally:
        server.stop()
        store.close()

    # To the device: the .pte answers as the torch int8 program does.
    # No fingerprint: this 3-epoch victim of 48 test images has too few points near its
    # boundaries for IPGuard (tests/test_edge.py and test_fingerprint.py check the fingerprint).
    # A fingerprint left beside the path by an earlier export describes another program: removed.
    (tmp_path / "v.fingerprint.safetensors").write_bytes(b"an earlier program's")
    assert main(["export", "--victim", str(victim_dir), "--no-fingerprint",
                 "--out", str(tmp_path / "v.pte")]) == 0
    assert not (tmp_path / "v.fingerprint.safetensors").exists()
    x = torch.rand(5, 3, 24, 24)
    assert torch.equal(load_victim(tmp_path / "v.pte")(x).argmax(1), victim(x).argmax(1))


def test_a_user_factory_and_a_module_train_like_a_built_in(tmp_path):
    assert main(["train", "--dataset", TINY, "--arch", "user_nets:tiny_cnn", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "factory")]) == 0
    assert json.loads((tmp_path / "factory" / "victim.json").read_text())["arch"] == "user_nets:tiny_cnn"
    # An nn.Module from Python: recorded by its class, and its QAT run gets the module again.
    fp32 = train_victim(TrainRequest(dataset=TINY, arch=TinyCNN(1, 4), epochs=2, out=tmp_path / "module",
                                     progress=False, log_epochs=False))
    assert fp32["arch"] == "user_nets:TinyCNN"
    qat = train_victim(TrainRequest(dataset=TINY, arch=TinyCNN(1, 4), mode="qat", teacher=tmp_path / "module",
                                    epochs=1, out=tmp_path / "module-qat", progress=False, log_epochs=False))
    assert qat["int8_test_accuracy"] >= 0.0 and (tmp_path / "module-qat" / "victim.pt2").is_file()


def test_a_model_export_cannot_capture_fails_in_one_line_before_training(tmp_path, capsys):
    code = main(["train", "--dataset", TINY, "--arch", "user_nets:item_branch", "--epochs", "50",
                 "--no-progress", "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "ItemBranch.forward" in err and "epoch" not in err
    assert not (tmp_path / "v").exists()
