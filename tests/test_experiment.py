"""The experiment runner: config validation, stage keys, a tiny pipeline run end to end (interrupted,
resumed, rerun), the results files and report, and `divqat run` / `divqat report`."""

from __future__ import annotations

import copy
import csv
import json
import time
from collections import Counter

import pytest
import torch
import yaml
from conftest import TINY, TINY_CONFIG

from divqat.cli import main
from divqat.errors import ConfigError, DatasetError
from divqat.experiment import (
    load_config,
    load_preset,
    load_results,
    parse_config,
    plan_stages,
    preset_names,
    run_experiment,
)
from divqat.experiment.cache import DONE, StageCache, stage_key
from divqat.experiment.config import config_dict
from divqat.experiment.executors import SerialExecutor
from divqat.experiment.report import delta_cell
from divqat.experiment.results import with_strongest
from divqat.pipelines import stages as stages_module

# fp32, qat, divqat; 2 victims x 2 defenses; 2 victims x 2 defenses x (soft, label-only); timing.
N_STAGES, N_ATTACKS = 1 + 2 + 4 + 8 + 1, 8


def tiny(**changes) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = config
        for key in path:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return config


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("changes, expected", [
    ({"atacks": []}, ["atacks: unknown key", "attacks", "divqat"]),
    ({"victim__datset": TINY}, ["victim.datset: unknown key", "dataset", "holdout"]),
    ({"victim__dataset": "fashion"}, ["victim.dataset", "fashion-mnist", "cifar10"]),
    ({"victim__arch": "resnet9"}, ["victim.arch", "resnet8", "resnet20"]),
    ({"victim__holdout": -1}, ["victim.holdout", ">= 0"]),
    ({"fp32__epochs": 0}, ["fp32.epochs", ">= 1"]),
    ({"qat__lr": -0.1}, ["qat.lr", "(0, inf)"]),
    ({"divqat__alphas": [1.0, -1.0]}, ["divqat.alphas[1]", "(0, inf)"]),
    ({"divqat__divergence": "kld"}, ["divqat.divergence", "kl", "tail-kl", "js"]),
    ({"divqat__ramp": 2}, ["divqat.ramp", "[0, 1]"]),
    ({"seeds": [0, 0]}, ["seeds", "each seed once"]),
    ({"defenses__1__name": "dpc"}, ["defenses[1].name", "dcp", "reverse-sigmoid"]),
    ({"defenses__1__params": {"betta": 0.5}}, ["defenses[1].params", "betta", "beta=0.5"]),
    ({"defenses__1__params": {"beta": [0.5, -1]}}, ["defenses[1].params", "beta", "-1"]),
    ({"defenses__1__colour": 1}, ["defenses[1].colour: unknown key", "params"]),
    ({"defenses__1__victims": ["qta"]}, ["defenses[1].victims[0]", "qta", "divqat", "qat"]),
    ({"attacks": [{"name": "recovery", "params": {"defense": "dpc"}, "transfer": "holdout", "budgets": [40]}]},
     ["attacks[0].params", "recovery.defense", "dpc", "dcp"]),
    ({"defenses": [{"name": "none", "victims": ["qat"]}]}, ["defenses[0].victims", "behind none"]),
    ({"attacks__0__name": "knockof"}, ["attacks[0].name", "knockoff", "dfme"]),
    ({"attacks__0__budgets": [40, 0]}, ["attacks[0].budgets[1]", ">= 1"]),
    ({"attacks__0__budgets": []}, ["attacks[0].budgets", "at least one"]),
    ({"attacks__0__labels_only": ["yes"]}, ["attacks[0].labels_only[0]", "true or false"]),
    ({"attacks__0__transfer": "no-such-set"}, ["attacks[0].transfer[0]", "mnist", "fashion-mnist"]),
    ({"attacks__0__params": {"batchsize": 3}}, ["attacks[0].params", "batchsize", "batch_size"]),
    # Values are checked too, for model-backed defenses without building their model.
    ({"defenses": ["none", {"name": "mad", "params": {"eps": 5}}]}, ["defenses[1].params", "mad.eps", "[0, 2]"]),
    ({"defenses": ["none", {"name": "adaptive-misinformation", "params": {"tau": -2}}]},
     ["defenses[1].params", "adaptive-misinformation.tau", "[0, inf)"]),
    ({"defenses": ["none", {"name": "mad", "params": {"surrogate": "x"}}]},
     ["defenses[1].params", "built from the victim"]),
    ({"attacks__0__params": {"batch_size": 2.5}}, ["attacks[0].params", "batch_size", "integer"]),
    ({"attacks__0__surrogate": {"arch": "vgg"}}, ["attacks[0].surrogate.arch", "resnet8"]),
    ({"attacks__0__surrogate": {"epochs": 0}}, ["attacks[0].surrogate.epochs", ">= 1"]),
    ({"attacks__0__defenses": ["dcp", "mad"]}, ["attacks[0].defenses[1]", "none", "dcp"]),
])
def test_config_errors_name_the_key_and_the_allowed_values(changes, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(tiny(**changes))
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, (text, message)


def test_holdout_transfer_needs_a_holdout_and_data_free_attacks_take_none():
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.transfer\[0\].*victim\.holdout"):
        parse_config(tiny(victim__holdout=0))
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.transfer: attack 'dfme' is data-free"):
        parse_config(tiny(attacks=[{"name": "dfme", "transfer": "holdout", "budgets": [10]}]))
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.transfer: required"):
        parse_config(tiny(attacks=[{"name": "knockoff", "budgets": [10]}]))


def test_config_defaults_grid_and_none_always_included(tmp_path):
    config = parse_config(tiny(defenses=[{"name": "dcp", "params": {"beta": [0.3, 0.5], "gamma": 0.2}}]))
    assert [d.name for d in config.defenses] == ["none", "dcp"]
    assert config.defenses[1].grid() == [{"beta": 0.3, "gamma": 0.2}, {"beta": 0.5, "gamma": 0.2}]
    assert config.divqat.objective.divergence == "kl" and config.divqat.objective.cap == 0.15  # RECOMMENDED's
    assert parse_config(tiny(divqat__divergence="js")).divqat.objective.cap is None  # the cap belongs to kl
    # As `divqat train`: a divergence given without a cap runs uncapped (the paper's plain KL).
    assert parse_config(tiny(divqat__divergence="kl")).divqat.objective.cap is None
    assert parse_config(tiny(divqat__divergence="kl", divqat__cap=0.3)).divqat.objective.cap == 0.3
    assert config.attacks[0].transfer == ("holdout",) and config.attacks[0].budgets == (40, 80)
    path = tmp_path / "bad.yaml"
    path.write_text("victim:\n  dataset: [oops\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_config(path)


def test_presets_are_valid_and_the_smoke_preset_is_tiny():
    assert {"smoke", "default", "paper-cifar10"} <= set(preset_names())
    for name in preset_names():
        load_preset(name)
    smoke = load_preset("smoke")
    assert smoke.victim.limit and max(smoke.attacks[0].budgets) <= 100
    assert smoke.attacks[0].labels_only == (False, True)
    paper = load_preset("paper-cifar10")
    assert paper.victim.dataset == "cifar10" and paper.attacks[0].transfer == ("cifar100:train",)
    assert paper.attacks[0].surrogate.arch == "resnet32" and 50000 in paper.attacks[0].budgets


# ---------------------------------------------------------------- stage keys

def _keys(config: dict) -> dict[str, str]:
    return {s.label: s.key for s in plan_stages(parse_config(config))}


def test_stage_keys_change_exactly_when_their_inputs_change():
    base = _keys(tiny(divqat__alphas=[0.5, 2.0]))
    assert len(base) == len(set(base.values())) == 1 + 3 + 6 + 12 + 1
    assert _keys(tiny(divqat__alphas=[0.5, 2.0])) == base  # deterministic

    moved = _keys(tiny(divqat__alphas=[0.5, 3.0]))
    changed = {label for label, key in base.items() if key not in moved.values()}
    # Exactly the alpha-2 victim and everything downstream of it (the timing stage reads it).
    assert changed == {label for label in base if "divqat a=2 " in label + " "
                       or label.startswith("timing")}
    assert len(changed) == 1 + 2 + 4 + 1

    beta = _keys(tiny(defenses=["none", {"name": "dcp", "params": {"beta": 0.6}}]))
    changed = {label for label, key in _keys(tiny()).items() if key not in beta.values()}
    # 2 defenses + their 4 attacks, and the timing stage that serves every defense
    assert changed and all("dcp" in label or label.startswith("timing") for label in changed)
    assert len(changed) == 2 + 4 + 1

    epochs = _keys(tiny(attacks__0__surrogate={"epochs": 3, "batch_size": 32}))
    changed = {label for label, key in _keys(tiny()).items() if key not in epochs.values()}
    assert changed == {label for label in _keys(tiny()) if label.startswith("attack")}

    seeded = _keys(tiny(seeds=[1]))
    assert not set(seeded.values()) & set(_keys(tiny()).values())  # the seed enters every key

    # min_steps 0 is the recipe as it was before the option existed: the same keys, so stages
    # cached then stay valid; any other value re-runs exactly the attacks.
    surrogate = {"epochs": 1, "batch_size": 32}
    assert _keys(tiny(attacks__0__surrogate={**surrogate, "min_steps": 0})) == _keys(
        tiny(attacks__0__surrogate=surrogate))
    floor = _keys(tiny(attacks__0__surrogate={**surrogate, "min_steps": 50}))
    changed = {label for label, key in _keys(tiny(attacks__0__surrogate=surrogate)).items()
               if key not in floor.values()}
    assert changed == {label for label in _keys(tiny()) if label.startswith("attack")}
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.surrogate\.min_steps"):
        parse_config(tiny(attacks__0__surrogate={"min_steps": -1}))


def test_shared_teacher_is_planned_once():
    stages = plan_stages(parse_config(tiny(seeds=[0, 1], fp32={"epochs": 3, "seed": 7})))
    teachers = [s for s in stages if s.kind == "fp32"]
    assert len(teachers) == 1 and teachers[0].seed == 7
    assert {s.inputs[0] for s in stages if s.kind == "victim"} == {teachers[0].key}


def test_label_only_thief_behind_dcp_reads_its_twin_behind_none():
    stages = plan_stages(parse_config(tiny(defenses=[{"name": "dcp", "params": {"beta": 0.5}},
                                                     "random-noise", "none"])))
    by_key = {s.key: s for s in stages}
    attacks = [s for s in stages if s.kind == "attack"]
    for s in attacks:
        defense = by_key[s.inputs[1]].spec["name"]
        if s.spec["labels_only"] and defense == "dcp":  # a deterministic formula of each posterior
            twin = by_key[s.inputs[-1]]
            assert len(s.inputs) == 3 and s.spec["labels_as_behind"] == "none"
            assert twin.kind == "attack" and twin.spec["labels_only"] and twin.inputs[0] == s.inputs[0]
            assert by_key[twin.inputs[1]].spec["name"] == "none"
            assert stages.index(twin) < stages.index(s)  # a serial run meets the twin first
        else:  # soft thieves, the random defense and the twins themselves train their own
            assert len(s.inputs) == 2 and "labels_as_behind" not in s.spec
    # A watched thief's alarms are its own: no twin when detectors watch.
    watched = plan_stages(parse_config(tiny(detectors=["prada"])))
    assert all("labels_as_behind" not in s.spec for s in watched if s.kind == "attack")


def test_stage_key_is_canonical_json():
    assert stage_key("x", {"a": 1, "b": [1, 2]}) == stage_key("x", {"b": [1, 2], "a": 1})
    assert stage_key("x", {"a": 1}) != stage_key("x", {"a": 1}, ["input"])
    assert stage_key("x", {"a": 1}) != stage_key("y", {"a": 1})


def test_cache_treats_a_folder_without_done_json_as_unfinished(tmp_path):
    cache = StageCache(tmp_path)
    folder = cache.start("victim", "ab" * 32)
    (folder / "partial.bin").write_bytes(b"x")
    assert cache.load("victim", "ab" * 32, {}) is None
    record = cache.finish("victim", "ab" * 32, label="v", spec={}, input_tokens={}, result={"a": 1},
                          seconds=1.0)
    assert cache.load("victim", "ab" * 32, {}) == record
    # A stage whose input was recomputed since (another token) is stale.
    assert cache.load("victim", "ab" * 32, {"input": "other"}) is None
    assert cache.start("victim", "ab" * 32) == folder and not any(folder.iterdir())


# ---------------------------------------------------------------- a tiny pipeline, end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the tiny config three times: interrupted at the third attack stage, resumed, rerun.
    Records the calls to train_victim / attack_loaded / load_victim of each run."""
    out = tmp_path_factory.mktemp("experiment") / "tiny"
    config = parse_config(TINY_CONFIG)
    calls: Counter = Counter()
    interrupt_at = {"attack": 3}
    real = {name: getattr(stages_module, name) for name in ("train_victim", "attack_loaded", "load_victim")}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if interrupt_at.get(name.split("_")[0]) == calls[name]:
                raise KeyboardInterrupt
            return real[name](*args, **kwargs)
        return wrapper

    runs = []
    with pytest.MonkeyPatch.context() as mp:
        for name in real:
            mp.setattr(stages_module, name, counting(name))
        lines: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, out, progress=False, say=lines.append)
        unfinished = [p for p in (out / "stages" / "attack").iterdir() if not (p / DONE).exists()]
        runs.append({"calls": dict(calls), "lines": lines, "unfinished": unfinished})
        interrupt_at.clear()
        for _ in range(2):
            calls.clear()
            lines = []
            start = time.perf_counter()
            results = run_experiment(config, out, progress=False, say=lines.append)
            runs.append({"calls": dict(calls), "lines": lines, "results": results,
                         "seconds": time.perf_counter() - start})
    return {"out": out, "runs": runs}


def test_interrupted_run_keeps_finished_stages_and_resumes(tiny_run):
    first, resumed, again = tiny_run["runs"]
    assert first["calls"]["train_victim"] == 3  # fp32, qat, divqat
    assert first["calls"]["attack_loaded"] == 3  # the third was interrupted
    assert "run the same command again to resume" in first["lines"][-1]
    assert len(first["unfinished"]) == 1  # its folder, without done.json

    # Nothing finished is recomputed: no victim retrained; the qat victim's 2 defenses and its
    # first 2 attacks were done, the rest (divqat's 2 defenses, 6 attacks) runs now.
    assert resumed["calls"].get("train_victim", 0) == 0
    assert resumed["calls"]["attack_loaded"] == N_ATTACKS - 2
    assert resumed["calls"]["load_victim"] == 2  # each victim loaded once, for all its stages
    cached = 3 + 2 + 2
    assert sum(line.endswith("... cached") for line in resumed["lines"]) == cached
    assert resumed["results"]["stages"] == {"total": N_STAGES, "ran": N_STAGES - cached,
                                            "cached": cached, "skipped": 0, "failed": 0}

    # A third run finds everything done: no training, no attack, no victim even loaded.
    assert again["calls"] == {}
    assert sum(line.endswith("... cached") for line in again["lines"]) == N_STAGES
    assert again["results"]["attacks"] == resumed["results"]["attacks"]
    assert all(line.startswith("[") for line in again["lines"])
    assert any("attack knockoff soft holdout | divqat a=2 | dcp beta=0.5 | seed 0" in line
               for line in again["lines"])


def test_results_csv_has_one_row_per_victim_defense_attack_budget(tiny_run):
    out = tiny_run["out"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_ATTACKS * 2
    required = {"victim_mode", "alpha", "defense", "defense_params", "attack", "transfer_set",
                "labels_only", "budget", "seed", "victim_accuracy", "defender_accuracy",
                "defender_error", "adversary_accuracy", "adversary_error", "agreement",
                "disagreement", "agreement_clean", "l1_distance", "kl_divergence",
                "ms_per_query_clean", "ms_per_query_defended", "queries_used", "kl_to_teacher"}
    assert required <= set(rows[0])
    keys = {(r["victim_mode"], r["defense"], r["labels_only"], r["budget"]) for r in rows}
    assert len(keys) == len(rows)
    for r in rows:
        assert int(r["queries_used"]) == int(r["budget"])
        assert abs(float(r["disagreement"]) + float(r["agreement"]) - 1) < 1e-9
        assert 0 <= float(r["adversary_accuracy"]) <= 1
        assert r["defense_params"] == ("beta=0.5" if r["defense"] == "dcp" else "")
        assert float(r["alpha"]) == (2.0 if r["victim_mode"] == "divqat" else 0.0)
    results = json.loads((out / "results.json").read_text())
    assert {v["victim"] for v in results["victims"]} == {"fp32 teacher", "qat", "divqat a=2"}
    assert len(results["defenses"]) == 4


def test_report_and_plots_of_the_run(tiny_run):
    out = tiny_run["out"]
    report = (out / "report.md").read_text()
    for text in ("## Victims", "## Defenses", "knockoff, transfer set holdout", "Δ divqat a=2 − qat",
                 "adversary error % (soft)", "adversary error % (label-only)",
                 "adversary error % (strongest thief)", "disagreement %", "ms/query", "40 queries"):
        assert text in report, text
    for name in ("error_vs_alpha", "kl_vs_alpha", "tradeoff", "budget"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}.png" in report
    assert (out / "config.yaml").is_file()
    assert parse_config(yaml.safe_load((out / "config.yaml").read_text())) == parse_config(TINY_CONFIG)


def test_report_rebuilds_from_stored_results_with_seeds(tiny_run, tmp_path, capsys):
    results = load_results(tiny_run["out"])
    # Three seeds, as a stored file would have them: the thief does clearly worse against divqat
    # (its error 30-32 points higher, seed by seed), so the paired interval excludes 0.
    for table in ("victims", "defenses", "attacks", "timings"):
        rows = []
        for seed in (0, 1, 2):
            for row in copy.deepcopy(results[table]):
                row["seed"] = seed
                if table == "attacks" and row["victim_mode"] == "divqat":
                    row["adversary_error"] = row["adversary_error"] + 0.30 + 0.01 * seed
                    row["adversary_accuracy"] = 1 - row["adversary_error"]
                rows.append(row)
        results[table] = rows
    results["config"]["seeds"] = [0, 1, 2]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path)]) == 0
    assert "report.md" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "seeds 0, 1, 2" in report and " ± " in report
    assert "(divqat worse for the thief)" in report and "within noise" in report
    assert "95 % confidence interval" in report and "(n=1, no interval)" not in report
    assert (tmp_path / "plots" / "budget.png").is_file()
    # The summary of where DivQAT pays: the strongest thief's loss, paired by seed, per defense.
    pays = report.split("## Where DivQAT pays")[1].split("\n## ")[0]
    row = next(line for line in pays.splitlines() if line.startswith("| divqat a=2 | none |"))
    assert row.count("(divqat worse for the thief)") == 1  # the one attack setting's column

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_run_cli_on_a_finished_config_prints_the_main_table(tiny_run, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    assert main(["run", str(path), "--out", str(tiny_run["out"]), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "... cached" in out and "... running" not in out
    assert "| defense | victim | defender error %" in out
    assert f"report: {tiny_run['out'] / 'report.md'}" in out


# ---------------------------------------------------------------- report pieces, CLI errors

def test_delta_cell_gives_the_paired_interval_and_says_within_noise():
    assert delta_cell([0.021], "adversary_error", 100) == "+2.1 (n=1, no interval)"
    assert delta_cell([0.02, 0.025, 0.03], "defender_error", 100) == "+2.5 [+1.3, +3.7] (divqat less accurate)"
    assert delta_cell([-0.02, -0.025, -0.03], "adversary_error", 100) == (
        "-2.5 [-3.7, -1.3] (divqat better for the thief)")
    # Two seeds: t(0.975, 1) = 12.7, so a spread of 1.4 points gives a wide interval.
    assert delta_cell([0.01, 0.03], "defender_error", 100) == "+2.0 [-10.7, +14.7] within noise"
    assert delta_cell([], "adversary_error") == "–"
    # A timing difference is a measurement, never worded as a property of the method.
    assert delta_cell([0.010, 0.011, 0.012], "ms_per_query_defended", 1, 3) == "+0.011 [+0.009, +0.013]"
    assert "within noise" in delta_cell([0.001, 0.002, 0.003, -0.004], "ms_per_query_clean", 1, 3)


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    from scipy import stats as scipy_stats

    from divqat.experiment.stats import paired_difference

    divqat, qat = [0.81, 0.79, 0.84, 0.80, 0.83], [0.78, 0.79, 0.80, 0.77, 0.79]
    d = paired_difference(a - b for a, b in zip(divqat, qat, strict=True))
    diffs = [a - b for a, b in zip(divqat, qat, strict=True)]
    low, high = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 5,
                                       scale=scipy_stats.sem(diffs))
    assert d.n == 5 and abs(d.low - low) < 1e-12 and abs(d.high - high) < 1e-12
    assert not d.within_noise and d.low > 0
    one = paired_difference([0.3, None, float("nan")])
    assert one.n == 1 and not one.has_interval and not one.within_noise
    assert paired_difference([]) is None


def test_strongest_thief_of_soft_and_label_only_is_the_better_of_the_two():
    base = {"victim": "qat", "defense_label": "none", "attack": "knockoff", "attack_params": "",
            "transfer": "holdout", "budget": 100, "seed": 0}
    rows = [{**base, "thief": "soft", "adversary_accuracy": 0.6},
            {**base, "thief": "label-only", "adversary_accuracy": 0.7}]
    strongest = [r for r in with_strongest(rows) if r["thief"] == "strongest"]
    assert len(strongest) == 1 and strongest[0]["adversary_accuracy"] == 0.7
    assert strongest[0]["strongest_pick"] == "knockoff label-only"
    assert not [r for r in with_strongest(rows[:1]) if r["thief"] == "strongest"]


def test_paper_preset_without_data_fails_within_seconds_naming_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIVQAT_DATA", raising=False)
    missing = tmp_path / "no-cifar-here"
    start = time.perf_counter()
    code = main(["run", "--preset", "paper-cifar10", "--data-root", str(missing),
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert time.perf_counter() - start < 20
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "cifar-10-batches-py" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing was started


def test_run_cli_needs_a_config_or_a_preset(capsys):
    assert main(["run"]) == 2
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--preset", "nope"])


def test_plots_single_budget_ticks_and_tradeoff_legend(tiny_run, tmp_path, monkeypatch):
    from divqat.experiment import plots

    results = load_results(tiny_run["out"])
    # A data-free attack with one budget, against no defense only, as the default preset's dfme.
    results["attacks"] += [{**row, "attack": "dfme", "transfer": "", "transfer_set": "", "budget": 1000}
                           for row in results["attacks"] if row["defense"] == "none"
                           and row["thief"] == "soft" and row["budget"] == 80]
    figures = {}
    real_save = plots._save

    def keeping(fig, path):
        figures[path.stem] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keeping)
    drawn = plots.make_plots(results, tmp_path)
    assert {p.name for p in drawn} == {"error_vs_alpha.png", "kl_vs_alpha.png", "tradeoff.png", "budget.png"}

    def ticks(ax, minor=False):
        return [t.get_text() for t in ax.get_xticklabels(minor=minor) if t.get_text()]

    budget = figures["budget"].axes
    shown = [ax for ax in budget if ax.axison]
    assert [ticks(ax) for ax in shown if "dfme" in ax.get_title()] == [["1k"]]
    assert all(ticks(ax) == ["40", "80"] for ax in shown if "knockoff" in ax.get_title())
    assert not any(ticks(ax, minor=True) for ax in shown)
    assert all(ax.get_legend() is None for ax in budget) and figures["budget"].legends
    # No per-point text on the trade-off plot: a figure legend says which victim and defense.
    tradeoff = figures["tradeoff"]
    assert not any(ax.texts for ax in tradeoff.axes) and tradeoff.legends
    labels = [t.get_text() for t in tradeoff.legends[0].get_texts()]
    assert {"qat", "divqat a=2", "defense: none", "defense: dcp beta=0.5"} <= set(labels)
    assert plots.budget_text(500) == "500" and plots.budget_text(2500) == "2.5k"
    assert plots.budget_text(10000) == "10k"


# ---------------------------------------------------------------- a failing stage

def test_a_failing_stage_is_named_the_others_finish_and_a_rerun_runs_only_it(tiny_run, tmp_path,
                                                                              monkeypatch, capsys):
    """A transfer set that cannot be loaded at attack time (a folder gone, a node without it):
    the attacks that need it fail with the error named, every other stage finishes (here: is
    cached), the run exits 1, and the next run runs only the failed stages."""
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(tiny_run["out"], out)
    config = tiny(attacks=[*TINY_CONFIG["attacks"],
                           {"name": "knockoff", "transfer": "mnist", "labels_only": [False],
                            "budgets": [40], "defenses": ["none"],
                            "surrogate": {"epochs": 1, "batch_size": 32}}])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    real = stages_module.load_transfer_set

    def unreadable(spec, meta, data_root=None, limit=None):
        if spec.startswith("mnist"):
            raise DatasetError(f"cannot read {spec}: the folder is gone")
        return real(spec, meta, data_root, limit)

    monkeypatch.setattr(stages_module, "load_transfer_set", unreadable)
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if "... failed" in line]
    assert len(failed) == 2 and all("attack knockoff soft mnist:train" in line for line in failed)
    assert all("DatasetError: cannot read mnist:train: the folder is gone" in line for line in failed)
    assert "2 failed" in captured.out and "run the same command again" in captured.err
    assert "attack knockoff soft mnist:train | qat | none | seed 0: DatasetError" in captured.err
    results = load_results(out)
    assert results["stages"]["failed"] == 2 and results["stages"]["cached"] == N_STAGES
    assert len(results["attacks"]) == N_ATTACKS * 2  # every other attack is in the results
    assert "## Failed stages" in (out / "report.md").read_text()
    folder = next(p for p in (out / "stages" / "attack").iterdir() if (p / "error.txt").exists())
    assert "DatasetError" in (folder / "error.txt").read_text() and not (folder / DONE).exists()

    monkeypatch.setattr(stages_module, "load_transfer_set", real)  # the folder is back
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ran = [line for line in lines if line.endswith("... running")]
    assert len(ran) == 2 and all("mnist:train" in line for line in ran)
    assert sum(line.endswith("... cached") for line in lines) == N_STAGES
    assert len(load_results(out)["attacks"]) == N_ATTACKS * 2 + 2


def test_a_failed_victim_skips_what_needs_it_and_the_timing_keeps_the_others(tiny_run, tmp_path,
                                                                             monkeypatch):
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(tiny_run["out"], out)
    config = parse_config(TINY_CONFIG)
    divqat = next(s for s in plan_stages(config) if s.label.startswith("victim divqat"))
    (StageCache(out).folder("victim", divqat.key) / DONE).unlink()  # it has to run again...
    real = stages_module.train_victim

    def full_disk(req):
        if req.mode == "divqat":
            raise OSError(28, "No space left on device")
        return real(req)

    monkeypatch.setattr(stages_module, "train_victim", full_disk)  # ... and fails
    lines: list[str] = []
    results = run_experiment(config, out, progress=False, say=lines.append)
    assert results["stages"] == {"total": N_STAGES, "ran": 1, "cached": 1 + 1 + 2 + 4,
                                 "skipped": 2 + 4, "failed": 1}
    assert [f["stage"] for f in results["failures"]] == ["victim divqat a=2 | seed 0"]
    assert "OSError: [Errno 28] No space left on device" in results["failures"][0]["error"]
    skipped = [line for line in lines if "... skipped" in line]
    assert len(skipped) == 6 and all("victim divqat a=2 | seed 0 failed" in line for line in skipped)
    # The timing stage ran again with the victims that are there (its inputs changed).
    assert {r["victim"] for r in results["timings"]} == {"qat"}
    assert {r["victim"] for r in results["attacks"]} == {"qat"}


def test_a_defense_that_serves_only_some_victims(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(tiny_run["out"], out)
    raw = tiny(defenses=[*TINY_CONFIG["defenses"], {"name": "rounding", "params": {"decimals": 1},
                                                   "victims": ["qat"]}])
    config = parse_config(raw)
    assert parse_config(config_dict(config)) == config  # the resolved config reads back the same
    stages = plan_stages(config)
    behind = Counter((s.label.split(" | ")[1], s.label.split(" | ")[2].split()[0])
                     for s in stages if s.kind == "attack")
    assert behind[("qat", "rounding")] == 2 and ("divqat a=2", "rounding") not in behind
    assert behind[("divqat a=2", "dcp")] == 2
    # The other stages keep their keys: only rounding's defense, its 2 thieves and the timing run.
    assert len({s.key for s in stages} - {s.key for s in plan_stages(parse_config(TINY_CONFIG))}) == 4
    results = run_experiment(config, out, progress=False, say=lambda line: None)
    assert results["stages"]["ran"] == 4 and not results["failures"]
    assert {(r["victim"], r["defense_label"]) for r in results["timings"]} == {
        ("qat", "none"), ("qat", "dcp beta=0.5"), ("qat", "rounding decimals=1"),
        ("divqat a=2", "none"), ("divqat a=2", "dcp beta=0.5")}
    assert {r["victim"] for r in results["defenses"] if r["defense"] == "rounding"} == {"qat"}
    assert "rounding" in (out / "report.md").read_text()


# ---------------------------------------------------------------- presets, grids, the plan

def test_default_preset_has_five_seeds_and_the_paper_fmnist_preset_every_method():
    from divqat.attacks import ATTACKS
    from divqat.defenses import DEFENSES

    default = load_preset("default")
    assert default.seeds == (0, 1, 2, 3, 4)
    assert default.fp32.precision == default.qat.precision == default.divqat.precision == "bf16"
    assert all(v.precision == "bf16" for v in default.divqat.variants)
    assert default.attacks[0].surrogate.eval_precision == "bf16"
    stages = plan_stages(default)
    assert sum(s.kind == "timing" for s in stages) == 5 and len(stages) == 310
    paper = load_preset("paper-fmnist")
    assert len(paper.seeds) == 5 and paper.fp32.epochs == 15
    assert len(paper.divqat.alphas) > 1 and len(paper.divqat.caps) > 1
    assert {d.name for d in paper.defenses} == set(DEFENSES.names())
    assert {a.name for a in paper.attacks} == set(ATTACKS.names())
    labels = [s.label for s in plan_stages(paper) if s.kind == "victim"]
    assert "victim divqat a=2 cap=0.15 | seed 0" in labels


def test_cap_grid_and_precision_keep_the_keys_of_configs_without_them():
    base = _keys(tiny())
    assert _keys(tiny(divqat__cap=0.15)) == base  # the recommended cap, written out
    assert _keys(tiny(fp32={"epochs": 3, "precision": "fp32"}, qat={"epochs": 1, "precision": "fp32"},
                      divqat__precision="fp32",
                      attacks__0__surrogate={"epochs": 2, "batch_size": 32, "precision": "fp32",
                                             "eval_precision": "fp32"})) == base
    grid = _keys(tiny(divqat__cap=[0.15, 0.3]))
    assert "victim divqat a=2 cap=0.15 | seed 0" in grid and "victim divqat a=2 cap=0.3 | seed 0" in grid
    # The cap-0.15 victim is the one the single-cap config trains (only its label names the cap).
    assert grid["victim divqat a=2 cap=0.15 | seed 0"] == base["victim divqat a=2 | seed 0"]
    bf16 = _keys(tiny(attacks__0__surrogate={"epochs": 2, "batch_size": 32, "precision": "bf16"}))
    changed = {label for label, key in base.items() if key not in bf16.values()}
    assert changed == {label for label in base if label.startswith("attack")}
    # Measuring the surrogates in bf16 is a new stage too (other numbers, however close).
    evaluated = _keys(tiny(attacks__0__surrogate={"epochs": 2, "batch_size": 32, "eval_precision": "bf16"}))
    assert {label for label, key in base.items() if key not in evaluated.values()} == changed
    teacher = _keys(tiny(fp32={"epochs": 3, "precision": "bf16"}))
    assert teacher["fp32 teacher | seed 0"] != base["fp32 teacher | seed 0"]
    # bf16 fine-tuning: the QAT victim (and what reads it) only; a divqat section's precision
    # reaches its variants.
    qat = _keys(tiny(qat={"epochs": 1, "precision": "bf16"}))
    assert {label.split(" | ")[0] for label, key in base.items() if key not in qat.values()
            and not label.startswith(("attack", "defense", "timing"))} == {"victim qat"}
    config = parse_config(tiny(divqat__precision="bf16",
                               divqat__variants=[{"name": "divqat-out", "divergence_on": "out"}]))
    assert config.divqat.precision == "bf16" and config.divqat.variants[0].precision == "bf16"
    assert {s.spec.get("precision") for s in plan_stages(config) if s.kind == "victim"} == {None, "bf16"}
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_dict(config)))) == config
    with pytest.raises(ConfigError, match=r"fp32\.precision"):
        parse_config(tiny(fp32={"epochs": 3, "precision": "fp16"}))
    with pytest.raises(ConfigError, match=r"qat\.precision"):
        parse_config(tiny(qat={"epochs": 1, "precision": "fp16"}))
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.surrogate\.eval_precision"):
        parse_config(tiny(attacks__0__surrogate={"eval_precision": "int8"}))
    with pytest.raises(ConfigError, match=r"divqat\.cap"):
        parse_config(tiny(divqat__cap=[0.15, -1]))
    config = parse_config(tiny(divqat__cap=[0.15, 0.3]))
    assert parse_config(yaml.safe_load(yaml.safe_dump(config_dict(config)))) == config


def test_plan_lists_the_stages_what_is_cached_and_the_time_left(tiny_run, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(seeds=[0, 1])))
    assert main(["run", str(path), "--out", str(tiny_run["out"]), "--plan", "--cores", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"plan: tiny ({path}) -> {tiny_run['out']}: {2 * N_STAGES} stages, "
                               f"{N_STAGES} cached, {N_STAGES} to run")
    assert sum(line.endswith("... cached") for line in lines) == N_STAGES
    assert sum("... to run, ~" in line for line in lines) == N_STAGES
    assert f"rates from {N_STAGES} finished stages in {tiny_run['out']}" in out
    # Every stage with the config's numerics.threads (1), whichever the executor.
    assert "one stage at a time with 1 thread (--executor serial)" in out
    assert "with 4 stages at a time, 1 thread each (--executor ray on 4 cores)" in out
    assert not list((tiny_run["out"] / "stages").glob("*/*/error.txt"))  # nothing ran


def test_a_bf16_stage_never_measured_takes_its_fp32_rate_over_the_measured_speedup(tiny_run):
    from divqat.experiment.estimate import BF16_SPEEDUP, category_rate, plan_lines

    fitted = {"fp32": (2e-3, 3), "victim qat bf16": (1e-3, 3)}
    assert category_rate("fp32", fitted) == (2e-3, "measured")
    assert category_rate("fp32 bf16", fitted) == (pytest.approx(2e-3 / BF16_SPEEDUP["fp32"]), "derived")
    assert category_rate("victim qat bf16", fitted) == (1e-3, "measured")
    assert category_rate("victim divqat bf16", fitted)[1] == "default"  # no fp32 rate measured
    # --plan says which rates came from where.
    lines = plan_lines(parse_config(tiny(fp32={"epochs": 3, "precision": "bf16"})),
                       tiny_run["out"] / "elsewhere", cores=1, times_from=[tiny_run["out"]])
    assert "from the fp32 rates and the measured bf16 speedups for fp32 bf16" in "\n".join(lines)


def test_wall_time_replays_the_plan_on_workers():
    from divqat.experiment.estimate import wall_time
    from divqat.experiment.runner import Stage

    def stage(key, *inputs):
        return Stage("x", key, key, {}, tuple(inputs), 0)

    plan = [stage("t"), stage("a", "t"), stage("b", "t"), stage("c", "a"), stage("d", "b")]
    seconds = {"t": 10, "a": 5, "b": 5, "c": 5, "d": 5}
    assert wall_time(plan, seconds, 1) == 30
    assert wall_time(plan, seconds, 2) == 20
    assert wall_time(plan, {**seconds, "t": 0}, 8) == 10  # a cached teacher takes no time


# ---------------------------------------------------------------- numerics and progress

def test_a_cached_stage_computed_under_other_numerics_is_recomputed_and_says_why(tiny_run, tmp_path):
    """One attack stage's done.json says 2 torch threads: rerun with the default (1), it alone
    is run again, with a line saying why; a stage finished before the numerics were recorded
    (no ``numerics``, its worker's threads 1) is reused and the report says so."""
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(tiny_run["out"], out)
    config = parse_config(TINY_CONFIG)
    attack, other = [s for s in plan_stages(config) if s.kind == "attack"][-2:]
    path = StageCache(out).folder("attack", attack.key) / DONE
    record = json.loads(path.read_text())
    assert record["numerics"]["threads"] == 1 and record["worker"]["threads"] == 1
    record["numerics"]["threads"] = 2
    path.write_text(json.dumps(record))
    older = StageCache(out).folder("attack", other.key) / DONE
    record = json.loads(older.read_text())
    del record["numerics"]
    older.write_text(json.dumps(record))

    lines: list[str] = []
    results = run_experiment(config, out, progress=False, say=lines.append)
    assert results["stages"] == {"total": N_STAGES, "ran": 1, "cached": N_STAGES - 1, "skipped": 0,
                                 "failed": 0, "recomputed": 1}
    why = [line for line in lines if "recomputing" in line]
    assert len(why) == 1 and attack.label in why[0]
    assert "computed with 2 torch threads, this run computes with 1 (numerics.threads)" in why[0]
    assert results["numerics"]["not_recorded"] == 1
    report = (out / "report.md").read_text()
    assert "## Numerics" in report and "1 torch thread" in report
    assert "1 cached stage(s) finished before the numerics were recorded" in report

    # Asked for 2 threads, every stage was computed under others: the plan says none is cached.
    two = parse_config({**TINY_CONFIG, "numerics": {"threads": 2}})
    from divqat.experiment.runner import finished_records

    assert finished_records(plan_stages(two), StageCache(out), two.numerics) == {}
    assert len(finished_records(plan_stages(two), StageCache(out))) == N_STAGES  # keys unchanged


class _TwoSlots(SerialExecutor):
    """Runs its stages in this process but reports two slots, as a Ray pool does: the runner
    then prints its progress lines."""

    in_order = False

    @property
    def slots(self) -> int:
        return 2


def test_the_progress_line_of_a_resumed_run_counts_each_stage_once(tiny_run, tmp_path):
    import re
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(tiny_run["out"], out)
    config = parse_config(TINY_CONFIG)
    attacks = [s for s in plan_stages(config) if s.kind == "attack"]
    for stage in attacks[-3:]:
        (StageCache(out).folder("attack", stage.key) / DONE).unlink()
    lines: list[str] = []
    results = run_experiment(config, out, progress=False, say=lines.append, executor=_TwoSlots())
    assert results["stages"]["cached"] == N_STAGES - 3 and results["stages"]["ran"] == 3
    progress = [re.search(r"progress: (\d+)/(\d+) done, (\d+) running.*, (-?\d+) left", line)
                for line in lines if "progress:" in line]
    assert progress and all(p is not None for p in progress)
    counts = [tuple(int(g) for g in p.groups()) for p in progress]
    assert all(done <= total and left >= 0 and done + running + left == total
               for done, total, running, left in counts)
    assert counts[-1] == (N_STAGES, N_STAGES, 0, 0)


def test_the_add_a_stage_kind_example_plans_runs_and_reports_its_kind(tiny_run, tmp_path):
    """docs/examples/add_a_stage_kind.py: one file registers a kind; a finished run then runs only
    its stages (one per int8 victim), every other stage cached under its old key, and its rows
    come out in their own table."""
    import importlib.util
    import shutil
    from pathlib import Path

    from divqat.experiment.stages import STAGE_KINDS

    out = tmp_path / "tiny"
    shutil.copytree(tiny_run["out"], out)
    config = parse_config(TINY_CONFIG)
    before = [s.key for s in plan_stages(config)]
    path = Path(__file__).parent.parent / "docs" / "examples" / "add_a_stage_kind.py"
    spec = importlib.util.spec_from_file_location("add_a_stage_kind", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        stages = plan_stages(config)
        assert [s.key for s in stages if s.kind != "victim-size"] == before
        assert [s.label for s in stages if s.kind == "victim-size"] == [
            "victim-size | qat | seed 0", "victim-size | divqat a=2 | seed 0"]
        lines: list[str] = []
        results = run_experiment(config, out, progress=False, say=lines.append)
    finally:
        STAGE_KINDS.unregister("victim-size")
    assert results["stages"] == {"total": N_STAGES + 2, "ran": 2, "cached": N_STAGES, "skipped": 0,
                                 "failed": 0}
    sizes = results["victim_sizes"]
    assert [r["victim"] for r in sizes] == ["qat", "divqat a=2"]
    assert all(r["bytes"] > 10_000 and r["files"] >= 1 for r in sizes)
    assert any("victim-size | qat" in line for line in lines) and any("bytes in" in line for line in lines)
    assert "victim-size" not in STAGE_KINDS and len(plan_stages(config)) == N_STAGES


def test_the_numerics_section_says_which_stages_used_bf16_and_which_fell_back():
    from divqat.experiment.numerics import Numerics, lines, mismatch, summary, uses_bf16

    here = Numerics().record()
    bf16 = {"kind": "attack", "spec": {"surrogate": {"precision": "bf16"}}}
    used = {**bf16, "numerics": {**here, "bf16_native": True}}
    fell_back = {**bf16, "numerics": {**here, "bf16_native": False}}
    plain = {"kind": "victim", "spec": {"mode": "qat"}, "numerics": {**here, "bf16_native": False}}
    s = summary([used, used, plain], {**here, "bf16_native": True})
    assert (s["bf16_stages"], s["bf16_fell_back"], s["bf16_by_kind"]["used"]) == (2, 0, {"attack": 2})
    assert "2 stage(s) trained under bf16 autocast as configured (2 attack" in "\n".join(lines(s))
    s = summary([fell_back, plain], {**here, "bf16_native": False})
    assert "1 stage(s) (1 attack) asked for bf16 but the CPU had no native bf16" in "\n".join(lines(s))
    # A results.json from before the kinds were recorded: no empty parenthesis.
    old = {k: v for k, v in summary([used, plain], {**here, "bf16_native": True}).items() if k != "bf16_by_kind"}
    assert "1 stage(s) trained under bf16 autocast as configured (the rest in fp32)." in "\n".join(lines(old))
    # A bf16 stage from a CPU with native bf16 is not reused on one without (nor the reverse);
    # a stage that did not ask for bf16 does not care.
    assert "native bf16" in mismatch(used, {**here, "bf16_native": False})
    assert mismatch(plain, {**here, "bf16_native": True}) is None
    # Measuring the surrogates in bf16 (or fine-tuning a victim in bf16) asks for it too.
    evaluated = {"kind": "attack", "spec": {"surrogate": {"eval_precision": "bf16"}},
                 "numerics": {**here, "bf16_native": True}}
    assert "native bf16" in mismatch(evaluated, {**here, "bf16_native": False})
    assert uses_bf16({"kind": "victim", "spec": {"mode": "qat", "precision": "bf16"},
                      "numerics": {**here, "bf16_native": True}}) is True


def test_victim_weights_import_the_teacher_once_for_every_seed(tiny_run, tmp_path):
    """``victim.weights``: the fp32 stage imports the user's model (one teacher for every seed,
    the file's digest in its key) and the int8 victims fine-tune it; the other keys stay."""
    from divqat.victim import load_fp32_net

    teacher = next(s for s in plan_stages(parse_config(TINY_CONFIG)) if s.kind == "fp32")
    net, _ = load_fp32_net(StageCache(tiny_run["out"]).folder("fp32", teacher.key))
    torch.save(net.net.state_dict(), tmp_path / "mine.pt")
    raw = tiny(seeds=[0, 1], victim__weights=str(tmp_path / "mine.pt"), defenses=["none"], attacks=[])
    stages = plan_stages(parse_config(raw))
    fp32 = [s for s in stages if s.kind == "fp32"]
    assert len(fp32) == 1 and fp32[0].label == "fp32 teacher (imported)"
    assert len(fp32[0].spec["weights_sha256"]) == 64
    torch.save({k: v + 1 for k, v in net.net.state_dict().items()}, tmp_path / "mine.pt")
    assert plan_stages(parse_config(raw))[0].key != fp32[0].key  # other weights, another teacher
    torch.save(net.net.state_dict(), tmp_path / "mine.pt")
    results = run_experiment(parse_config(raw), tmp_path / "run", progress=False, say=lambda line: None)
    imported = next(r for r in results["victims"] if r["victim"] == "fp32 teacher")
    trained = next(r for r in tiny_run["runs"][-1]["results"]["victims"] if r["victim"] == "fp32 teacher")
    assert imported["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert {r["victim"] for r in results["victims"]} >= {"qat", "divqat a=2"}
    with pytest.raises(ConfigError, match="no weights file"):
        parse_config(tiny(victim__weights=str(tmp_path / "absent.pt")))
