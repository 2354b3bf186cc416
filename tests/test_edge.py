"""The device target: training for XNNPACK, `divqat export` to a .pte run by ExecuTorch, a fused
defense inside the program, encryption at rest, the file-copy thief, and `victim.target: edge`."""

from __future__ import annotations

import functools
import json
import shutil
import stat
import sys

import pytest
import torch
from conftest import TINY, _load_tiny

pytest.importorskip("executorch.runtime", reason="needs divqat[edge]")

from divqat import load_victim  # noqa: E402
from divqat.blackbox import DefendedVictim  # noqa: E402
from divqat.cli import main  # noqa: E402
from divqat.data import to_float  # noqa: E402
from divqat.defenses.base import create_defense  # noqa: E402
from divqat.edge import KEY_ENV, EdgeVictim  # noqa: E402
from divqat.errors import ArtifactError, ConfigError, MissingExtra  # noqa: E402
from divqat.experiment import parse_config, plan_stages  # noqa: E402
from divqat.experiment.report import copy_table, main_table  # noqa: E402
from divqat.ownership.fingerprint import (  # noqa: E402
    file_sha256,
    fingerprint_path,
    generate_fingerprint,
    load_fingerprint,
    match,
    match_file,
)
from divqat.pipelines.context import RunContext  # noqa: E402
from divqat.pipelines.defend import DefendRequest, defend_victim  # noqa: E402
from divqat.pipelines.device_copy import copy_attack  # noqa: E402
from divqat.pipelines.export import export_victim  # noqa: E402
from divqat.pipelines.train import TrainRequest, train_victim  # noqa: E402
from divqat.pipelines.verify import VerifyRequest, verify_suspect  # noqa: E402
from divqat.sealed import MAGIC, new_key, read_key, seal, unseal  # noqa: E402


def _test_images():
    test = _load_tiny("test", None)
    return to_float(test.images), torch.as_tensor(test.labels)


@pytest.fixture(scope="session")
def edge(tiny_victims, tmp_path_factory):
    """A tiny QAT victim trained for the edge target; its plain program; and, through the CLI,
    the same victim with DCP fused inside, sealed with a new key."""
    root = tmp_path_factory.mktemp("edge")
    victim = root / "edge-qat"
    train_victim(TrainRequest(dataset=TINY, mode="qat", teacher=tiny_victims["fp32"], epochs=1,
                              out=victim, progress=False, target="edge"))
    plain = root / "qat.pte"
    info = export_victim(victim, plain)
    key = root / "device.key"
    sealed = root / "qat-dcp.pte"
    assert main(["export", "--victim", str(victim), "--defense", "dcp", "--param", "beta=0.5",
                 "--out", str(sealed), "--encrypt-key-file", str(key)]) == 0
    return {"victim": victim, "plain": plain, "sealed": sealed, "key": key, "info": info}


# ---------------------------------------------------------------- export and reload

def test_export_and_reload_keep_the_victim_interface(edge, tmp_path):
    meta = load_victim(edge["victim"]).metadata
    assert meta["target"] == "edge" and meta["mode"] == "qat"
    assert edge["info"]["precision"] == "int8" and edge["info"]["outputs"] == "logits"
    v = load_victim(edge["plain"])
    assert isinstance(v, EdgeVictim) and v.outputs == "logits" and v.defense is None
    assert (v.mode, v.input_shape, v.num_classes, v.int8) == ("qat", (1, 16, 16), 4, True)
    assert v.classes == tuple(meta["classes"]) and v.writes_input is False
    assert v.metadata["program"]["backend"] == "xnnpack" and v.max_batch == 256
    x, _ = _test_images()
    many = torch.cat([x, x, x])  # 384 rows: more than one call of at most 256
    out = v(many)
    assert out.shape == (384, 4) and out.dtype == torch.float32
    assert torch.equal(out[:128], v(x)) and torch.equal(v(x[:1]), out[:1])
    assert v(x[:0]).shape == (0, 4)
    # A folder holding one program loads as that program.
    folder = tmp_path / "device"
    folder.mkdir()
    shutil.copy(edge["plain"], folder)
    assert torch.equal(load_victim(folder)(x), out[:128])
    with pytest.raises(ValueError, match=r"shape \(N, 1, 16, 16\)"):
        v(torch.rand(2, 3, 16, 16))


def test_parity_with_the_torch_int8_victim(edge):
    x, labels = _test_images()
    torch_int8 = load_victim(edge["victim"])(x)
    program = load_victim(edge["plain"])(x)
    agree = (program.argmax(1) == torch_int8.argmax(1)).float().mean().item()
    assert agree >= 0.99
    # XNNPACK requantizes in integers where the reference program rounds in float: a few
    # quantization steps of the logits at most.
    assert (program - torch_int8).abs().max().item() < 0.5
    acc = (program.argmax(1) == labels).float().mean().item()
    assert acc > 0.5  # chance is 0.25


# ---------------------------------------------------------------- a defense inside the program

def test_fused_defense_answers_the_defended_posteriors(edge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, str(edge["key"]))
    x, _ = _test_images()
    fused = load_victim(edge["sealed"])
    assert fused.outputs == "posteriors" and fused.defense == "dcp"
    assert fused.metadata["program"]["defense_params"]["beta"] == 0.5
    answers = fused.program_outputs(x)
    assert torch.allclose(answers.sum(1), torch.ones(len(x)), atol=1e-6)
    # The same defense run in-process on the plain program's logits (its clean answers).
    plain = load_victim(edge["plain"])
    defended = DefendedVictim(plain, create_defense("dcp", beta=0.5))(x)
    assert (answers - defended.defended).abs().max().item() < 1e-5
    assert (answers - defended.clean).abs().max().item() > 1e-3  # DCP did change them
    # Served behind no further defense, the thief gets exactly the device's answers.
    served = DefendedVictim(fused)(x).defended
    assert (served - answers).abs().max().item() < 1e-6


@pytest.mark.parametrize("defense, reason", [
    ("random-noise", "random noise"), ("mad", "surrogate model"),
    ("adaptive-misinformation", "second model"),
])
def test_defenses_that_are_not_formulas_are_refused(edge, tmp_path, defense, reason):
    with pytest.raises(ConfigError, match=reason) as e:
        export_victim(edge["victim"], tmp_path / "x.pte", defense=defense)
    assert "fusable: dcp, none" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.pte").exists()


def test_an_x86_victim_is_refused_with_the_command_to_train_one(tiny_victims, tmp_path, capsys):
    code = main(["export", "--victim", str(tiny_victims["qat"]), "--out", str(tmp_path / "x.pte")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "x86 target" in err and "--target edge" in err
    with pytest.raises(ConfigError, match="only applies to --mode qat or divqat"):
        TrainRequest(dataset=TINY, mode="fp32", target="edge")


def test_missing_executorch_is_one_line_with_the_install_command(tiny_victims, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import fails
    with pytest.raises(MissingExtra, match=r"pip install 'divqat\[edge\]'"):
        export_victim(tiny_victims["qat"], tmp_path / "x.pte")


# ---------------------------------------------------------------- the ownership fingerprint

def test_export_writes_the_fingerprint_beside_the_program(edge):
    plain, info = edge["plain"], edge["info"]
    assert info["fingerprint"] == str(fingerprint_path(plain))
    assert fingerprint_path(plain) == plain.with_name("qat.fingerprint.safetensors")
    assert info["fingerprint_points"] == 100 and 0 < info["fingerprint_seconds"] < info["seconds"]
    assert info["fingerprint_skipped"] is None
    fp = load_fingerprint(fingerprint_path(plain))
    assert fp.program_sha256 == (info["sha256"],) and fp.params["dataset"] == TINY
    assert fp.input_shape == (1, 16, 16) and fp.num_classes == 4
    assert match_file(fp, plain).verified  # the exact copy, by its hash
    # Labelled by the program itself: the program agrees on every point.
    v = match(fp, load_victim(plain))
    assert v.verified and v.agreed == len(fp)
    # A sealed program records the sealed file and the plain program inside it.
    sealed = load_fingerprint(fingerprint_path(edge["sealed"]))
    inner = unseal(edge["sealed"].read_bytes(), read_key(edge["key"]))
    assert sealed.program_sha256 == (file_sha256(edge["sealed"]), file_sha256(inner))


def test_export_records_fingerprint_references_through_the_cli(edge, tiny_victims, tmp_path, capsys):
    # Fewer points, and a reference model recorded as a floor of the chance rate (the teacher
    # here: not independent, which the export warns about, but any victim of the same shape
    # exercises the path).
    out = tmp_path / "small.pte"
    assert main(["export", "--victim", str(edge["victim"]), "--out", str(out), "--fingerprint-points",
                 "20", "--fingerprint-reference", str(tiny_victims["fp32"])]) == 0
    captured = capsys.readouterr()
    assert "fingerprint: 20 points -> " in captured.out
    assert "warning: an independent reference model agrees with" in captured.err
    small = load_fingerprint(fingerprint_path(out))
    assert len(small) == 20 and len(small.reference_agreement) == 1
    assert "1 reference model" in match(small, load_victim(out)).evidence


def test_export_without_boundary_points_warns_once_and_writes_the_program(edge, tmp_path, monkeypatch):
    from divqat.pipelines import export as export_module

    # A margin no point reaches in one step, as on a victim with too few points near its
    # boundaries: the export goes on without a fingerprint instead of failing.
    monkeypatch.setattr(export_module, "generate_fingerprint",
                        functools.partial(generate_fingerprint, margin=1e4, steps=1))
    said: list[str] = []
    out = tmp_path / "bare.pte"
    info = export_victim(edge["victim"], out, fingerprint_points=4, log=said.append)
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and "no fingerprint point crossed the victim's boundary" in warnings[0]
    assert warnings[0].endswith("bare.pte is written without a fingerprint")
    assert out.is_file() and not fingerprint_path(out).exists()
    assert info["fingerprint"] is None and info["fingerprint_points"] == 0
    assert info["fingerprint_skipped"].startswith("no fingerprint point crossed")
    x, _ = _test_images()
    assert torch.equal(load_victim(out)(x).argmax(1), load_victim(edge["plain"])(x).argmax(1))


def test_verify_identifies_the_exported_program_by_its_fingerprint(edge, tiny_victims, capsys):
    # The .pte itself: the identical file by its hash, and every point's label repeated.
    fp = fingerprint_path(edge["plain"])
    assert main(["verify", "--suspect", str(edge["plain"]), "--fingerprint", str(fp), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    (row,) = record["fingerprints"]
    assert row["identical_file"] is True and row["agreed"] == row["points"] == 100 and row["verified"]
    assert record["suspect_sha256"] == edge["info"]["sha256"] and record["queries"] == 100
    # A victim folder is no file: its labels on the points are tested, not a hash.
    record = verify_suspect(VerifyRequest(tiny_victims["fp32"], fingerprints=(fp,)))
    (row,) = record["fingerprints"]
    assert row["identical_file"] is None and record["suspect_sha256"] is None
    assert row["verified"] == (row["p_value"] < 1e-6) and record["queries"] == 100


# ---------------------------------------------------------------- protection at rest

def test_encrypted_round_trip_decrypts_in_memory_only(edge, tmp_path, monkeypatch):
    data = edge["sealed"].read_bytes()
    assert data.startswith(MAGIC) and b"divqat_metadata" not in data and b"dcp" not in data
    assert stat.S_IMODE(edge["key"].stat().st_mode) == 0o600
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ArtifactError, match=f"encrypted.*{KEY_ENV}"):
        load_victim(edge["sealed"])
    folder = tmp_path / "device"
    folder.mkdir()
    shutil.copy(edge["sealed"], folder)
    before = sorted(p.name for p in folder.iterdir())
    v = load_victim(folder, key_file=edge["key"])
    assert v.defense == "dcp"
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing decrypted to disk
    # Two seals of the same program differ (fresh nonce) and both open.
    key = read_key(edge["key"])
    assert seal(b"program", key) != seal(b"program", key)
    assert unseal(seal(b"program", key), key) == b"program"


def test_wrong_key_and_tampered_file_are_refused_in_one_line(edge, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other.key"
    new_key(other)
    with pytest.raises(ArtifactError, match="different key"):
        load_victim(edge["sealed"], key_file=other)
    with pytest.raises(ArtifactError, match="never written over"):
        new_key(other)
    data = bytearray(edge["sealed"].read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "tampered.pte"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="altered or truncated"):
        load_victim(tampered, key_file=edge["key"])
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(edge["sealed"].read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="altered or truncated"):
        load_victim(truncated, key_file=edge["key"])
    bad = tmp_path / "bad.key"
    bad.write_text("not hex\n")
    with pytest.raises(ArtifactError, match="64 hex characters"):
        load_victim(edge["sealed"], key_file=bad)
    # Through the CLI (key from the environment): one line, exit 2.
    monkeypatch.setenv(KEY_ENV, str(edge["key"]))
    code = main(["attack", "--attack", "copy", "--victim", str(tampered), "--out", str(tmp_path / "o")])
    assert code == 2 and "altered or truncated" in capsys.readouterr().err
    # A damaged plain program is refused too.
    broken = tmp_path / "broken.pte"
    broken.write_bytes(edge["plain"].read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="not a loadable ExecuTorch program"):
        load_victim(broken)


# ---------------------------------------------------------------- the device's two threats

def test_copy_attack_gets_the_victim_itself_and_nothing_without_the_key(edge, tmp_path, monkeypatch):
    record = copy_attack(edge["plain"], out=tmp_path / "copy")
    row = record["results"][0]
    assert row["queries_used"] == 0 and row["identical_copy"]
    assert row["agreement"] == 1.0 and row["max_posterior_difference"] == 0.0
    assert row["adversary_accuracy"] == record["victim_accuracy"] > 0.5
    assert (tmp_path / "copy" / "metrics.json").exists()
    # The owner finds the copy: the file is one its fingerprint recorded, and it answers the points.
    owner = record["fingerprint"]
    n = len(load_fingerprint(fingerprint_path(edge["plain"])))
    assert owner["identical_file"] and owner["verified"] and owner["agreed"] == owner["points"] == n

    monkeypatch.setenv(KEY_ENV, str(edge["key"]))
    with_key = copy_attack(edge["sealed"])
    assert with_key["agreement"] == 1.0 and with_key["program"]["encrypted"]
    no_key = copy_attack(edge["sealed"], thief_has_key=False)
    assert no_key["adversary_accuracy"] is None and "no key" in no_key["note"]
    # A sealed copy that does not run is still the owner's file.
    assert no_key["fingerprint"]["identical_file"] and no_key["fingerprint"]["agreed"] is None
    with pytest.raises(ConfigError, match="device program"):
        copy_attack(edge["victim"])


def test_copy_attack_without_a_fingerprint_and_of_another_program(edge, tmp_path, monkeypatch, capsys):
    assert main(["attack", "--attack", "copy", "--victim", str(edge["plain"]), "--out", str(tmp_path / "c")]) == 0
    assert "the owner's fingerprint: copy verified (identical file, " in capsys.readouterr().out
    bare = tmp_path / "bare.pte"
    bare.write_bytes(edge["plain"].read_bytes())
    assert copy_attack(bare)["fingerprint"] is None
    assert main(["attack", "--attack", "copy", "--victim", str(bare), "--out", str(tmp_path / "b")]) == 0
    assert "fingerprint" not in capsys.readouterr().out
    # Another program of the same victim (DCP fused, sealed: other bytes) beside the plain one's
    # fingerprint: not a file the fingerprint recorded, so the boundary test decides, and DCP
    # keeps every argmax.
    other = tmp_path / "other.pte"
    other.write_bytes(edge["sealed"].read_bytes())
    fingerprint_path(other).write_bytes(fingerprint_path(edge["plain"]).read_bytes())
    monkeypatch.setenv(KEY_ENV, str(edge["key"]))
    owner = copy_attack(other)["fingerprint"]
    assert not owner["identical_file"] and owner["agreed"] == owner["points"] and owner["verified"]


def test_defend_and_attack_run_against_the_program(edge, tmp_path, capsys):
    m = defend_victim(DefendRequest(edge["plain"], "top-k", {"k": 1}), RunContext(progress=False))
    assert m["victim_mode"] == "qat" and m["defender_accuracy"] == m["victim_accuracy"]
    assert main(["attack", "--victim", str(edge["plain"]), "--attack", "knockoff", "--transfer",
                 f"{TINY}:train", "--budget", "64", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "steal")]) == 0
    assert "budget 64" in capsys.readouterr().out
    assert main(["attack", "--victim", str(edge["plain"]), "--attack", "knockoff",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--budget" in capsys.readouterr().err


# ---------------------------------------------------------------- victim.target: edge

EDGE_CONFIG = {
    "name": "tiny-edge", "seeds": [0],
    "victim": {"dataset": TINY, "holdout": 96, "target": "edge"},
    "fp32": {"epochs": 1}, "divqat": {"alphas": [2.0]},
    "defenses": ["none"],
    "attacks": [{"name": "knockoff", "transfer": "holdout", "budgets": [40]}],
}


def test_edge_target_plans_a_copy_stage_per_victim_and_keeps_x86_keys():
    config = parse_config(EDGE_CONFIG)
    assert config.victim.target == "edge"
    stages = plan_stages(config)
    victims = [s for s in stages if s.kind == "victim"]
    assert all(s.spec["target"] == "edge" for s in victims)
    copies = [s for s in stages if s.kind == "copy"]
    assert [s.inputs for s in copies] == [(v.key,) for v in victims]
    x86 = plan_stages(parse_config({**EDGE_CONFIG, "victim": {"dataset": TINY, "holdout": 96}}))
    assert not any(s.kind == "copy" or "target" in s.spec for s in x86)
    assert [s.key for s in x86 if s.kind == "fp32"] == [s.key for s in stages if s.kind == "fp32"]
    with pytest.raises(ConfigError, match="victim.target.*x86, edge"):
        parse_config({**EDGE_CONFIG, "victim": {"dataset": TINY, "target": "arm"}})


def test_fingerprint_stages_test_the_other_seeds_victims_after_every_seed():
    config = parse_config({**EDGE_CONFIG, "seeds": [0, 1]})
    stages = plan_stages(config)
    from divqat.experiment.labels import victim_name

    victims = {(s.seed, victim_name(s.spec)): s for s in stages if s.kind == "victim"}
    tests = [s for s in stages if s.kind == "fingerprint"]
    assert sorted((s.seed, s.spec["victim"]) for s in tests) == sorted(victims)
    for s in tests:
        mine, other = victims[s.seed, s.spec["victim"]], victims[1 - s.seed, s.spec["victim"]]
        assert s.inputs == (mine.key, other.key) and s.spec["independent"] == [f"{s.spec['victim']} seed {1 - s.seed}"]
        assert s.spec["significance"] == 1e-6
    assert stages.index(tests[0]) > max(stages.index(v) for v in victims.values())  # after every seed
    # One seed and no independent model: nothing to test; x86 victims have no program.
    assert not any(s.kind == "fingerprint" for s in plan_stages(parse_config(EDGE_CONFIG)))
    x86 = {**EDGE_CONFIG, "seeds": [0, 1], "victim": {"dataset": TINY, "holdout": 96}}
    assert not any(s.kind == "fingerprint" for s in plan_stages(parse_config(x86)))


def test_fingerprint_stage_work_counts_matches_as_false_claims(edge, tiny_victims, tmp_path):
    from divqat.experiment.report import fingerprint_lines
    from divqat.pipelines.stages import EDGE_PROGRAM, StageWork

    # An edge victim's folder as the victim stage leaves it: the program and its fingerprint inside.
    victim = tmp_path / "victim"
    shutil.copytree(edge["victim"], victim)
    (victim / EDGE_PROGRAM).write_bytes(edge["plain"].read_bytes())
    fingerprint_path(victim / EDGE_PROGRAM).write_bytes(fingerprint_path(edge["plain"]).read_bytes())
    # The victim itself standing as an "independent model" must match: the count is of matches.
    record = StageWork().fingerprint_tests(tmp_path / "stage", victim, {"itself": victim,
                                                                         "its teacher": tiny_victims["fp32"]})
    rows = {r["model"]: r for r in record["rows"]}
    assert rows["itself"]["verified"] and rows["itself"]["agreed"] == rows["itself"]["points"] == record["points"]
    assert record["false_claims"] == sum(r["verified"] for r in record["rows"]) >= 1
    assert (tmp_path / "stage" / "metrics.json").is_file()
    table = "\n".join(fingerprint_lines({"fingerprints": [
        {"seed": 0, "victim": "qat", **r, "significance": 1e-6} for r in record["rows"]]}))
    assert f"| qat | 1 | 2 | {record['false_claims']} |" in table
    # No fingerprint beside the program (the export found no boundary point): said, no rows.
    fingerprint_path(victim / EDGE_PROGRAM).unlink()
    bare = StageWork().fingerprint_tests(tmp_path / "bare", victim, {"itself": victim})
    assert bare["rows"] == [] and "no fingerprint" in bare["note"]


def test_copy_rows_carry_the_owner_fingerprint_test():
    from divqat.experiment.stages.copy import _fingerprint_columns

    assert _fingerprint_columns(None) == {"fingerprint_verified": None, "fingerprint_agreement": None}
    ran = {"identical_file": False, "points": 80, "agreed": 60, "p_value": 1e-9, "verified": True}
    assert _fingerprint_columns(ran) == {"fingerprint_verified": True, "fingerprint_agreement": 0.75}
    sealed = {**ran, "identical_file": True, "agreed": None}
    assert _fingerprint_columns(sealed)["fingerprint_agreement"] is None


def test_report_puts_the_copy_beside_the_query_attacks():
    base = {"seed": 0, "victim_mode": "qat", "alpha": 0.0, "defense": "none", "defense_label": "none",
            "attack_params": "", "transfer": "holdout", "transfer_set": "tiny:train[-96:]",
            "budget": 500, "defender_error": 0.12, "l1_distance": 0.0, "ms_per_query_defended": 0.01}
    attacks = [{**base, "victim": "qat", "attack": "knockoff", "thief": t, "adversary_accuracy": a,
                "adversary_error": 1 - a, "agreement": g, "disagreement": 1 - g}
               for t, a, g in (("soft", 0.80, 0.85), ("label-only", 0.82, 0.86))]
    copies = [{"seed": 0, "victim": "qat", "alpha": 0.0, "attack": "copy", "thief": "file copy",
               "adversary_accuracy": 0.88, "agreement": 1.0, "note": None}]
    results = {"victims": [], "defenses": [], "attacks": attacks, "copies": copies}
    table = "\n".join(copy_table(results))
    assert "| qat | file copy | 0 | 88.0 | 100.0 | no fingerprint |" in table
    copies[0].update(fingerprint_verified=True, fingerprint_agreement=1.0)
    assert "| qat | file copy | 0 | 88.0 | 100.0 | 1 of 1 verified |" in "\n".join(copy_table(results))
    assert "| qat | holdout (strongest: knockoff label-only ×1) | 500 | 82.0 | 86.0 |" in table
    assert "file copy" in main_table(results)


# ---------------------------------------------------------------- users' architectures on the device

def _edge_int8_program(arch: str, size: int = 32) -> torch.nn.Module:
    """An untrained ``arch`` through the edge QAT flow as ``divqat train`` runs it (channels_last,
    fake-quantized, one batch to set the ranges, converted); its torch int8 program."""
    from divqat.models.normalized import VictimNet
    from divqat.quant import convert_to_int8, prepare_qat

    torch.manual_seed(0)
    example = torch.rand(2, 3, size, size)
    net = VictimNet(arch, 3, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).to(memory_format=torch.channels_last)
    qat = prepare_qat(net, example, target="edge")
    qat(torch.rand(8, 3, size, size).contiguous(memory_format=torch.channels_last))
    qat.freeze()
    return convert_to_int8(qat, example).module()


def test_mobilenet_v3_runs_at_any_batch_on_the_device():
    # Its channels_last (1, C, 1, 1) normalization buffers once went in with NHWC strides, and
    # every call failed in the runtime ("Propagating input shapes failed").
    from divqat.models.external import import_torchvision

    import_torchvision()
    from divqat.edge import METADATA_METHOD
    from divqat.pipelines.export import DeviceModel
    from divqat.quant.edge import lower_to_pte, runtime

    program = _edge_int8_program("torchvision:mobilenet_v3_small")
    data = lower_to_pte(DeviceModel(program), torch.rand(8, 3, 32, 32), max_batch=8,
                        constant_methods={METADATA_METHOD: "{}"})
    forward = runtime().load_program(data).load_method("forward")
    for n in (1, 5):
        x = torch.rand(n, 3, 32, 32)
        on_device, in_torch = forward.execute([x])[0], program(x)
        assert on_device.shape == (n, 4)
        assert torch.equal(on_device.argmax(1), in_torch.argmax(1))
        assert (on_device - in_torch).abs().max().item() < 0.5


def test_an_edge_int8_max_pool_runs_compiled_as_the_victim_runs_it():
    # Inductor lowered its dequantize -> max_pool2d -> quantize to quantized.max_pool2d, which
    # has no kernel for int8 (only quint8) tensors: resnet18 and shufflenet failed every call.
    from divqat.quant import compile_int8, convert_to_int8, prepare_qat

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1), torch.nn.Conv2d(8, 8, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    example = torch.rand(2, 3, 16, 16)
    qat = prepare_qat(net, example, target="edge")
    qat(torch.rand(8, 3, 16, 16))
    qat.freeze()
    program = convert_to_int8(qat, example).module()
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        compiled, eager = compile_int8(program, freezing=False)(x), program(x)
    # Inductor fuses the quantize arithmetic and may round a value to the next int8 step.
    assert (compiled - eager).abs().max().item() < 0.1
    assert (compiled.argmax(1) == eager.argmax(1)).float().mean().item() >= 0.9
