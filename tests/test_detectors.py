"""Extraction detectors: the interface (state save/restore and batching give the same verdicts),
PRADA's statistic on streams with a known answer and against a plain re-implementation, the MMD
window test, calibration of thresholds, and the monitor inside the black box."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BarsVictim, make_bars
from scipy.stats import shapiro

from divqat.blackbox import BlackBox
from divqat.boundary import Blocked, BudgetExceeded
from divqat.detectors import (
    MMD,
    PRADA,
    Monitor,
    calibrated_threshold,
    check_detector,
    create_detector,
    describe_detectors,
    state_from_bytes,
    state_to_bytes,
)
from divqat.errors import ConfigError


def natural_stream(n: int, seed: int = 0, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """i.i.d. images of one distribution (uniform noise), with answers of random classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 12, 12, generator=g)
    answers = torch.softmax(3 * torch.randn(n, k, generator=g), dim=1)
    return images, answers


def synthetic_stream(n: int, seeds: int = 30, step: float = 0.05, seed: int = 0, k: int = 4):
    """What a Jacobian-augmenting thief sends: chains of sign steps of size ``step`` from a few
    seed images, each chain answered with one class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(seeds, 1, 12, 12, generator=g)
    images = []
    for _ in range(-(-n // seeds)):
        x = (x + step * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
        images.append(x.clone())
    classes = (torch.arange(seeds) % k).repeat(len(images))[:n]
    answers = torch.nn.functional.one_hot(classes, k).float() * 0.9 + 0.1 / k
    return torch.cat(images)[:n], answers


def feed(detector, images, answers, batch: int):
    verdicts = []
    for start in range(0, len(images), batch):
        verdicts.append(detector.observe(images[start:start + batch], answers[start:start + batch]))
    return verdicts


def toy_features(images: torch.Tensor) -> torch.Tensor:
    """A fixed 'feature extractor': 4x4 average pooling (16 features)."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)


def toy_mmd(**kwargs) -> MMD:
    reference = toy_features(natural_stream(300, seed=99)[0])
    return MMD(features=toy_features, reference=reference, **{"window": 64, "check_every": 16, **kwargs})


# ---------------------------------------------------------------------- registry

def test_registry_lists_the_detectors_with_their_defaults():
    rows = {name: (summary, params) for name, summary, params in describe_detectors()}
    assert {"prada", "mmd"} <= set(rows)
    assert rows["prada"][1] == {"delta": 0.9, "min_distances": 100, "check_every": 50, "max_set": None}
    assert rows["mmd"][1]["window"] == 256 and rows["mmd"][1]["threshold"] is None
    assert check_detector("prada", {"delta": 0.8}) is PRADA
    assert create_detector("prada", delta=0.8).delta == 0.8
    assert check_detector("mmd", {"window": 128}) is MMD
    with pytest.raises(ConfigError, match="prada.delta must be in"):
        check_detector("prada", {"delta": 1.5})
    with pytest.raises(ConfigError, match="has no parameter 'beta'"):
        check_detector("prada", {"beta": 1})
    with pytest.raises(ConfigError, match="reference is built from the victim"):
        check_detector("mmd", {"reference": 1})
    with pytest.raises(ConfigError, match="unknown detector 'seat'"):
        check_detector("seat", {})


# ---------------------------------------------------------------------- PRADA's statistic

def reference_prada(images: torch.Tensor, labels: torch.Tensor, min_distances: int, check_every: int):
    """PRADA as the paper writes it, one query at a time with plain loops (float64): the W of
    every test, by position."""
    sets: dict[int, list[np.ndarray]] = {}
    threshold: dict[int, float] = {}
    set_d: dict[int, list[float]] = {}
    distances: list[float] = []
    tests = {}
    for i, (x, c) in enumerate(zip(images.reshape(len(images), -1).double().numpy(), labels.tolist(),
                                   strict=True)):
        if c not in sets:
            sets[c], threshold[c], set_d[c] = [x], 0.0, []
        else:
            d = min(float(np.linalg.norm(x - y)) for y in sets[c])
            distances.append(d)
            if d > threshold[c]:
                sets[c].append(x)
                set_d[c].append(d)
                threshold[c] = max(threshold[c], float(np.mean(set_d[c]) - np.std(set_d[c])))
        if (i + 1) % check_every == 0 and len(distances) >= min_distances:
            d = np.array(distances)
            kept = d[np.abs(d - d.mean()) <= 3 * d.std()]
            tests[i + 1] = float(shapiro(kept).statistic)
    return tests


@pytest.mark.parametrize("stream", ["natural", "synthetic"])
def test_prada_matches_a_plain_implementation_of_the_paper(stream):
    images, answers = (natural_stream(400, seed=1) if stream == "natural"
                       else synthetic_stream(400, seed=1))
    expected = reference_prada(images, answers.argmax(1), min_distances=50, check_every=25)
    prada = PRADA(delta=0.9, min_distances=50, check_every=25)
    seen = {}
    for start in range(0, 400, 37):  # odd batches: sets grow inside a batch too
        before = prada.verdict().tests
        v = prada.observe(images[start:start + 37], answers[start:start + 37])
        if v.tests > before:
            seen[max(p for p in expected if p <= v.queries)] = v.score
    assert expected and set(seen) <= set(expected)
    for position, w in seen.items():
        assert w == pytest.approx(expected[position], abs=1e-5), position


def test_prada_passes_iid_queries_and_flags_perturbations_of_a_few_seeds():
    images, answers = natural_stream(1500, seed=2)
    natural = feed(PRADA(), images, answers, 128)[-1]
    assert natural.tests > 0 and natural.worst > 0.95 and not natural.flagged
    images, answers = synthetic_stream(1500, seed=2)
    synthetic = feed(PRADA(), images, answers, 128)[-1]
    assert synthetic.flagged and synthetic.worst < 0.85
    # The first test comes once 100 distances exist (4 classes: the 4 first queries have none);
    # positions are multiples of check_every.
    assert synthetic.first_alarm % 50 == 0 and 100 <= synthetic.first_alarm <= 300


def test_prada_max_set_bounds_the_memory():
    images, answers = natural_stream(600, seed=3)
    bounded = PRADA(max_set=20)
    feed(bounded, images, answers, 100)
    assert all(len(rows) <= 20 for rows in bounded.state_dict()["state"]["sets"])
    free = PRADA()
    feed(free, images, answers, 100)
    assert sum(len(rows) for rows in free.state_dict()["state"]["sets"]) > 60


# ---------------------------------------------------------------------- the interface

@pytest.mark.parametrize("make", [lambda: PRADA(min_distances=30, check_every=10),
                                  lambda: toy_mmd(threshold=0.05)], ids=["prada", "mmd"])
def test_state_save_restore_and_batching_give_the_same_verdicts(make):
    nat, nat_answers = natural_stream(300, seed=4)
    syn, syn_answers = synthetic_stream(300, seed=4)
    # The second half: dark Jacobian-style chains (PRADA reads the steps, MMD the darkness).
    images, answers = torch.cat([nat, 0.5 * syn]), torch.cat([nat_answers, syn_answers])

    whole = make()
    in_sevens = feed(whole, images, answers, 7)[-1]
    one_batch = make().observe(images, answers)
    # Verdicts do not depend on how the stream is cut (scores to float64 rounding).
    assert (one_batch.first_alarm, one_batch.tests, one_batch.alarm) == (
        in_sevens.first_alarm, in_sevens.tests, in_sevens.alarm)
    assert one_batch.worst == pytest.approx(in_sevens.worst, rel=1e-9)
    assert in_sevens.flagged and in_sevens.first_alarm > 300  # raised on the synthetic half

    first = make()
    first.observe(images[:333], answers[:333])
    saved = state_to_bytes(first.state_dict())
    restored = make()
    restored.load_state_dict(state_from_bytes(saved))
    assert restored.verdict() == first.verdict()
    assert restored.observe(images[333:], answers[333:]) == first.observe(images[333:], answers[333:])
    assert restored.verdict() == in_sevens

    restored.reset()
    assert restored.verdict().queries == 0 and not restored.verdict().flagged
    assert feed(restored, images, answers, 50)[-1] == in_sevens

    with pytest.raises(ConfigError, match="cannot be loaded"):
        (toy_mmd() if isinstance(first, PRADA) else PRADA()).load_state_dict(first.state_dict())


def test_mmd_scores_shifted_windows_above_benign_ones():
    mmd = toy_mmd()
    benign = feed(mmd, *natural_stream(256, seed=5), 64)[-1]
    assert benign.tests == (256 - 64) // 16 + 1 and benign.first_alarm is None
    shifted = toy_mmd()
    dark = natural_stream(256, seed=6)
    feed(shifted, dark[0] * 0.5, dark[1], 64)
    assert shifted.verdict().worst > 10 * benign.worst
    assert not shifted.verdict().flagged  # no threshold, no alarm
    with pytest.raises(RuntimeError, match="divqat calibrate"):
        MMD().observe(*natural_stream(4))


def test_calibrated_threshold_allows_the_target_share_of_benign_streams():
    worst = [0.1 * i for i in range(1, 21)]  # 20 streams
    t = calibrated_threshold(worst, 0.05, "above")
    assert sum(w > t for w in worst) == 1
    t = calibrated_threshold(worst, 0.0, "above")
    assert sum(w > t for w in worst) == 0
    w_scores = [0.9 + 0.004 * i for i in range(20)]
    t = calibrated_threshold(w_scores, 0.1, "below")
    assert sum(w < t for w in w_scores) == 2
    with pytest.raises(ConfigError):
        calibrated_threshold(worst, 1.0, "above")


# ---------------------------------------------------------------------- in the black box

def _bars_stream(n):
    images, _ = make_bars(n, seed=7)
    return torch.from_numpy(images).float() / 255


def synthetic_bars(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = _bars_stream(3)
    return (base[torch.randint(0, 3, (n,), generator=g)]
            + 0.002 * torch.randn(n, 1, 16, 16, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("on_alarm", ["flag", "block", "labels-only"])
def test_black_box_monitor_flags_blocks_or_answers_labels_only(on_alarm):
    victim = BarsVictim()
    monitor = Monitor(PRADA(min_distances=30, check_every=10), on_alarm=on_alarm)
    box = BlackBox(victim, budget=1000, monitor=monitor)
    assert "monitor" not in dir(box) and not hasattr(box, "_BlackBox__monitor")
    benign = box.query(_bars_stream(64))
    assert not monitor.flagged and benign.shape == (64, 4)
    queries = synthetic_bars(200)
    for start in range(0, 200, 20):
        if monitor.flagged:
            break
        box.query(queries[start:start + 20])
    assert monitor.flagged
    used = box.queries_used
    assert used == monitor.verdict.queries
    if on_alarm == "block":
        with pytest.raises(Blocked, match="prada"):
            box.query(queries[:5])
        assert box.queries_used == used  # nothing counted
    else:
        answer = box.query(queries[:5])
        assert box.queries_used == used + 5
        one_hot = ((answer == 0) | (answer == 1)).all() and (answer.sum(1) == 1).all()
        assert bool(one_hot) == (on_alarm == "labels-only")
    with pytest.raises(BudgetExceeded):  # the budget is checked as before
        BlackBox(BarsVictim(), budget=3, monitor=Monitor(PRADA())).query(_bars_stream(4))
    with pytest.raises(ConfigError, match="Monitor"):
        BlackBox(BarsVictim(), monitor=PRADA())
    assert math.isfinite(monitor.verdict.worst)


# ---------------------------------------------------------------------- the evasive thief

def test_evasive_knockoff_mixes_the_given_share_of_benign_queries(one_thread):
    from divqat.attacks import Knockoff, SurrogateTraining, TransferSet

    g = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 100, (200, 1, 16, 16), generator=g, dtype=torch.uint8)
    foreign = TransferSet("foreign", dark, torch.zeros(200).long())
    mine = TransferSet("mine", dark + 150, torch.zeros(200).long())
    seen = []

    class Recorder(PRADA):
        def _observe(self, images, labels, answers):
            seen.append(images.mean(dim=(1, 2, 3)))
            return []

    box = BlackBox(BarsVictim(), budget=100, monitor=Monitor(Recorder()))
    training = SurrogateTraining(epochs=1, batch_size=32, progress=False)
    stolen = Knockoff(batch_size=16, mix=0.3).steal(box, [100], training, transfer=foreign, benign=mine)
    brightness = torch.cat(seen)
    assert len(brightness) == 100 and int((brightness > 0.5).sum()) == 30 == stolen[0].info["benign_queries"]
    assert (brightness[:50] > 0.5).any() and (brightness[50:] > 0.5).any()  # spread over the stream
    with pytest.raises(ConfigError, match="benign-looking"):
        Knockoff(mix=0.5).steal(BlackBox(BarsVictim(), budget=10), [10], training, transfer=foreign)
    with pytest.raises(ConfigError, match="knockoff.mix"):
        Knockoff(mix=1.0)


# ---------------------------------------------------------------------- calibrate and detect

def test_calibrate_then_detect_on_a_victim(tiny_victims, tmp_path, capsys, one_thread):
    import json
    import shutil

    from divqat.cli import main

    victim = tmp_path / "qat"
    shutil.copytree(tiny_victims["qat"], victim)
    assert main(["detectors"]) == 0
    assert "prada" in capsys.readouterr().out
    for name, extra in (("prada", ["--detector-param", "min_distances=30",
                                   "--detector-param", "check_every=10"]),
                        ("mmd", ["--detector-param", "window=32", "--detector-param", "check_every=8",
                                 "--reference-size", "100"])):
        assert main(["calibrate", "--victim", str(victim), "--detector", name, "--streams", "6",
                     "--length", "96", "--target-far", "0.2", "--no-progress", *extra]) == 0
        saved = json.loads((victim / "detectors" / f"{name}.json").read_text())
        assert saved["in_sample_false_alarms"] <= 1 and saved["streams"] == 6
    assert (victim / "detectors" / "features.pt").is_file() and (victim / "detectors" / "mmd.pt").is_file()
    capsys.readouterr()
    out = tmp_path / "detect"
    assert main(["detect", "--victim", str(victim), "--detector", "prada", "--detector", "mmd",
                 "--attack", "jbda", "--attack-param", "seed_size=20", "--attack-param", "batch_size=32",
                 "--transfer", "tiny-bars:test", "--budget", "96", "--epochs", "1", "--min-steps", "0",
                 "--benign-streams", "3", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    assert record["queries_used"] == 96 and set(record["detectors"]) == {"prada", "mmd"}
    for row in record["detectors"].values():
        assert row["calibrated"] and row["benign_streams"] == 3 and row["tests"] > 0
        assert (f"alarm after {row['first_alarm']} queries" if row["detected"]
                else "not raised within 96 queries") in printed
    assert record["detectors"]["prada"]["settings"]["min_distances"] == 30  # from the calibration


# ---------------------------------------------------------------- in the experiment

def _watched_config(**detector) -> dict:
    return {
        "name": "watched", "seeds": [0],
        "victim": {"dataset": "tiny-bars", "arch": "resnet8", "holdout": 96, "batch_size": 64},
        "fp32": {"epochs": 3}, "qat": {"epochs": 1}, "divqat": {"alphas": [2.0], "epochs": 1},
        "defenses": ["none"],
        "attacks": [{"name": "knockoff", "transfer": "holdout", "labels_only": [False],
                     "budgets": [40, 80], "surrogate": {"epochs": 1, "batch_size": 32}}],
        "detectors": [{"name": "prada", "params": {"min_distances": 20, "check_every": 10},
                       "target_far": 0.25, "streams": 4, "benign_streams": 3, **detector}],
    }


def test_experiment_config_names_a_bad_detector_in_one_line():
    from divqat.experiment import parse_config

    with pytest.raises(ConfigError, match=r"detectors\[0\]\.name.*prada"):
        parse_config(_watched_config(name="prad"))
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.params\.delta: set by the calibration"):
        parse_config(_watched_config(params={"delta": 0.9}))
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.target_far"):
        parse_config(_watched_config(target_far=0.9))


def test_experiment_calibrates_per_victim_and_records_each_thiefs_first_alarm(tmp_path, one_thread):
    import csv

    from divqat.experiment import parse_config, plan_stages, run_experiment

    raw = _watched_config()
    config = parse_config(raw)
    without = {s.label: s.key for s in plan_stages(parse_config({**raw, "detectors": []}))}
    planned = plan_stages(config)
    # Detectors add calibrate stages and watch the attacks; nothing else changes its key.
    assert [s.kind for s in planned].count("calibrate") == 2  # qat, divqat
    assert all(without[s.label] == s.key for s in planned if s.kind not in ("calibrate", "attack"))
    assert all(without[s.label] != s.key for s in planned if s.kind == "attack")

    lines: list[str] = []
    results = run_experiment(config, tmp_path / "run", progress=False, say=lines.append)
    assert results["stages"]["failed"] == 0 and results["stages"]["skipped"] == 0
    cal = results["calibrations"]
    assert sorted(r["victim"] for r in cal) == ["divqat a=2", "qat"]
    assert all(r["detector"] == "prada" and r["benign_streams"] == 3 and r["benign_length"] == 80
               and 0.0 <= r["false_alarm_rate"] <= 1.0 for r in cal)
    rows = results["attacks"]
    assert len(rows) == 4  # 2 victims x 2 budgets
    for r in rows:
        alarm = r["alarm_prada"]
        assert alarm is None or 0 < alarm <= 80
        assert r["detected_prada"] == (alarm is not None and alarm <= r["budget"])
    # The thief's stream is one per attack stage: its budgets share the first alarm.
    assert len({(r["victim"], r["alarm_prada"]) for r in rows}) == 2
    with open(tmp_path / "run" / "results.csv") as f:
        assert {"alarm_prada", "detected_prada"} <= set(next(csv.reader(f)))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Extraction detectors" in report and "prada: alarms / runs" in report
    assert any(line.startswith("| prada | qat |") for line in report.splitlines())
    assert any("calibrate prada | qat | seed 0 ... running" in line for line in lines)
    assert any("prada threshold" in line and "honest streams of 80" in line for line in lines)
