"""Ownership in experiments: the `watermark:` entry (config, stage keys), the watermarked attack
stages that save their surrogates, the verify stage against the thieves' marks and the
independent models, and the report's "Ownership" section, through the runner on tiny data."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import TINY_CONFIG

from divqat.errors import ConfigError
from divqat.experiment import load_preset, parse_config, plan_stages, run_experiment
from divqat.experiment.config import config_dict
from divqat.experiment.report import REPORT

BASE = {**TINY_CONFIG, "name": "own", "seeds": [0, 1]}


def config(**top) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(top))
    return raw


def keys(raw: dict) -> dict[str, str]:
    return {s.label: s.key for s in plan_stages(parse_config(raw))}


def test_without_a_watermark_every_stage_key_is_what_it_was():
    base = keys(config())
    assert keys(config(attacks=[{**BASE["attacks"][0], "watermark": False}])) == base
    # A watermarked second thief adds its own stages; every stage of the first is unchanged.
    second = {**BASE["attacks"][0], "labels_only": [True], "watermark": {"rate": [0.1, 0.2]}}
    more = keys(config(attacks=[BASE["attacks"][0], second]))
    assert set(base.items()) <= set(more.items())
    added = set(more) - set(base)
    # 2 seeds x 2 victims x 2 defenses x 2 rates x 2 budgets (one stage each), and one verify
    # stage per victim and seed.
    assert sum(label.startswith("attack") for label in added) == 32
    assert sum(label.startswith("verify") for label in added) == 4 and len(added) == 36
    assert ("attack knockoff label-only holdout watermark 0.1 at 40 | qat | dcp beta=0.5 | seed 1"
            in added)
    # The presets have no watermark: their plans hold no stage of the new kinds.
    for name in ("smoke", "default"):
        assert {s.kind for s in plan_stages(load_preset(name))}.isdisjoint({"verify", "independent"})


def test_watermark_config_reads_back_and_its_errors_are_one_line():
    raw = config(watermark={"rate": 0.05, "significance": 1e-4,
                            "independent": [{"arch": "resnet8", "seed": 9}, {"arch": "resnet20", "seed": 9}]},
                 attacks=[BASE["attacks"][0], {**BASE["attacks"][0], "watermark": False}])
    parsed = parse_config(raw)
    assert parsed.watermark.rates == (0.05,) and parsed.watermark.significance == 1e-4
    assert [a.watermark for a in parsed.attacks] == [(0.05,), None]
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_dict(parsed)))) == parsed
    # An attack's own rate alone: verified at the defaults.
    own = parse_config(config(attacks=[{**BASE["attacks"][0], "watermark": {"rate": 0.01}}]))
    assert own.watermark.significance == 1e-6 and own.attacks[0].watermark == (0.01,)
    for top, expected in [({"watermark": {"rate": 0}}, r"watermark\.rate\[0\] must be in \(0, 0\.5\]"),
                          ({"watermark": {"rate": [0.1, 0.1]}}, "watermark.rate: each rate once"),
                          ({"watermark": {"rates": 0.1}}, "watermark.rates: unknown key; allowed: rate"),
                          ({"watermark": {"independent": [{"arch": "resnet9", "seed": 1}]}},
                           r"watermark\.independent\[0\]\.arch"),
                          ({"watermark": {"independent": [{"arch": "resnet8"}]}},
                           r"watermark\.independent\[0\]\.seed: required"),
                          ({"watermark": {"independent": [{"arch": "resnet8", "seed": 1}] * 2}},
                           "listed twice"),
                          ({"attacks": [{**BASE["attacks"][0], "watermark": True}]},
                           r"attacks\[0\]\.watermark: give \{rate: ...\}")]:
        with pytest.raises(ConfigError, match=expected) as e:
            parse_config(config(**top))
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_watermarked_thieves_are_verified_through_the_runner(tmp_path):
    """Two seeds of the tiny victims; a label-only thief per victim behind a watermark at rate
    0.2 (high, so that 40-80 queries carry marks) at two budgets; an extra independent model.
    Each thief's saved surrogate is tested against its own marks, each independent model (the
    other seed's victim of the same label, and the extra one) against every thief's marks."""
    raw = config(defenses=["none"],
                 attacks=[{"name": "knockoff", "transfer": "holdout", "labels_only": [True],
                           "budgets": [40, 80], "surrogate": {"epochs": 4, "batch_size": 16}}],
                 watermark={"rate": 0.2, "independent": [{"arch": "resnet8", "seed": 7}]})
    raw["fp32"] = {"epochs": 2}
    lines: list[str] = []
    results = run_experiment(parse_config(raw), tmp_path / "run", progress=False, say=lines.append)
    assert not results["failures"], results["failures"]
    # Each budget its own watermarked thief, its surrogate saved beside its marks.
    marked = [r for r in results["attacks"] if r.get("watermark") == 0.2]
    assert len(marked) == len(results["attacks"]) == 2 * 2 * 2
    for r in marked:
        assert r["attack_params"] == "watermark=0.2" and r["answers_marked"] > 0
        assert 0 <= r["defender_accuracy_watermarked"] <= r["defender_accuracy_unmarked"]
    folders = list((tmp_path / "run" / "stages" / "attack").iterdir())
    assert all((f / "marks.npz").is_file() and (f / "surrogate.pt").is_file() for f in folders)
    assert [r["model"] for r in results["independents"]] == ["resnet8 seed 7"]

    rows = results["verifications"]
    stolen = [r for r in rows if r["suspect"] == "surrogate"]
    claims = [r for r in rows if r["suspect"] == "independent"]
    assert len(stolen) == 8 and {(r["victim"], r["seed"], r["budget"]) for r in stolen} == {
        (v, s, b) for v in ("qat", "divqat a=2") for s in (0, 1) for b in (40, 80)}
    for r in stolen:
        assert r["marks"] > 0 and r["queries"] == r["marks"] + r["controls"]
        assert 0 < r["chance"] < 1 and 0 <= r["p_value"] <= 1
        assert r["verified"] == (r["p_value"] < 1e-6)
    # Per victim and seed: the other seed's victim of the same label and the extra model, each
    # asked the marks of the 2 thieves; none repeats them (a mark is a label the victim does not
    # give, and neither do models that learned the same task).
    assert len(claims) == 2 * 2 * 2 * 2
    assert {r["model"] for r in claims if r["victim"] == "qat" and r["seed"] == 0} == {
        "qat seed 1", "resnet8 seed 7"}
    assert not any(r["verified"] for r in claims) and max(r["agreement"] for r in claims) < 0.5

    report = (tmp_path / "run" / REPORT).read_text()
    section = report.split("## Ownership", 1)[1].split("\n## ", 1)[0]
    assert "| victim | defense | attack | thief | rate | queries | marks |" in section
    assert "| qat | none | knockoff holdout | label-only | 20 % | 80 |" in section
    # 5 models: each seed's two victims for the other seed's thieves, and the extra one.
    assert f"**0 verified in {len(claims)} tests** of 5 models" in section
    assert "watermarked accuracy %" in section
    assert any("stolen surrogates verified; 0 false claims in 4 tests of 2 independent models" in line
               for line in lines)
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(stored["verifications"]) == len(rows)
