"""The experiment's results: the rows of its tables (defined once here, built by the stage kinds
from their finished stages, read by the report, the plots and the CLI), its files, and the
reading of the rows that the report and the plots share.

- ``results.json``: the config and the long tables (``TABLES``: victims, defenses, attacks,
  timings, stage_times; copies, calibrations, independents, verifications and fingerprints
  where the config has them); everything the report and the plots are built from, so ``divqat
  report DIR`` rebuilds them without training.
- ``results.csv``: the attacks table, one row per victim x defense x attack x transfer set x
  label-only x budget x seed, every metric a column (fractions, not percentages).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from divqat.errors import ArtifactError
from divqat.experiment.labels import defense_label, victim_name
from divqat.io import write_json, write_text
from divqat.registry import params_text

if TYPE_CHECKING:
    from divqat.experiment.stages.base import RowsContext, Stage

RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"
CSV_COLUMNS = (
    "seed", "victim", "victim_mode", "alpha", "divergence", "cap", "defense", "defense_params",
    "attack", "attack_params", "transfer", "transfer_set", "labels_only", "budget", "queries_used",
    "victim_accuracy", "teacher_accuracy", "kl_to_teacher", "l1_to_teacher",
    "defender_accuracy", "defender_error", "argmax_changed",
    "adversary_accuracy", "adversary_error", "agreement", "disagreement", "agreement_clean",
    "l1_distance", "kl_divergence", "ms_per_query_clean", "ms_per_query_defended", "latency_ratio",
    "timing", "surrogate", "surrogate_epochs", "attack_seconds", "thief", "defense_label", "stage",
)
# The thieves of an attack setting as the report orders them; "strongest" is the best over every
# thief of a regime (``strongest_thief``).
STRONGEST = "strongest"
THIEVES = ("soft", "label-only", STRONGEST)
DATA_FREE = "data-free"
# The tables of results.json in order; the optional ones only where the config gives them rows.
TABLES = ("victims", "defenses", "attacks", "timings", "stage_times", "copies", "calibrations",
          "independents", "verifications", "fingerprints")
OPTIONAL_TABLES = ("copies", "calibrations", "independents", "verifications", "fingerprints")
LATENCY = ("ms_per_query_clean", "ms_per_query_defended", "latency_ratio")
# Where a defense row's latency columns come from: the seed's timing stage (comparable between
# victims and defenses), or the defense stage alone (not comparable).
SIDE_BY_SIDE, OWN_STAGE = "side by side", "own stage"


# ---------------------------------------------------------------- the rows

class VictimColumns(TypedDict):
    """What a row about one trained model, or about a defense, thief or detector on it, says of
    the model."""

    seed: int
    victim: str                 # "fp32 teacher", "qat", "divqat a=2", a variant's label
    victim_mode: str            # fp32, qat, divqat
    alpha: float | None
    divergence: str | None
    cap: float | None
    divergence_on: str | None   # in, out (DivQAT aimed at out-of-distribution queries)
    outlier_set: str | None
    victim_accuracy: float      # int8 test accuracy (the teacher's fp32 one)
    kl_to_teacher: float | None
    l1_to_teacher: float | None


class VictimRow(VictimColumns, total=False):
    """``victims``: one trained model (a teacher or an int8 victim)."""

    test_accuracy: float | None
    teacher_accuracy: float | None
    train_images: int
    epochs: int
    train_seconds: float
    kl_to_teacher_outliers: float | None
    collapsed: bool
    message: str | None
    stage: str                  # the stage key's first 16 characters


class DefenseColumns(TypedDict, total=False):
    """The defense as measured on the victim's test split (``defense_columns``)."""

    defense: str
    defense_params: str
    defense_label: str          # "dcp beta=0.5"
    defender_accuracy: float
    defender_error: float
    argmax_changed: float
    ms_per_query_clean: float
    ms_per_query_defended: float
    latency_ratio: float
    timing: str                 # SIDE_BY_SIDE or OWN_STAGE


class DefenseRow(VictimColumns, DefenseColumns, total=False):
    """``defenses``: one victim behind one defense setting."""

    l1_distance: float
    kl_divergence: float
    queries: int
    stage: str


class AttackRow(VictimColumns, DefenseColumns, total=False):
    """``attacks`` (and results.csv): one thief x budget against one victim behind one defense.
    A watched thief's rows also carry ``alarm_<detector>`` and ``detected_<detector>``."""

    teacher_accuracy: float | None
    attack: str
    attack_params: str
    transfer: str               # the config's transfer entry ("" for data-free)
    transfer_set: str           # what it resolved to
    labels_only: bool
    thief: str                  # soft, label-only (and "strongest" in the report's reading)
    budget: int
    queries_used: int
    surrogate: str
    surrogate_epochs: int
    adversary_accuracy: float
    adversary_error: float
    agreement: float
    disagreement: float
    agreement_clean: float
    l1_distance: float
    kl_divergence: float
    attack_seconds: float
    surrogates_shared: bool     # measured on the twin's surrogates behind no defense
    stage: str


class TimingRow(TypedDict):
    """``timings``: one victim x defense pair of a seed's side-by-side timing stage."""

    seed: int
    victim: str
    defense_label: str
    ms_per_query_clean: float
    ms_per_query_defended: float
    latency_ratio: float
    stage: str


class CopyRow(VictimColumns, total=False):
    """``copies``: the on-device thief who copies the program file."""

    attack: str
    thief: str
    budget: int
    queries_used: int
    adversary_accuracy: float | None
    adversary_error: float | None
    agreement: float | None
    max_posterior_difference: float | None
    note: str | None
    program_bytes: int
    attack_seconds: float
    # The owner's fingerprint of the program against the copy (None: none was written).
    fingerprint_verified: bool | None
    fingerprint_agreement: float | None
    stage: str


class CalibrationRow(VictimColumns, total=False):
    """``calibrations``: one detector calibrated on one victim."""

    detector: str
    threshold: float
    target_far: float
    false_alarm_rate: float
    false_alarms: int
    benign_streams: int
    benign_length: int
    stage: str


class IndependentRow(TypedDict, total=False):
    """``independents``: a model of ``watermark.independent``, never stolen from."""

    model: str                  # "resnet20 seed 11"
    arch: str
    seed: int
    test_accuracy: float | None
    train_seconds: float | None
    stage: str


class VerificationRow(TypedDict, total=False):
    """``verifications``: one suspect tested against one watermarked thief's marks (``divqat
    verify``): the thief's own stolen surrogate, or an independent model (a false claim when
    verified)."""

    seed: int                   # the run seed of the thief (and its victim)
    victim: str                 # the victim the thief attacked
    suspect: str                # "surrogate" or "independent"
    model: str                  # "stolen surrogate", "qat seed 1", "resnet20 seed 11"
    attack: str
    attack_params: str          # the attack's own parameters (the rate is ``rate``)
    transfer: str
    transfer_set: str
    thief: str                  # soft, label-only
    defense_label: str
    budget: int                 # the thief's queries
    rate: float                 # the watermark's rate on the thief's answers
    marks: int                  # marked inputs asked
    agreed: int                 # of them, answered with the mark label
    agreement: float
    controls: int
    chance: float               # (control agreement + 1) / (controls + 2)
    p_value: float
    verified: bool
    significance: float
    queries: int
    stage: str


class FingerprintRow(TypedDict, total=False):
    """``fingerprints``: one model never stolen from an edge victim tested against its program's
    fingerprint (``divqat verify --fingerprint``): a false claim when verified."""

    seed: int
    victim: str
    model: str                  # "qat seed 1", "resnet20 seed 11"
    points: int
    agreed: int                 # points answered with the victim's label
    agreement: float
    chance: float               # the model's agreement with the points' sources (at least 1/K)
    p_value: float
    verified: bool
    significance: float
    stage: str


class StageTimeRow(TypedDict, total=False):
    """``stage_times``: where one finished stage's seconds went, and where it ran."""

    label: str
    kind: str
    seed: int
    seconds: float
    phases: dict[str, float]
    worker: dict[str, Any]
    finished: str
    stage: str
    surrogates_shared: bool


# ---------------------------------------------------------------- the columns rows share

def victim_info(stage: Stage, ctx: RowsContext) -> VictimColumns:
    """What every row about a trained model carries of it (a teacher or victim stage)."""
    s = stage.spec
    div = s.get("divqat") or {}
    alpha = div.get("alpha", 0.0) if s["mode"] != "fp32" else None
    r = ctx.result(stage.key)
    return {"seed": stage.seed, "victim": victim_name(s, ctx.with_cap), "victim_mode": s["mode"],
            "alpha": alpha, "divergence": div.get("divergence"), "cap": div.get("cap"),
            "divergence_on": div.get("divergence_on", "in") if div else None,
            "outlier_set": r.get("outlier_set"),
            "victim_accuracy": r.get("int8_test_accuracy", r.get("test_accuracy")),
            "kl_to_teacher": r.get("kl_to_teacher"), "l1_to_teacher": r.get("l1_to_teacher")}


def victim_columns(v: VictimColumns) -> VictimColumns:
    """The victim's columns of a defense, attack, copy or calibration row."""
    return {"seed": v["seed"], "victim": v["victim"], "victim_mode": v["victim_mode"], "alpha": v["alpha"],
            "divergence": v["divergence"], "cap": v["cap"], "victim_accuracy": v["victim_accuracy"],
            "kl_to_teacher": v["kl_to_teacher"], "l1_to_teacher": v["l1_to_teacher"],
            "divergence_on": v["divergence_on"], "outlier_set": v["outlier_set"]}


def defense_columns(stage: Stage, victim: VictimColumns, r: dict[str, Any],
                    ctx: RowsContext) -> DefenseColumns:
    """The defense as measured on the victim's test split (its defense stage ``stage``, result
    ``r``), with the latency of the seed's timing stage where it finished (``timing``)."""
    name, params = stage.spec["name"], stage.spec["params"]
    columns: DefenseColumns = {"defense": name, "defense_params": params_text(params),
               "defense_label": defense_label(name, params),
               "defender_accuracy": r["defender_accuracy"], "defender_error": 1.0 - r["defender_accuracy"],
               "argmax_changed": r["argmax_changed"], "ms_per_query_clean": r["ms_per_query_clean"],
               "ms_per_query_defended": r["ms_per_query_defended"], "latency_ratio": r["latency_ratio"]}
    side = ctx.shared.get("timed", {}).get((victim["seed"], victim["victim"], columns["defense_label"]))
    columns.update({k: side[k] for k in LATENCY} if side else {})
    columns["timing"] = SIDE_BY_SIDE if side else OWN_STAGE
    return columns


def alarm_columns(r: dict[str, Any], budget: int) -> dict[str, Any]:
    """Per detector that watched the thief: ``alarm_<name>``, the queries until its first alarm
    (None: not raised within the largest budget), and ``detected_<name>``, whether that came
    within this row's budget (the thief's stream is the same for all its budgets). A Sybil
    thief's alarm counts the queries of all its keys (``first_alarm_thief``; a key's own count
    would put a 4-key thief's alarm at a quarter of the thief's queries)."""
    out: dict[str, Any] = {}
    for name, d in (r.get("detectors") or {}).items():
        first = d.get("first_alarm_thief", d.get("first_alarm"))
        out[f"alarm_{name}"] = first
        out[f"detected_{name}"] = first is not None and first <= budget
    return out


# ---------------------------------------------------------------- files

def write_results(results: dict[str, Any], out: str | Path) -> None:
    """``OUT/results.json`` (everything) and ``OUT/results.csv`` (the attacks table)."""
    out = Path(out)
    write_json(out / RESULTS_JSON, results)
    rows = results["attacks"]
    extra = sorted({k for r in rows for k in r} - set(CSV_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_COLUMNS, *extra], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    write_text(out / RESULTS_CSV, buffer.getvalue())


def load_results(folder: str | Path) -> dict[str, Any]:
    """The ``results.json`` of an experiment folder."""
    path = Path(folder) / RESULTS_JSON
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"no {RESULTS_JSON} in {folder}: run `divqat run ... --out {folder}` "
                            "first") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable or corrupt ({e}); rerun `divqat run` (finished "
                            "stages are reused)") from None
    if not isinstance(results, dict) or not {"victims", "defenses", "attacks"} <= set(results):
        raise ArtifactError(f"{path} is not a divqat results file (no victims/defenses/attacks)")
    return results


# ---------------------------------------------------------------- grouping

def _victim_order(label: str, alpha: Any) -> tuple:
    rank = {"fp32 teacher": 0, "qat": 1}.get(label, 2)
    return rank, alpha if isinstance(alpha, int | float) else 0.0, label


def victim_labels(rows: list[dict[str, Any]]) -> list[str]:
    """The victims present, teacher first, then qat, then divqat by alpha."""
    seen = {r["victim"]: r.get("alpha") for r in rows}
    return sorted(seen, key=lambda v: _victim_order(v, seen[v]))


def ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def attack_settings(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(attack, attack params, transfer) in order of first appearance."""
    return ordered((r["attack"], r["attack_params"], r["transfer"]) for r in rows)


def setting_title(setting: tuple[str, str, str], rows: list[dict[str, Any]]) -> str:
    attack, params, transfer = setting
    names = ordered(r["transfer_set"] for r in rows if (r["attack"], r["attack_params"], r["transfer"])
                    == setting and r["transfer_set"])
    where = f"transfer set {transfer}" + (f" ({', '.join(names)})" if names and names != [transfer] else "")
    if not transfer:
        where = "data-free"
    return f"{attack}{' ' + params if params else ''}, {where}"


def short_title(setting: tuple[str, str, str]) -> str:
    """"knockoff holdout", "dfme data-free": for plot legends."""
    attack, params, transfer = setting
    return " ".join(p for p in (attack, params, transfer or "data-free") if p)


def regime(row: dict[str, Any]) -> str:
    """The transfer set a thief drew its queries from, as it resolved (``transfer_set``;
    ``"data-free"`` for the attacks without one): the thieves of one regime compete for the
    strongest thief."""
    return row.get("transfer_set") or row.get("transfer") or DATA_FREE


def regimes(rows: list[dict[str, Any]]) -> list[str]:
    """The regimes present, in order of first appearance."""
    return ordered(regime(r) for r in rows)


def regime_title(name: str, rows: list[dict[str, Any]], full: bool = True) -> str:
    """A regime as the config named it: ``"holdout"``; with ``full``, what it resolved to in
    parentheses where that differs: ``"holdout (fashion-mnist[0-4]:train[-5000:])"``."""
    entries = ordered(r.get("transfer") or DATA_FREE for r in rows if regime(r) == name)
    shown = ", ".join(entries) or name
    return f"{shown} ({name})" if full and entries != [name] else shown


def thief_name(row: dict[str, Any]) -> str:
    """A thief as the strongest-thief cells name it: the attack, its parameters and what the box
    answered it with: ``"knockoff soft"``, ``"sybil keys=4 label-only"``."""
    return " ".join(p for p in (row["attack"], row.get("attack_params"), row["thief"]) if p)


def _accuracy(row: dict[str, Any]) -> float:
    a = row.get("adversary_accuracy")
    return a if isinstance(a, int | float) and math.isfinite(a) else -math.inf


def strongest_thief(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The strongest thief's rows: for each victim x defense x regime x budget x seed where two
    thieves or more ran (blind soft-label and label-only, and any other attack of the same
    transfer set at the same query budget: the recovery, semi-supervised, averaging and Sybil
    thieves, KnockoffNets' adaptive policy, JBDA), the row of the one with the highest adversary
    accuracy: a real thief can run them all and keep the best copy. Each is that row with
    ``thief`` ``"strongest"``, ``strongest_pick`` (the winner's ``thief_name``) and
    ``thieves_compared`` (every thief of the group). Where only a soft-label and a label-only
    thief of one attack ran, it is the better of the two (what the report called the adaptive
    thief)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["thief"] != STRONGEST:
            groups[(r["victim"], r["defense_label"], regime(r), r["budget"], r["seed"])].append(r)
    out = []
    for group in groups.values():
        names = ordered(thief_name(r) for r in group)
        if len(names) >= 2:
            best = max(group, key=_accuracy)
            out.append({**best, "thief": STRONGEST, "strongest_pick": thief_name(best),
                        "thieves_compared": names})
    return out


def with_strongest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows plus the strongest thief's (``strongest_thief``)."""
    return [*rows, *strongest_thief(rows)]


def regime_budget(rows: list[dict[str, Any]], name: str) -> int:
    """The query budget a regime is summarized at: the one where the most thieves ran (the
    largest of those), so the strongest thief there is the best of the most attacks."""
    mine = [r for r in rows if regime(r) == name and r["thief"] != STRONGEST]
    thieves: dict[int, set[str]] = defaultdict(set)
    for r in mine:
        thieves[r["budget"]].add(thief_name(r))
    return max(thieves, key=lambda b: (len(thieves[b]), b))


__all__ = ["AttackRow", "CSV_COLUMNS", "CalibrationRow", "CopyRow", "DATA_FREE", "DefenseColumns",
           "DefenseRow", "IndependentRow", "StageTimeRow", "TimingRow", "VerificationRow", "VictimColumns",
           "VictimRow", "FingerprintRow", "LATENCY", "OPTIONAL_TABLES", "OWN_STAGE", "RESULTS_CSV",
           "RESULTS_JSON",
           "SIDE_BY_SIDE", "STRONGEST", "TABLES", "THIEVES", "alarm_columns", "attack_settings",
           "defense_columns", "load_results", "ordered", "regime", "regime_budget", "regime_title",
           "regimes", "setting_title", "short_title", "strongest_thief", "thief_name", "victim_labels",
           "victim_columns", "victim_info", "with_strongest", "write_results"]
