"""The experiment's results files, and the reading of their rows that the report and the plots
share.

- ``results.json``: the config and three long tables (victims, defenses, attacks); everything the
  report and the plots are built from, so ``divqat report DIR`` rebuilds them without training.
- ``results.csv``: the attacks table, one row per victim x defense x attack x transfer set x
  label-only x budget x seed, every metric a column (fractions, not percentages).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from divqat.errors import ArtifactError
from divqat.io import write_json, write_text

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
THIEVES = ("soft", "label-only", "adaptive")


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


def with_adaptive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows plus the adaptive thief: for each victim x defense x attack setting x budget x
    seed that has both a soft-label and a label-only thief, the one with the higher adversary
    accuracy (a real thief can try both and keep the better copy)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["victim"], r["defense_label"], r["attack"], r["attack_params"], r["transfer"],
                r["budget"], r["seed"])].append(r)
    out = list(rows)
    for group in groups.values():
        if {r["thief"] for r in group} >= {"soft", "label-only"}:
            best = max(group, key=lambda r: r["adversary_accuracy"])
            out.append({**best, "thief": "adaptive", "adaptive_pick": best["thief"]})
    return out


__all__ = ["CSV_COLUMNS", "RESULTS_CSV", "RESULTS_JSON", "THIEVES", "attack_settings",
           "load_results", "ordered", "setting_title", "short_title", "victim_labels",
           "with_adaptive", "write_results"]
