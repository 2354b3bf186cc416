"""The keys of `divqat serve` and the client's side of the wire: rotation keeps a key's budget
and history, a revoked key's name can be given again, key files are owner-only, the remote
black box sends no key in clear off loopback, and the limits' command-line flags are the
library's. Servers listen on 127.0.0.1 only; every loop is bounded."""

from __future__ import annotations

import os
import re
import stat

import httpx
import numpy as np
import pytest
from test_serve import npy, post
from test_serve import service as service  # the fixture
from test_serve_detectors import BATCH, chains, natural
from test_serve_hostile import _watch, serving

from divqat.cli import build_parser, main
from divqat.cli.serve import LIMIT_FLAGS, limits_given
from divqat.errors import ConfigError
from divqat.remote import RemoteBlackBox, RemoteError, check_transport, is_loopback
from divqat.serve.app import ServiceLimits

# ---------------------------------------------------------------------- key lifecycle


def test_rotation_keeps_budget_usage_audit_and_detector_state(tmp_path):
    watch = _watch("flag")
    server, store, _ = serving(tmp_path, watch=watch)
    try:
        key, old = store.create_key("k", 500, rate=400, window=60)
        honest = natural(3 * BATCH)
        for i in range(3):
            assert post(server.url, old, npy(honest[i * BATCH:(i + 1) * BATCH].numpy())).status_code == 200
        rotated, new = store.rotate_key("k")
        assert new != old and rotated.id == key.id and rotated.key_id != key.key_id
        assert (rotated.budget, rotated.used, rotated.rate, rotated.output) == (500, 3 * BATCH, 400, "soft")
        r = post(server.url, old, npy(honest[:1].numpy()))
        assert (r.status_code, r.json()["error"]) == (401, "unknown_key")
        # The new secret goes on where the old one stopped: the same counter, rate window,
        # audit and detector (its stream position counts the old secret's queries).
        r = post(server.url, new, npy(chains(BATCH).numpy()))
        assert r.status_code == 200 and r.headers["divqat-queries-used"] == str(4 * BATCH)
        assert r.headers["ratelimit"].startswith(f'"images";r={400 - 4 * BATCH};')
        usage = store.usage("k")[0]
        assert (usage["requests"], usage["answered_requests"], usage["used"]) == (4, 4, 4 * BATCH)
        assert watch._detectors[key.id].queries == 4 * BATCH
    finally:
        server.stop()
    assert store.detector_state(key.id, "prada", watch.config) is not None
    store.close()


def test_a_revoked_key_stays_revoked_and_its_name_can_be_given_again(service):
    url, store, _ = service
    first, old = store.create_key("client", 100)
    assert post(url, old, npy(np.zeros((2, 16, 16), np.uint8))).status_code == 200
    with pytest.raises(ConfigError, match="exists already.*rotate client"):
        store.create_key("client", 10)
    store.revoke("client")
    with pytest.raises(ConfigError, match=rf"revoked.*client\.revoked-{first.id}"):
        store.rotate_key("client")
    second, new = store.create_key("client", 10)
    assert second.id != first.id and second.used == 0 and second.revoked is None
    assert post(url, old, npy(np.zeros((1, 16, 16), np.uint8))).json()["error"] == "revoked_key"
    assert post(url, new, npy(np.zeros((1, 16, 16), np.uint8))).status_code == 200
    history = store.usage(f"client.revoked-{first.id}")[0]  # the old key's, under its new name
    assert (history["used"], history["requests"], history["revoked"] is not None) == (2, 1, True)
    assert store.usage("client")[0]["used"] == 1


def test_key_files_are_written_owner_only_and_left_alone_when_no_key_is_made(tmp_path, capsys):
    db, out = str(tmp_path / "keys.db"), tmp_path / "k.key"
    old = os.umask(0o022)
    try:
        out.write_text("something else\n")
        out.chmod(0o644)
        assert main(["keys", "create", "k", "--budget", "5", "--db", db, "--out", str(out)]) == 0
        first = out.read_text().strip()
        assert stat.S_IMODE(out.stat().st_mode) == 0o600 and re.fullmatch(r"dq_[0-9a-f]{12}_\S{43}", first)
        assert capsys.readouterr().out == ""  # the secret is in the file only
        assert main(["keys", "rotate", "k", "--db", db, "--out", str(out)]) == 0
        second = out.read_text().strip()
        assert second != first and stat.S_IMODE(out.stat().st_mode) == 0o600
        assert "rotated key 'k'" in capsys.readouterr().err
        assert main(["keys", "revoke", "k", "--db", db]) == 0
        assert main(["keys", "rotate", "k", "--db", db, "--out", str(out)]) == 2  # revoked
        assert out.read_text().strip() == second  # untouched
        assert main(["keys", "create", "j", "--budget", "5", "--db", db, "--out",
                     str(tmp_path / "missing" / "j.key")]) == 2
        assert "cannot write the key" in capsys.readouterr().err
        assert main(["keys", "list", "--db", db]) == 0
        assert " j " not in capsys.readouterr().out  # no key made for a file that cannot be written
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".divqat-key")) == []
    finally:
        os.umask(old)


# ---------------------------------------------------------------------- the client's transport

def test_the_client_sends_no_key_in_clear_to_another_machine(service):
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "https://192.0.2.1",
                "https://example.org:8443"):
        check_transport(url)
    for url in ("http://192.0.2.1:8000", "http://example.org", "http://0.0.0.0:8000", "http://[2001:db8::1]"):
        with pytest.raises(ConfigError, match="in clear"):
            check_transport(url)
        check_transport(url, insecure=True)
    assert is_loopback("127.8.9.10") and not is_loopback("10.0.0.1")
    with pytest.raises(ConfigError, match="in clear"):  # before anything is sent
        RemoteBlackBox("http://192.0.2.1:8000", "dq_000000000000_" + "A" * 43,
                       transport=httpx.MockTransport(lambda request: pytest.fail("sent")))
    # Told so, it sends: here to the real service, through a transport that stands for the path.
    url, store, _ = service
    _, key = store.create_key("k", 10)
    with httpx.Client(base_url=url) as real:
        def forward(request: httpx.Request) -> httpx.Response:
            r = real.request(request.method, request.url.path, headers=request.headers, content=request.content)
            return httpx.Response(r.status_code, headers=r.headers, content=r.content)

        with RemoteBlackBox("http://192.0.2.1:8000", key, insecure=True,
                            transport=httpx.MockTransport(forward)) as box:
            assert box.budget == 10 and box.query(natural(2)).shape == (2, 4)


def test_the_client_waits_out_a_busy_service_within_its_bound(service):
    url, store, _ = service
    _, key = store.create_key("patient", 10)
    busy = {"left": 2, "seen": 0}
    with httpx.Client(base_url=url) as real:
        def crowded(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/predict" and busy["left"]:
                busy["left"] -= 1
                busy["seen"] += 1
                return httpx.Response(503, headers={"Retry-After": "0"},
                                      json={"error": "busy", "message": "the service is serving 4 requests at once"})
            r = real.request(request.method, request.url.path, headers=request.headers, content=request.content)
            return httpx.Response(r.status_code, headers=r.headers, content=r.content)

        with RemoteBlackBox(url, key, transport=httpx.MockTransport(crowded)) as box:
            assert box.query(natural(2)).shape == (2, 4) and busy["seen"] == 2
            assert box.queries_used == 2  # the busy answers charged nothing
        with RemoteBlackBox(url, key, max_wait=0.5, transport=httpx.MockTransport(
                lambda request: crowded(request) if request.url.path != "/v1/predict"
                else httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "busy", "message": "full"}))) as box:
            with pytest.raises(RemoteError, match="busy for more than 0.5 s"):
                box.query(natural(1))


def test_the_remote_attack_refuses_plain_http_off_loopback_in_one_line(tmp_path, capsys):
    key = tmp_path / "thief.key"
    key.write_text("dq_000000000000_" + "A" * 43 + "\n")
    args = ["attack", "--victim", "http://192.0.2.1:8000", "--api-key-file", str(key), "--attack", "knockoff",
            "--transfer", "holdout:100", "--budget", "10", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in clear" in err[0] and "--insecure" in err[0]
    assert main(["attack", "--victim", str(tmp_path), "--insecure", "--attack", "knockoff", "--budget", "10",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--insecure go with --victim http" in capsys.readouterr().err


# ---------------------------------------------------------------------- the limits' flags

def test_the_limit_flags_set_service_limits_and_their_help_tells_the_defaults():
    defaults = ServiceLimits()
    given = {"--max-pixels": "5000", "--max-side": "100", "--read-timeout": "2.5", "--head-timeout": "3",
             "--max-head-kb": "8", "--max-concurrent": "4", "--max-per-key": "2", "--max-refusals": "7",
             "--decode-threads": "3"}
    assert set(given) == {flag for flag, *_ in LIMIT_FLAGS}
    base = ["serve", "--victim", "v", "--db", "d"]
    args = build_parser().parse_args([*base, *[w for pair in given.items() for w in pair]])
    limits = ServiceLimits(**limits_given(args))
    assert (limits.max_pixels, limits.max_side, limits.read_timeout, limits.head_timeout, limits.max_head_bytes,
            limits.max_concurrent, limits.max_per_key, limits.max_refusals, limits.decode_threads) == (
        5000, 100, 2.5, 3.0, 8192, 4, 2, 7, 3)
    assert limits_given(build_parser().parse_args(base)) == {}  # absent: the library's defaults
    for flag, field, _, scale, _, help_text in LIMIT_FLAGS:
        shown = float(re.search(r"\(default: ([0-9.]+)", help_text).group(1))
        assert shown * scale == getattr(defaults, field), flag
