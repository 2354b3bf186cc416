"""`divqat serve --watermark`: each key's answers marked after the defense with a secret of its own,
the same image marked the same way as a .npy or a PNG and after a restart, the marks kept in the
key database (bounded, with their query times) and never sent, and `divqat verify` reading them
from the service's folder."""

from __future__ import annotations

import io

import httpx
import numpy as np
import torch
from conftest import TINY, TINY_CLASSES, BarsVictim, make_bars
from PIL import Image
from test_serve import NPY, TIMEOUT, ThreadServer, from_npy, npy, post

from divqat.blackbox import DefendedVictim
from divqat.cli import main
from divqat.defenses import create_defense
from divqat.models import VictimNet
from divqat.models.saved import save_model
from divqat.ownership import KeyedWatermarks, MarkStore, Watermark, load_marks
from divqat.serve.app import ServiceLimits, create_app
from divqat.serve.store import KeyStore

SHAPE = (1, 16, 16)
RATE = 0.25


def start(db, defense: str = "none"):
    app = create_app(DefendedVictim(BarsVictim(), create_defense(defense)), db, classes=TINY_CLASSES,
                     dataset=TINY, limits=ServiceLimits(max_images=64, max_delay=0.002),
                     watermark=KeyedWatermarks(db, RATE, len(TINY_CLASSES), SHAPE, max_marks=12))
    return ThreadServer(app)


def soft(url: str, secret: str, images: np.ndarray) -> np.ndarray:
    response = post(url, secret, npy(images), accept=NPY)
    assert response.status_code == 200, response.text
    return from_npy(response.content)


def test_each_key_is_marked_with_its_own_secret_and_the_marks_survive_a_restart(tmp_path):
    db = tmp_path / "state" / "keys.db"
    store = KeyStore(db)
    thief_key, thief = store.create_key("thief", 10_000)
    honest_key, honest = store.create_key("honest", 10_000, output="labels")
    store.close()
    images, _ = make_bars(64, seed=3)  # uint8 (64, 1, 16, 16)
    floats = torch.from_numpy(images).float() / 255
    clean = BarsVictim()(floats).softmax(dim=1)
    server = start(db, "rounding")
    try:
        first = soft(server.url, thief, images)
        again = soft(server.url, thief, floats.numpy())  # the same images as float32: the same answers
        model = httpx.get(f"{server.url}/v1/model", headers={"Authorization": f"Bearer {thief}"},
                          timeout=TIMEOUT).text
        labels = post(server.url, honest, npy(images), accept=NPY)
        # One image as a PNG file: the hash reads the same uint8 pixels.
        buffer = io.BytesIO()
        Image.fromarray(images[0, 0]).save(buffer, format="PNG")
        png = httpx.post(f"{server.url}/v1/predict", files={"image": ("a.png", buffer.getvalue(), "image/png")},
                         headers={"Authorization": f"Bearer {thief}", "Accept": NPY}, timeout=TIMEOUT)
    finally:
        server.stop()
    assert np.array_equal(first, again) and np.array_equal(from_npy(png.content)[0], first[0])
    assert "secret" not in model and "mark" not in model

    # The thief's answers are the rounding defense's with the marks swapped in: its secret is in
    # the key database, and its marks are those a Watermark with that secret chooses.
    marks = MarkStore(db, create=False)
    secret, honest_secret = (marks.secret(key.id, key.name, rate=RATE, input_shape=SHAPE, num_classes=4)
                             for key in (thief_key, honest_key))
    marks.close()
    assert secret != honest_secret
    choice = Watermark(4, secret, RATE).choose(floats, clean.argmax(dim=1))
    marked = torch.from_numpy(choice.marked)
    defended = create_defense("rounding")(clean).numpy()
    assert 5 <= marked.sum() <= 30
    assert np.array_equal(first[~choice.marked], defended[~choice.marked])
    assert np.array_equal(first.argmax(axis=1)[choice.marked], choice.labels[choice.marked])
    honest_choice = Watermark(4, honest_secret, RATE).choose(floats, clean.argmax(dim=1))
    assert (honest_choice.marked != choice.marked).any()
    assert np.array_equal(from_npy(labels.content)[honest_choice.marked], honest_choice.labels[honest_choice.marked])

    # After a restart: the same secret, the same answers, the marks kept (bounded at 12 each).
    server = start(db, "rounding")
    try:
        assert np.array_equal(soft(server.url, thief, images), first)
        more, _ = make_bars(64, seed=4)
        soft(server.url, thief, more)
    finally:
        server.stop()
    by_key = {m.key: m for m in load_marks(db.parent)}
    kept = by_key["thief"]
    assert set(by_key) == {"thief", "honest"} and kept.input_shape == SHAPE and kept.rate == RATE
    assert kept.marks == 12 and kept.controls <= 12 and kept.answered == 64 * 4 + 1
    index = np.flatnonzero(choice.marked)[:12]
    assert np.array_equal(kept.mark_images[:len(index)], images[index])  # uint8, in query order
    assert np.array_equal(kept.mark_labels[:len(index)], choice.labels[index])
    assert np.all(np.isfinite(kept.mark_times)) and kept.mark_times.min() > 1e9


def store_key(db, name: str):
    store = KeyStore(db)
    try:
        return store.create_key(name, 10_000)
    finally:
        store.close()


def test_verify_reads_the_marks_from_the_service_folder(tmp_path, capsys):
    db = tmp_path / "state" / "keys.db"
    store = KeyStore(db)
    _, thief = store.create_key("thief", 10_000)
    store.close()
    _, auditor = store_key(db, "auditor")
    (tmp_path / "auditor.key").write_text(auditor + "\n")
    server = start(db)
    try:
        soft(server.url, thief, make_bars(64, seed=5)[0])
        # A suspect behind an HTTP API: asked through RemoteBlackBox, every image counted there.
        assert main(["verify", "--suspect", server.url, "--api-key-file", str(tmp_path / "auditor.key"),
                     "--marks", str(db)]) == 0
        out = capsys.readouterr().out
        asked = int(out.split("; ")[1].split()[0])
        assert f"the prediction API at {server.url}" in out and asked > 0
        keys = KeyStore(db)
        assert keys.key("auditor").used == asked
        keys.close()
    finally:
        server.stop()
    rgb = save_model(tmp_path / "rgb.pt", VictimNet("resnet8", 3, 4, (0.5,) * 3, (0.25,) * 3), (3, 16, 16), 4)
    assert main(["verify", "--suspect", str(rgb), "--marks", str(db.parent)]) == 2
    assert "the marks are 1x16x16" in capsys.readouterr().err
    gray = save_model(tmp_path / "gray.pt", VictimNet("resnet8", 1, 4, (0.3,), (0.2,)), SHAPE, 4)
    assert main(["verify", "--suspect", str(gray), "--marks", str(db), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"key": "thief"' in out and '"verified_key": null' in out


def test_a_rotated_key_keeps_its_marks_and_a_reused_name_gets_its_own(tmp_path):
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    _, first = store.create_key("client", 10_000)
    store.close()
    images = make_bars(64, seed=7)[0]
    server = start(db)
    try:
        answers = soft(server.url, first, images)
        store = KeyStore(db)
        _, rotated = store.rotate_key("client")
        store.close()
        assert np.array_equal(soft(server.url, rotated, images), answers)  # the same key, new secret
        store = KeyStore(db)
        old = store.revoke("client")
        _, reused = store.create_key("client", 10_000)
        store.close()
        other = soft(server.url, reused, images)
    finally:
        server.stop()
    assert not np.array_equal(other, answers)  # another client: another watermark secret
    by_key = {m.key: m for m in load_marks(db)}
    assert set(by_key) == {"client", f"client.revoked-{old.id}"}
    assert by_key[f"client.revoked-{old.id}"].answered == 128 and by_key["client"].answered == 64
