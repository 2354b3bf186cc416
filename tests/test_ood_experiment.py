"""The out-of-distribution DivQAT in experiments: the config's ``divqat.variants``, their stages
and labels, the report's outlier / transfer-set section, and a tiny run with a class-subset
victim, a thief holding the other classes, and a DivQAT variant trained on synthesized outliers."""

from __future__ import annotations

import copy

import pytest
from conftest import TINY

from divqat.errors import ConfigError
from divqat.experiment import load_preset, parse_config, plan_stages, run_experiment
from divqat.experiment.config import config_dict
from divqat.experiment.report import overlap_note

BASE = {
    "name": "tiny-ood",
    "seeds": [0],
    "victim": {"dataset": f"{TINY}[0-2]", "arch": "resnet8", "holdout": 48, "batch_size": 64},
    "fp32": {"epochs": 3},
    "qat": {"epochs": 1},
    "divqat": {"alphas": [2.0], "epochs": 1,
               "variants": [{"divergence_on": "out", "cap": 0.5}]},
    "defenses": ["none"],
    "attacks": [{"name": "knockoff", "transfer": f"{TINY}[3]", "budgets": [40],
                 "surrogate": {"epochs": 1, "batch_size": 32}}],
}


def config(**divqat) -> dict:
    raw = copy.deepcopy(BASE)
    raw["divqat"].update(divqat)
    return raw


def test_variants_inherit_the_section_and_are_labelled():
    c = parse_config(config(alphas=[0.5, 2.0], variants=[
        {"divergence_on": "out", "cap": 0.5},
        {"name": "divqat-out-d", "divergence_on": "out", "alphas": [4.0], "distill": 0.5,
         "outliers": "animal-mnist:test"},
        {"name": "divqat-both", "divergence_on": "both", "divergence": "js"}]))
    got = [(d.name, s.alpha, d.divergence_on, d.cap, d.outliers, d.distill) for d, s in c.divqat.victims()]
    assert got == [("divqat", 0.5, "in", 0.15, "synth", 0.0), ("divqat", 2.0, "in", 0.15, "synth", 0.0),
                   ("divqat-out", 0.5, "out", 0.5, "synth", 0.0), ("divqat-out", 2.0, "out", 0.5, "synth", 0.0),
                   ("divqat-out-d", 4.0, "out", 0.15, "animal-mnist:test", 0.5),
                   ("divqat-both", 0.5, "both", None, "synth", 0.0),  # js: no cap, as for the section
                   ("divqat-both", 2.0, "both", None, "synth", 0.0)]
    labels = [s.label for s in plan_stages(c) if s.kind == "victim"]
    assert labels == ["victim qat | seed 0", "victim divqat a=0.5 | seed 0", "victim divqat a=2 | seed 0",
                      "victim divqat-out a=0.5 | seed 0", "victim divqat-out a=2 | seed 0",
                      "victim divqat-out-d a=4 | seed 0", "victim divqat-both a=0.5 | seed 0",
                      "victim divqat-both a=2 | seed 0"]
    assert parse_config(config_dict(c)) == c  # the resolved config reads back the same


def test_the_papers_divqat_stages_keep_their_keys_when_variants_are_added():
    def keys(raw):
        # The timing stage times every victim of the seed side by side: it changes by design.
        return {s.label: s.key for s in plan_stages(parse_config(raw)) if s.kind != "timing"}

    without = keys(config(variants=[]))
    with_variant = keys(config())
    assert all(with_variant[label] == key for label, key in without.items())
    victim = next(s for s in plan_stages(parse_config(config())) if s.label.startswith("victim divqat a=2"))
    assert "divergence_on" not in victim.spec["divqat"] and "name" not in victim.spec


@pytest.mark.parametrize("variants, expected", [
    ([{"divergence_on": "out"}, {"divergence_on": "out", "cap": 1.0}],
     "divqat.variants[1].name: 'divqat-out' already labels"),
    ([{"divergence_on": "in"}, {"name": "divqat"}], "divqat.variants[1].name: 'divqat' already labels"),
    ([{"name": "ood", "divergence_on": "out"}], "divqat.variants[0].name: must be a label starting with"),
    ([{"divergence_on": "outside"}], "divqat.variants[0]: divqat.divergence_on must be one of in, out, both; got 'outside'"),
    ([{"divergence_on": "out", "outliers": "synth:blur"}], "divqat.variants[0]: bad outlier source"),
    ([{"divergence_on": "out", "outliers": "no-such-set"}], "divqat.variants[0]: unknown dataset"),
    ([{"distill": 0.5}], "divqat.variants[0]: distill pulls"),
    ([{"divergence_on": "out", "variants": []}], "divqat.variants[0].variants: unknown key"),
    ({"divergence_on": "out"}, "divqat.variants: expected a list"),
    ([{"divergence_on": "out", "outliers": f"{TINY}[3]"}],
     f"divqat.variants[0].outliers: {TINY}[3]:train is also attacks[0]'s transfer set"),
])
def test_variant_errors_name_the_key(variants, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(config(variants=variants))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_overlap_notes():
    synth = f"synth:mix+patches+corrupt of {TINY}[0-2]:train[:100]"
    assert overlap_note(synth, f"{TINY}[0-2]:train[-48:]") is None  # the holdout: other images
    assert overlap_note(synth, f"{TINY}[3]:train") is None  # other classes
    assert "holds the training images" in overlap_note(synth, f"{TINY}[0-2]:train")
    assert overlap_note("animal-mnist:train", "animal-mnist:train").startswith("WARNING")
    assert "same dataset" in overlap_note("animal-mnist:test", "animal-mnist:train")
    assert "same dataset" in overlap_note("fashion-mnist:train", "fashion-mnist[5-9]:train")
    assert overlap_note("fashion-mnist[5-7]:train", "fashion-mnist[8-9]:train") is None
    assert overlap_note("mnist:train", "animal-mnist:train") is None


def test_smoke_preset_has_the_three_regimes_and_the_variant():
    smoke = load_preset("smoke")
    assert smoke.victim.dataset == "mnist[0-4]"
    assert {t for a in smoke.attacks for t in a.transfer} == {"holdout", "mnist[5-9]:train",
                                                                "animal-mnist:train"}
    assert [(d.name, d.divergence_on) for d, _ in smoke.divqat.victims()] == [("divqat", "in"),
                                                                               ("divqat-out", "out")]


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    """The config without attacks (each attack stage compiles its int8 victim again: the runner's
    attack path is covered by test_experiment); the report's section is checked with thieves below."""
    out = tmp_path_factory.mktemp("experiment") / "tiny-ood"
    return out, run_experiment(parse_config({**BASE, "attacks": []}), out, progress=False,
                               say=lambda _: None)


def test_a_run_with_an_ood_variant_records_its_outliers(ood_run):
    out, results = ood_run
    victims = {v["victim"]: v for v in results["victims"]}
    assert set(victims) == {"fp32 teacher", "qat", "divqat a=2", "divqat-out a=2"}
    ood = victims["divqat-out a=2"]
    assert ood["divergence_on"] == "out" and ood["kl_to_teacher_outliers"] > 0
    assert ood["outlier_set"] == f"synth:mix+patches+corrupt of {TINY}[0-2]:train[:{ood['train_images']}]"
    assert victims["divqat a=2"]["outlier_set"] is None and victims["divqat a=2"]["divergence_on"] == "in"
    assert {d["victim"] for d in results["defenses"]} == {"qat", "divqat a=2", "divqat-out a=2"}
    report = (out / "report.md").read_text()
    assert (f"- divqat-out a=2: outliers {ood['outlier_set']} (KL(fp32 ‖ victim) on outliers made from the "
            f"test split: {ood['kl_to_teacher_outliers']:.4f}); thieves' transfer sets: none") in report
    assert "Δ divqat-out a=2 − qat" in report


def test_report_names_outliers_and_transfer_sets_and_flags_overlaps(ood_run):
    from divqat.experiment.report import outliers_lines

    _, results = ood_run
    rows = [{"victim": "divqat-out a=2", "transfer_set": t}
            for t in (f"{TINY}[0-2]:train[-48:]", f"{TINY}[3]:train", f"{TINY}[0-2]:train")]
    text = "\n".join(outliers_lines({**results, "attacks": rows}))
    assert (f"thieves' transfer sets: {TINY}[0-2]:train[-48:], {TINY}[3]:train, {TINY}[0-2]:train"
            in text)
    assert text.count("  - ") == 1 and f"transfer set {TINY}[0-2]:train holds the training images" in text
    named = [{**v, "outlier_set": f"{TINY}[3]:train"} if v["victim"] == "divqat-out a=2" else v
             for v in results["victims"]]
    text = "\n".join(outliers_lines({"victims": named, "attacks": rows}))
    assert f"WARNING: the outliers are the thief's transfer set {TINY}[3]:train" in text
