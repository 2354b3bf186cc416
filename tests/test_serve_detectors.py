"""`divqat serve --detector`: a detector per key in a real service (loopback, bounded loops):
flagging and blocking a key, labels only after the alarm, alarms and scores in the audit, the
detector state kept in the key database across a restart, and the key store's migration."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_CLASSES, BarsVictim, make_bars
from test_serve import ThreadServer, from_npy, npy, post

from divqat.blackbox import DefendedVictim
from divqat.cli import main
from divqat.detectors import PRADA
from divqat.serve.app import ServiceLimits, create_app
from divqat.serve.store import KeyStore
from divqat.serve.watch import KeyWatch

BATCH = 20


def natural(n: int, seed: int = 10) -> torch.Tensor:
    return torch.from_numpy(make_bars(n, seed=seed)[0]).float() / 255


def chains(n: int, seed: int = 0, seeds: int = 30, step: float = 0.05) -> torch.Tensor:
    """A Jacobian-style thief's queries: chains of sign steps from a few seed images."""
    g = torch.Generator().manual_seed(seed)
    x = natural(seeds, seed=50 + seed)
    out = []
    while sum(len(o) for o in out) < n:
        x = (x + step * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
        out.append(x.clone())
    return torch.cat(out)[:n]


def make_prada() -> PRADA:
    return PRADA(delta=0.9, min_distances=30, check_every=10)


def start(db, on_alarm: str = "flag", save_every: float = 0.0) -> ThreadServer:
    watch = KeyWatch(make_prada, {"detector": "prada", "params": make_prada().params()},
                     on_alarm=on_alarm, save_every=save_every)
    limits = ServiceLimits(max_images=64, max_body_bytes=256 * 1024, max_side=64, max_delay=0.0)
    app = create_app(DefendedVictim(BarsVictim()), db, classes=TINY_CLASSES, dataset=TINY,
                     limits=limits, watch=watch)
    return ThreadServer(app)


def send(url: str, secret: str, images: torch.Tensor, max_requests: int = 30):
    """Batches of 20 until the images are sent or a request is refused; the responses."""
    responses = []
    for i in range(0, min(len(images), max_requests * BATCH), BATCH):
        r = post(url, secret, npy(images[i:i + BATCH].numpy()), accept="application/x-npy")
        responses.append(r)
        if r.status_code != 200:
            break
    return responses


@pytest.mark.parametrize("on_alarm", ["block", "labels-only"])
def test_service_flags_the_thief_and_blocks_or_answers_labels_only(tmp_path, on_alarm):
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    _, thief = store.create_key("thief", 10_000)
    _, honest = store.create_key("honest", 10_000)
    server = start(db, on_alarm=on_alarm)
    try:
        sent = send(server.url, honest, natural(300))
        assert [r.status_code for r in sent] == [200] * 15, sent[-1].text
        queries = chains(200)
        for i in range(0, 200, BATCH):  # until the alarm, at most 10 requests
            used = store.key("thief").used
            r = post(server.url, thief, npy(queries[i:i + BATCH].numpy()), accept="application/x-npy")
            if store.flags():
                break
            assert r.status_code == 200 and from_npy(r.content).shape == (BATCH, 4)
        # The request that raised the alarm already gets what --on-alarm says.
        if on_alarm == "block":
            assert r.status_code == 403 and r.json()["error"] == "key_blocked"
            assert "prada" not in r.text.lower() and store.key("thief").used == used  # refunded
        else:
            assert r.status_code == 200 and from_npy(r.content).shape == (BATCH,)
        flags = store.flags()
        assert set(flags) == {"thief"} and flags["thief"]["detector"] == "prada"
        assert flags["thief"]["queries"] % 10 == 0 and flags["thief"]["queries"] <= 120
        used = store.key("thief").used
        after = post(server.url, thief, npy(chains(BATCH, seed=1).numpy()), accept="application/x-npy")
        if on_alarm == "block":
            assert after.status_code == 403 and after.json()["error"] == "key_blocked"
            assert store.key("thief").used == used  # nothing counted
            assert store.audit("thief")[0]["outcome"] == "key_blocked"
        else:
            labels = from_npy(after.content)
            assert after.status_code == 200 and labels.shape == (BATCH,) and labels.dtype == np.int64
        again = post(server.url, honest, npy(natural(BATCH, seed=3).numpy()), accept="application/x-npy")
        assert again.status_code == 200 and from_npy(again.content).shape == (BATCH, 4)
    finally:
        server.stop()
    # The alarm and the scores are in the audit: one row per request, the alarm on the flagging one.
    rows = [r for r in reversed(store.audit("thief")) if r["outcome"] == "ok" or r["alarm"] is not None]
    assert all(r["detector_score"] is None or 0 < r["detector_score"] <= 1 for r in rows)
    alarms = [i for i, r in enumerate(rows) if r["alarm"] == 1]
    assert alarms and rows[alarms[0]]["detector_score"] < 0.9
    assert all(r["alarm"] in (0, None) for r in rows[:alarms[0]])
    assert not any(r["alarm"] for r in store.audit("honest"))
    store.close()


def test_detector_state_survives_a_restart_and_gives_the_uninterrupted_verdicts(tmp_path, capsys):
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    _, secret = store.create_key("k", 10_000)
    stream = torch.cat([natural(200), chains(200)])
    server = start(db, save_every=60.0)  # saved on shutdown, not per request
    try:
        assert all(r.status_code == 200 for r in send(server.url, secret, stream[:160]))
    finally:
        server.stop()
    row = sqlite3.connect(db).execute("SELECT detector, queries FROM detector_state").fetchone()
    assert row == ("prada", 160)
    server = start(db, save_every=60.0)
    try:
        assert all(r.status_code == 200 for r in send(server.url, secret, stream[160:]))
    finally:
        server.stop()
    # The same stream through one detector that never stopped.
    reference = make_prada()
    served = DefendedVictim(BarsVictim())
    scores = []
    for i in range(0, len(stream), BATCH):
        scores.append(reference.observe(stream[i:i + BATCH], served(stream[i:i + BATCH]).defended).score)
    audited = [r["detector_score"] for r in reversed(store.audit("k"))]
    assert audited == pytest.approx(scores, abs=1e-12)
    flag = store.flags()["k"]
    assert flag["queries"] == reference.verdict().first_alarm > 200

    # `divqat keys usage` shows the flag; `divqat audit --key` the scores and the alarm.
    assert main(["keys", "usage", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "flagged" in out and f"by prada after {flag['queries']} queries" in out
    assert main(["audit", "--db", str(db), "--key", "k", "--requests", "30"]) == 0
    assert "ALARM" in capsys.readouterr().out
    assert main(["keys", "unflag", "k", "--db", str(db)]) == 0
    assert store.flags() == {} and store.detector_state(store.key("k").id, "prada", "x") is None
    store.close()


def test_a_schema_1_key_database_is_migrated(tmp_path):
    db = tmp_path / "old.db"
    store = KeyStore(db)
    store.create_key("k", 5)
    store.close()
    con = sqlite3.connect(db)  # back to what divqat wrote before the detectors
    con.executescript("DROP TABLE detector_state; UPDATE meta SET value = '1' WHERE name = 'schema';"
                      "ALTER TABLE audit DROP COLUMN alarm; ALTER TABLE audit DROP COLUMN detector_score;"
                      "ALTER TABLE keys DROP COLUMN flagged; ALTER TABLE keys DROP COLUMN flag_detector;"
                      "ALTER TABLE keys DROP COLUMN flag_score; ALTER TABLE keys DROP COLUMN flag_queries;")
    con.commit()
    con.close()
    store = KeyStore(db)
    key = store.key("k")
    store.flag(key.id, "prada", 0.5, 100)
    assert store.flags()["k"]["queries"] == 100 and store.usage("k")[0]["flagged"] is not None
    schema = sqlite3.connect(db).execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    assert json.loads(schema[0]) == 2
    store.close()
