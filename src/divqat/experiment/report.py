"""The experiment's report, built from its results (``divqat.experiment.results``).

- ``report.md``: the paper-style tables (defender error, adversary error, disagreement, L1,
  latency per query) for qat versus divqat, mean ± sd over seeds, with the difference
  divqat - qat paired by seed, its 95 % confidence interval (``divqat.experiment.stats``) and
  its meaning spelled out, or "within noise" where the interval contains 0; the strongest
  thief (``divqat.experiment.results.strongest_thief``: per victim x defense x transfer set x
  budget x seed, the best adversary accuracy over every thief that ran there, the winner named)
  beside the others, each defense's protection against it and what DivQAT takes from it; where
  the stages' time went; and the plots (``divqat.experiment.plots``).

Latencies compare only when they were measured side by side (the timing stage serves every
victim behind every defense in turns): a timing difference between stages run at different
moments measures the load on the machine, not the method. Such cells say "n/c".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from divqat.defenses import NO_DEFENSE
from divqat.errors import DivqatError
from divqat.experiment.numerics import lines as numerics_lines
from divqat.experiment.plots import make_plots
from divqat.experiment.results import (
    RESULTS_CSV,
    RESULTS_JSON,
    STRONGEST,
    THIEVES,
    attack_settings,
    ordered,
    regime,
    regime_budget,
    regime_title,
    regimes,
    setting_title,
    strongest_thief,
    thief_name,
    victim_labels,
)
from divqat.experiment.stages import STAGE_KINDS
from divqat.experiment.stats import mean_sd, paired_difference
from divqat.io import write_text

REPORT = "report.md"

# What the sign of divqat - qat means, per metric: (when positive, when negative). Timings have
# no entry: a latency difference is a property of a measurement, not of the method.
MEANING = {
    "victim_accuracy": ("divqat more accurate", "divqat less accurate"),
    "kl_to_teacher": ("divqat further from fp32", "divqat closer to fp32"),
    "defender_error": ("divqat less accurate", "divqat more accurate"),
    "adversary_error": ("divqat worse for the thief", "divqat better for the thief"),
    "adversary_accuracy": ("divqat better for the thief", "divqat worse for the thief"),
    "disagreement": ("copy less faithful", "copy more faithful"),
    "argmax_changed": ("more answers changed", "fewer answers changed"),
    "l1_distance": ("more perturbed", "less perturbed"),
    # A defense's protection: the strongest thief's accuracy behind no defense minus behind it.
    "protection": ("the defense takes from the thief", "the defense helps the thief"),
}
TIMINGS = ("ms_per_query_clean", "ms_per_query_defended", "latency_ratio")
SIDE_BY_SIDE = "side by side"
NOT_COMPARABLE = "n/c"


def build_report(results: dict[str, Any], out: str | Path) -> Path:
    """Write ``OUT/report.md`` and ``OUT/plots/*.png``; returns the report's path."""
    out = Path(out)
    plots = make_plots(results, out / "plots")
    path = out / REPORT
    write_text(path, report_markdown(results, [p.relative_to(out) for p in plots]))
    return path


# ---------------------------------------------------------------- numbers

def cell(values: Iterable[Any], scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± sd" over seeds (sd only with two seeds or more), scaled (100 for percentages)."""
    m, s, n = mean_sd(values)
    if n == 0:
        return "–"
    text = f"{m * scale:.{digits}f}"
    return text if s is None else f"{text} ± {s * scale:.{digits}f}"


def delta_cell(differences: Iterable[Any], metric: str, scale: float = 1.0, digits: int = 1) -> str:
    """A divqat - qat difference paired by seed with its 95 % confidence interval and what it
    means: "+2.1 [+0.4, +3.8] (divqat worse for the thief)", "+0.5 [-1.2, +2.2] within noise",
    "+2.1 (n=1, no interval)". Timing metrics get no meaning: they describe a measurement."""
    d = paired_difference(differences)
    if d is None:
        return "–"

    def signed(x: float) -> str:
        shown = round(x * scale, digits)
        return f"{0:.{digits}f}" if shown == 0 else f"{shown:+.{digits}f}"

    text = signed(d.mean)
    if not d.has_interval:
        return f"{text} (n=1, no interval)"
    text += f" [{signed(d.low)}, {signed(d.high)}]"
    if d.within_noise:
        return f"{text} within noise"
    if metric not in MEANING:
        return text
    up, down = MEANING[metric]
    return f"{text} ({up if d.mean > 0 else down})"


def side_by_side(rows: Iterable[dict[str, Any]]) -> bool:
    """Whether the rows' latencies come from the timing stage (and so compare)."""
    return all(r.get("timing") == SIDE_BY_SIDE for r in rows)


# ---------------------------------------------------------------- tables

def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def victims_table(results: dict[str, Any]) -> list[str]:
    rows = results["victims"]
    if not rows:
        return ["No victim finished."]
    trained = [r for r in rows if not r.get("collapsed")]
    labels = victim_labels(rows)
    by = defaultdict(dict)
    for r in trained:
        by[r["victim"]][r["seed"]] = r
    body = []
    for v in labels:
        seeds = by.get(v, {})
        collapsed = sum(1 for r in rows if r["victim"] == v and r.get("collapsed"))
        note = f"{collapsed} collapsed" if collapsed else ""
        body.append([v, cell([r["victim_accuracy"] for r in seeds.values()], 100),
                     cell([r.get("kl_to_teacher") for r in seeds.values()], 1, 4),
                     cell([r.get("l1_to_teacher") for r in seeds.values()], 1, 4),
                     cell([r.get("train_seconds") for r in seeds.values()], 1, 0), str(len(seeds)), note])
    qat = by.get("qat", {})
    for v in labels:
        if v.startswith("divqat"):
            pair = [s for s in by[v] if s in qat]
            body.append([f"Δ {v} − qat",
                         delta_cell([by[v][s]["victim_accuracy"] - qat[s]["victim_accuracy"] for s in pair],
                                    "victim_accuracy", 100),
                         delta_cell([by[v][s]["kl_to_teacher"] - qat[s]["kl_to_teacher"] for s in pair],
                                    "kl_to_teacher", 1, 4), "", "", "", ""])
    return _table(["victim", "test accuracy % (int8)", "KL(fp32 ‖ victim)", "L1 to fp32", "train s",
                   "seeds", "note"], body)


def defenses_table(results: dict[str, Any]) -> list[str]:
    rows = results["defenses"]
    if not rows:
        return ["No defense was evaluated."]
    index = {(r["defense_label"], r["victim"], r["seed"]): r for r in rows}
    seeds = ordered(r["seed"] for r in rows)
    metrics = [("defender error %", "defender_error", 100, 1), ("argmax changed %", "argmax_changed", 100, 1),
               ("L1", "l1_distance", 1, 4), ("ms/query clean", "ms_per_query_clean", 1, 3),
               ("ms/query defended", "ms_per_query_defended", 1, 3)]
    body = []
    for d in ordered(r["defense_label"] for r in rows):
        for v in victim_labels(rows):
            got = [index[(d, v, s)] for s in seeds if (d, v, s) in index]
            if got:
                body.append([d, v, *(cell([r[k] for r in got], sc, dg) for _, k, sc, dg in metrics)])
        body += _delta_rows(index, d, victim_labels(rows), seeds, metrics)
    return _table(["defense", "victim", *(m[0] for m in metrics)], body)


def _delta_rows(index: dict, defense: str, victims: list[str], seeds: list[Any],
                metrics: list[tuple[str, str, float, int]]) -> list[list[str]]:
    """Rows "Δ divqat a=X − qat" of one defense, paired by seed, one per divqat victim."""
    out = []
    for v in victims:
        if not v.startswith("divqat"):
            continue
        cells = []
        pairs = [(index[(defense, v, s)], index[(defense, "qat", s)]) for s in seeds
                 if (defense, v, s) in index and (defense, "qat", s) in index]
        for _, metric, scale, digits in metrics:
            cells.append(_delta(pairs, metric, scale, digits))
        if any(c != "–" for c in cells):
            out.append(["", f"Δ {v} − qat", *cells])
    return out


def _delta(pairs: list[tuple[dict[str, Any], dict[str, Any]]], metric: str, scale: float,
           digits: int) -> str:
    """The divqat - qat cell of a metric over (divqat row, qat row) pairs of the same seed; a
    timing is compared only where both were measured side by side."""
    if metric in TIMINGS and pairs and not side_by_side(r for pair in pairs for r in pair):
        return NOT_COMPARABLE
    return delta_cell([a[metric] - b[metric] for a, b in pairs], metric, scale, digits)


def _cell_key(r: dict[str, Any]) -> tuple:
    return r["victim"], r["defense_label"], regime(r), r["budget"], r["seed"]


def _with_strongest(rows: list[dict[str, Any]], strongest: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One attack setting's ``rows`` plus the strongest thief's rows of the same victims,
    defenses, regimes, budgets and seeds (``strongest``: of every attack of the experiment; None:
    computed from ``rows`` alone)."""
    rows = [r for r in rows if r["thief"] != STRONGEST]
    if strongest is None:
        strongest = strongest_thief(rows)
    cells = {_cell_key(r) for r in rows}
    return [*rows, *(r for r in strongest if _cell_key(r) in cells)]


def picks(rows: Iterable[dict[str, Any]]) -> str:
    """The strongest thief's winners over seeds, most wins first: "knockoff soft ×2, recovery
    soft ×1"."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["strongest_pick"]] += 1
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def attack_table(rows: list[dict[str, Any]], strongest: list[dict[str, Any]] | None = None) -> list[str]:
    """The paper-style table of one attack setting at one budget: per defense and victim, the
    defender error, the adversary error of each thief (soft, label-only, and the strongest thief
    of the regime at this budget, its winners named: ``strongest``, the experiment's
    ``strongest_thief`` rows, None to take the best of ``rows`` alone), the disagreement and the
    L1 distortion seen by the first thief, and the latency per query."""
    rows = _with_strongest(rows, strongest)
    thieves = [t for t in THIEVES if any(r["thief"] == t for r in rows)]
    first = thieves[0]
    index = {(r["defense_label"], r["victim"], r["seed"], r["thief"]): r for r in rows}
    seeds = ordered(r["seed"] for r in rows)
    columns = [("defender error %", "defender_error", first, 100, 1)]
    columns += [(f"adversary error % ({t}{' thief' if t == STRONGEST else ''})", "adversary_error", t,
                 100, 1) for t in thieves]
    columns += [(f"disagreement % ({first})", "disagreement", first, 100, 1),
                ("L1 (thief's queries)", "l1_distance", first, 1, 4),
                ("ms/query", "ms_per_query_defended", first, 1, 3)]
    body = []
    victims = victim_labels(rows)
    for d in ordered(r["defense_label"] for r in rows):
        for v in victims:
            cells = []
            for _, metric, t, scale, digits in columns:
                got = [index[(d, v, s, t)] for s in seeds if (d, v, s, t) in index]
                text = cell([r[metric] for r in got], scale, digits)
                if t == STRONGEST and got and metric == "adversary_error":
                    text += f" ({picks(got)})"
                cells.append(text)
            if any(c != "–" for c in cells):
                body.append([d, v, *cells])
        # Deltas column by column, each with its own thief.
        for v in victims:
            if not v.startswith("divqat"):
                continue
            cells = []
            for _, metric, t, scale, digits in columns:
                pairs = [(index[(d, v, s, t)], index[(d, "qat", s, t)]) for s in seeds
                         if (d, v, s, t) in index and (d, "qat", s, t) in index]
                cells.append(_delta(pairs, metric, scale, digits))
            if any(c != "–" for c in cells):
                body.append(["", f"Δ {v} − qat", *cells])
    return _table(["defense", "victim", *(c[0] for c in columns)], body)


def budget_table(rows: list[dict[str, Any]], strongest: list[dict[str, Any]] | None = None) -> list[str]:
    """Adversary accuracy per query budget (one attack setting), every thief, the strongest one
    of the regime at each budget included (``strongest`` as in ``attack_table``)."""
    rows = _with_strongest(rows, strongest)
    budgets = sorted({r["budget"] for r in rows})
    seeds = ordered(r["seed"] for r in rows)
    index = {(r["defense_label"], r["victim"], r["thief"], r["seed"], r["budget"]): r for r in rows}
    body = []
    for d in ordered(r["defense_label"] for r in rows):
        for t in [t for t in THIEVES if any(r["thief"] == t for r in rows)]:
            for v in victim_labels(rows):
                cells = [cell([index[(d, v, t, s, b)]["adversary_accuracy"] for s in seeds
                               if (d, v, t, s, b) in index], 100) for b in budgets]
                if any(c != "–" for c in cells):
                    body.append([d, t, v, *cells])
    return _table(["defense", "thief", "victim", *(f"{b} queries" for b in budgets)], body)


def strongest_lines(results: dict[str, Any]) -> list[str]:
    """Per regime (transfer set) at its summary budget (``regime_budget``): every thief's
    adversary accuracy per defense and victim, the strongest thief's with its winners, and each
    defense's protection against it: the strongest thief's accuracy behind no defense minus
    behind the defense, paired by seed, with its 95 % interval. Empty without a regime where two
    thieves ran."""
    rows = results["attacks"]
    strongest = strongest_thief(rows)
    if not strongest:
        return []
    lines = ["## The strongest thief", "",
             "Per transfer set at the query budget where the most thieves ran: each thief's "
             "adversary accuracy (%), the strongest thief's (per seed the best of them, the "
             "winners named with the seeds each won) and each defense's protection against it: "
             "the strongest thief's accuracy behind no defense minus behind the defense, paired "
             "by seed, in points, with its 95 % confidence interval (positive: the defense takes "
             "accuracy from the best thief; within noise where the interval contains 0).", ""]
    for name in regimes(strongest):
        budget = regime_budget(rows, name)
        mine = [r for r in rows if regime(r) == name and r["budget"] == budget]
        best = [r for r in strongest if regime(r) == name and r["budget"] == budget]
        if not best:
            continue
        thieves = ordered(thief_name(r) for r in mine)
        seeds = ordered(r["seed"] for r in mine)
        index = {(r["defense_label"], r["victim"], thief_name(r), r["seed"]): r for r in mine}
        top = {(r["defense_label"], r["victim"], r["seed"]): r for r in best}
        none = next((r["defense_label"] for r in mine if r["defense"] == NO_DEFENSE), None)
        body = []
        for d in ordered(r["defense_label"] for r in mine):
            for v in victim_labels(mine):
                cells = [cell([index[(d, v, t, s)]["adversary_accuracy"] for s in seeds
                               if (d, v, t, s) in index], 100) for t in thieves]
                won = [top[(d, v, s)] for s in seeds if (d, v, s) in top]
                strong = cell([r["adversary_accuracy"] for r in won], 100)
                if won:
                    strong += f" ({picks(won)})"
                protection = "–"
                if none is not None and d != none:
                    protection = delta_cell([top[(none, v, s)]["adversary_accuracy"]
                                             - top[(d, v, s)]["adversary_accuracy"] for s in seeds
                                             if (none, v, s) in top and (d, v, s) in top],
                                            "protection", 100)
                if any(c != "–" for c in cells):
                    body.append([d, v, *cells, strong, protection])
        lines += [f"### {regime_title(name, rows)}: {budget:,} queries", "",
                  *_table(["defense", "victim", *thieves, "strongest thief",
                           "protection (points, vs none)"], body), ""]
    return lines


def pays_table(results: dict[str, Any]) -> list[str]:
    """Where DivQAT pays, one row per DivQAT victim and defense: what it costs the defender (Δ
    test accuracy of the int8 victim) and what it takes from the strongest thief (Δ adversary
    accuracy, per seed the best of every thief of the transfer set) in each regime at its
    summary budget (``regime_budget``); every Δ against qat paired by seed with its 95 %
    interval. Empty without a regime where two thieves ran."""
    rows = results["attacks"]
    strongest = strongest_thief(rows)
    if not strongest:
        return []
    names = regimes(strongest)
    top = {name: regime_budget(rows, name) for name in names}
    index = {(r["victim"], r["defense_label"], regime(r), r["seed"]): r
             for r in strongest if r["budget"] == top[regime(r)]}
    trained = {(r["victim"], r["seed"]): r for r in results["victims"] if not r.get("collapsed")}
    seeds = ordered(r["seed"] for r in strongest)
    body = []
    for v in victim_labels(strongest):
        if not v.startswith("divqat"):
            continue
        paired = [s for s in seeds if (v, s) in trained and ("qat", s) in trained]
        cost = delta_cell([trained[(v, s)]["victim_accuracy"] - trained[("qat", s)]["victim_accuracy"]
                           for s in paired], "victim_accuracy", 100)
        for d in ordered(r["defense_label"] for r in strongest):
            cells = []
            for name in names:
                diffs = [index[(v, d, name, s)]["adversary_accuracy"] - index[("qat", d, name, s)]["adversary_accuracy"]
                         for s in seeds if (v, d, name, s) in index and ("qat", d, name, s) in index]
                cells.append(delta_cell(diffs, "adversary_accuracy", 100))
            if any(c != "–" for c in cells):
                body.append([v, d, cost, *cells])
    header = ["victim", "defense", "Δ test accuracy % (defender)",
              *(f"Δ strongest thief accuracy %: {regime_title(n, rows, full=False)}, {top[n]:,} queries"
                for n in names)]
    return _table(header, body)


def detector_lines(results: dict[str, Any]) -> list[str]:
    """The extraction detectors: their false-alarm rates on honest clients (per victim), and per
    attack setting at its largest budget, which thieves each one caught and after how many
    queries (per defense, victim and thief: alarms / runs over the seeds, then the queries to
    each first alarm)."""
    calibrations = results.get("calibrations") or []
    if not calibrations:
        return []
    names = ordered(r["detector"] for r in calibrations)
    lines = ["## Extraction detectors", "",
             "Each detector was calibrated per victim for its target false-alarm rate on honest "
             "streams of the victim's training images, then measured on honest clients it never "
             "saw (test split and holdout, each its own random order), and watched every thief's "
             "stream without changing an answer.", "",
             *_table(["detector", "victim", "threshold", "false alarms % (honest clients)", "streams",
                      "queries per stream"],
                     [[n, v, cell([r["threshold"] for r in rows], 1, 4),
                       cell([r["false_alarm_rate"] for r in rows], 100),
                       str(sum(r["benign_streams"] for r in rows)), f"{rows[0]['benign_length']:,}"]
                      for n in names for v in victim_labels(calibrations)
                      if (rows := [r for r in calibrations if r["detector"] == n and r["victim"] == v])]),
             ""]
    attacks = results["attacks"]
    for setting in attack_settings(attacks):
        mine = [r for r in attacks if (r["attack"], r["attack_params"], r["transfer"]) == setting]
        budget = max(r["budget"] for r in mine)
        top = [r for r in mine if r["budget"] == budget]
        body = []
        for d in ordered(r["defense_label"] for r in top):
            for v in victim_labels(top):
                for t in [t for t in THIEVES if any(r["thief"] == t for r in top)]:
                    runs = [r for r in top if (r["defense_label"], r["victim"], r["thief"]) == (d, v, t)]
                    if not runs:
                        continue
                    cells = []
                    for n in names:
                        alarms = [r.get(f"alarm_{n}") for r in runs]
                        caught = sorted(a for a in alarms if a is not None)
                        cells.append(f"{len(caught)}/{len(runs)}"
                                     + (f": {', '.join(f'{a:,}' for a in caught)}" if caught else ""))
                    body.append([d, v, t, *cells])
        lines += [f"### Alarms: {setting_title(setting, attacks)}, {budget:,} queries", "",
                  *_table(["defense", "victim", "thief", *(f"{n}: alarms / runs, queries to the first"
                                                          for n in names)], body), ""]
    return lines


def copy_table(results: dict[str, Any]) -> list[str]:
    """The two threats side by side, per victim: the thief who copies the device program (no
    queries; with the owner's fingerprint test of its copy, over seeds) and, for each regime
    (transfer set) of the query attacks against the undefended victim at its summary budget
    (``regime_budget``), its strongest thief (the one thief where only one ran)."""
    copies = results.get("copies") or []
    if not copies:
        return []
    queries = [r for r in results["attacks"] if r["defense"] == NO_DEFENSE]
    strongest = strongest_thief(queries)
    seeds = ordered(r["seed"] for r in copies)
    body = []
    for v in victim_labels(copies):
        got = [r for r in copies if r["victim"] == v]
        notes = ordered(r["note"] for r in got if r.get("note"))
        tested = [r for r in got if r.get("fingerprint_verified") is not None]
        owner = (f"{sum(bool(r['fingerprint_verified']) for r in tested)} of {len(tested)} verified"
                 if tested else "no fingerprint")
        body.append([v, "file copy", "0", cell([r["adversary_accuracy"] for r in got], 100),
                     cell([r["agreement"] for r in got], 100), owner, "; ".join(notes)])
        for name in regimes(queries):
            mine = [r for r in queries if r["victim"] == v and regime(r) == name]
            if not mine:
                continue
            budget = regime_budget(mine, name)
            best = [r for r in strongest if r["victim"] == v and regime(r) == name
                    and r["budget"] == budget and r["seed"] in seeds]
            if best:
                who = f"strongest: {picks(best)}"
            else:
                best = [r for r in mine if r["budget"] == budget and r["seed"] in seeds]
                who = ", ".join(ordered(thief_name(r) for r in best))
            body.append([v, f"{regime_title(name, queries, full=False)} ({who})", f"{budget:,}",
                         cell([r["adversary_accuracy"] for r in best], 100),
                         cell([r["agreement"] for r in best], 100), "", ""])
    return _table(["victim", "thief", "queries", "adversary accuracy %", "agreement %",
                   "the owner's fingerprint", "note"], body)


def fingerprint_lines(results: dict[str, Any]) -> list[str]:
    """The false claims of the programs' fingerprints (the ``fingerprint`` stages): per victim,
    the models never stolen from it that were tested, how many matched, their agreement with the
    points and the smallest p-value."""
    rows = results.get("fingerprints") or []
    if not rows:
        return []
    body = []
    for v in victim_labels(rows):
        got = [r for r in rows if r["victim"] == v]
        agree = [r["agreement"] for r in got]
        body.append([v, str(len(ordered(r["seed"] for r in got))), str(len(got)),
                     str(sum(bool(r["verified"]) for r in got)),
                     f"{100 * min(agree):.0f}-{100 * max(agree):.0f}", f"{min(r['p_value'] for r in got):.2g}"])
    significance = ordered(r["significance"] for r in rows)
    return ["The same fingerprints (IPGuard; `divqat verify --fingerprint`) against the models never stolen "
            "from each victim (the other seeds' victims, the independent models): a match at "
            f"{', '.join(f'{x:g}' for x in significance)} is a false claim.", "",
            *_table(["victim", "seeds", "tests", "matched (false claims)", "agreement with the points %",
                     "smallest p"], body), ""]


def main_table(results: dict[str, Any]) -> str:
    """The table printed at the end of `divqat run`: the first attack setting at its largest
    budget (or the victims when there was no attack)."""
    rows = results["attacks"]
    if not rows:
        return "\n".join(["victims", *victims_table(results)])
    setting = attack_settings(rows)[0]
    mine = [r for r in rows if (r["attack"], r["attack_params"], r["transfer"]) == setting]
    budget = max(r["budget"] for r in mine)
    n = len(ordered(r["seed"] for r in mine))
    title = (f"{setting_title(setting, rows)}, {budget} queries (mean ± sd over {n} "
             f"seed{'s' if n != 1 else ''}; Δ = divqat − qat paired by seed, [95 % CI])")
    lines = [title, *attack_table([r for r in mine if r["budget"] == budget], strongest_thief(rows))]
    if results.get("copies"):
        lines += ["", "on the device: copying the program vs querying it (no defense)", *copy_table(results)]
    return "\n".join(lines)


# ---------------------------------------------------------------- outliers versus transfer sets

def _set_parts(text: str) -> tuple[str, frozenset[int] | None, str, str]:
    """``"fashion-mnist[0-4]:train[-5000:]"`` -> (base name, classes or None, split, row slice)."""
    from divqat.data import split_subset

    name, _, split = text.partition(":")
    split, bracket, rows = split.partition("[")
    try:
        base, classes = split_subset(name)
    except DivqatError:  # not a name divqat wrote: compared as it is
        base, classes = name, None
    return base, None if classes is None else frozenset(classes), split, bracket + rows


def overlap_note(outliers: str, transfer: str) -> str | None:
    """What a reader must know when a victim's outlier set and a thief's transfer set share data:
    identical sets (a warning), the thief holding the images synthesized outliers are made from,
    or the same dataset under another split or classes. None when they share nothing."""
    synth = " of " in outliers
    source = outliers.split(" of ", 1)[1] if synth else outliers
    ob, oc, osplit, orows = _set_parts(source)
    tb, tc, tsplit, trows = _set_parts(transfer)
    if ob != tb or (oc is not None and tc is not None and not oc & tc):
        return None
    if synth:
        if osplit == tsplit and not trows:
            return (f"the thief's transfer set {transfer} holds the training images the outliers are "
                    "synthesized from")
        return None
    if outliers == transfer:
        return (f"WARNING: the outliers are the thief's transfer set {transfer}: against this thief the "
                "variant was trained on the thief's own queries, so its figures measure memorization, "
                "not protection")
    return (f"same dataset as the thief's {transfer} (another split or other classes): an optimistic "
            "reading of what the variant does against a thief with data it never saw")


def outliers_lines(results: dict[str, Any]) -> list[str]:
    """Per DivQAT victim trained on outliers: where they came from, the transfer sets its thieves
    used, and every overlap between the two."""
    victims = [v for v in results["victims"] if v.get("outlier_set")]
    if not victims:
        return []
    transfers: dict[str, list[str]] = defaultdict(list)
    for r in results["attacks"]:
        if r.get("transfer_set") and r["transfer_set"] not in transfers[r["victim"]]:
            transfers[r["victim"]].append(r["transfer_set"])
    lines = ["## Outliers and the thieves' transfer sets", "",
             "The out-of-distribution DivQAT victims push their divergence on outliers (outlier "
             "exposure, Hendrycks et al., ICLR 2019). A thief querying the very images a victim was "
             "trained on as outliers would measure memorization, not protection: each victim's "
             "outlier set and its thieves' transfer sets, and where they overlap.", ""]
    for label in ordered(v["victim"] for v in victims):
        sets = ordered(v["outlier_set"] for v in victims if v["victim"] == label)
        thieves = transfers.get(label, [])
        moved = cell([v.get("kl_to_teacher_outliers") for v in victims if v["victim"] == label], 1, 4)
        lines.append(f"- {label}: outliers {', '.join(sets)} (KL(fp32 ‖ victim) on outliers made "
                     f"from the test split: {moved}); thieves' transfer sets: "
                     f"{', '.join(thieves) or 'none (data-free attacks only)'}")
        notes = [n for o in sets for t in thieves if (n := overlap_note(o, t))]
        lines += [f"  - {n}" for n in notes] or ["  - no overlap"]
    return [*lines, ""]


# ---------------------------------------------------------------- ownership

def _rate_text(rate: float) -> str:
    return f"{100 * rate:g} %"


def ownership_lines(results: dict[str, Any]) -> list[str]:
    """The "Ownership" section (``watermark:``): per victim, defense, thief and budget, how the
    stolen surrogates repeated their thief's marks (mark agreement, chance, median p-value,
    verified over seeds); the independent models' false claims; and what the watermark cost an
    honest user of the test split, per rate."""
    rows = results.get("verifications") or []
    if not rows:
        return []
    from statistics import median

    from divqat.pipelines.verify import p_text

    alpha = f"{rows[0]['significance']:g}"
    stolen = [r for r in rows if r["suspect"] == "surrogate"]
    claims = [r for r in rows if r["suspect"] == "independent"]
    lines = ["## Ownership", "",
             "DAWN's watermark (Szyller et al., ACM MM 2021) on each thief's answers, after the "
             "defense: a keyed fraction (the rate) of them answered with a deterministic wrong "
             "label, each budget its own thief. Each stolen surrogate was then asked the labels of "
             "its thief's marked inputs (mark agreement) and of as many unmarked ones (its chance "
             "agreement with the label a mark would have given them, add-one smoothed); the "
             "one-sided binomial p-value of the agreement against that chance, and verified where "
             f"p < {alpha} (`divqat verify`). Agreement and chance are mean ± sd over seeds; the "
             "p-value is the median over seeds; verified counts the seeds.", ""]
    keys = ordered((r["victim"], r["defense_label"], r["attack"], r["attack_params"], r["transfer"],
                    r["thief"], r["rate"], r["budget"]) for r in stolen)
    body = []
    for key in sorted(keys, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7])):
        got = [r for r in stolen if (r["victim"], r["defense_label"], r["attack"], r["attack_params"],
                                     r["transfer"], r["thief"], r["rate"], r["budget"]) == key]
        victim, defense, attack, params, transfer, thief, rate, budget = key
        body.append([victim, defense, " ".join(p for p in (attack, params, transfer or "data-free") if p),
                     thief, _rate_text(rate), f"{budget:,}", cell([r["marks"] for r in got], 1, 0),
                     cell([r["agreement"] for r in got], 100), cell([r["chance"] for r in got], 100),
                     p_text(median(r["p_value"] for r in got)),
                     f"{sum(r['verified'] for r in got)}/{len(got)}"])
    lines += _table(["victim", "defense", "attack", "thief", "rate", "queries", "marks",
                     "mark agreement %", "chance %", "p-value (median)", "verified"], body)
    if claims:
        models = ordered(r["model"] for r in claims)
        false = sum(r["verified"] for r in claims)
        lines += ["", f"False claims: the independent models (never stolen from: the other seeds' "
                  "victims of the same label, and `watermark.independent`) asked every thief's marks "
                  f"of their victim: **{false} verified in {len(claims)} tests** of {len(models)} "
                  f"models at significance {alpha} (false positive rate {false / len(claims):.2%}).", ""]
        lines += _table(["independent model", "tests", "verified", "mark agreement %", "smallest p-value"],
                        [[m, str(len(got)), str(sum(r["verified"] for r in got)),
                          cell([r["agreement"] for r in got], 100), p_text(min(r["p_value"] for r in got))]
                         for m in models if (got := [r for r in claims if r["model"] == m])])
    marked = [r for r in results["attacks"] if r.get("watermark") is not None]
    if marked:
        first = {}
        for r in marked:  # the honest figures depend on victim, defense, rate and seed, not the thief
            first.setdefault((r["victim"], r["defense_label"], r["watermark"], r["seed"]), r)
        lines += ["", "What the watermark costs an honest user: the defended victim's answers to its "
                  "whole test split with and without the marks of the seed's thief key (the same "
                  "rate and secret).", ""]
        body = []
        for victim, defense, rate in ordered((k[0], k[1], k[2]) for k in first):
            got = [r for k, r in first.items() if k[:3] == (victim, defense, rate)]
            body.append([victim, defense, _rate_text(rate),
                         cell([r["defender_accuracy_unmarked"] for r in got], 100, 2),
                         cell([r["defender_accuracy_watermarked"] for r in got], 100, 2),
                         cell([r["defender_accuracy_watermarked"] - r["defender_accuracy_unmarked"]
                               for r in got], 100, 2)])
        lines += _table(["victim", "defense", "rate", "accuracy %", "watermarked accuracy %", "Δ points"], body)
    return [*lines, ""]


PHASES = ("data", "load", "export", "compile", "train", "attack", "evaluate", "save", "timing", "other")


def stage_times_table(results: dict[str, Any]) -> list[str]:
    """Per kind of stage (attacks per attack and transfer set): how many, their seconds, and the
    share of each phase (loading data and victims, compiling, training, evaluating)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results.get("stage_times") or []:
        label = r["label"].split(" | ")[0]
        name = (STAGE_KINDS.get(r["kind"]).time_name(label, r) if r["kind"] in STAGE_KINDS
                else r["kind"])
        groups[name].append(r)
    if not groups:
        return []
    body = []
    for name, rows in groups.items():
        seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
        phases: dict[str, float] = defaultdict(float)
        for r in rows:
            for k, v in (r.get("phases") or {}).items():
                phases[k if k in PHASES else "other"] += v
        total = sum(phases.values()) or 1.0
        shares = [f"{100 * phases[k] / total:.0f}" if phases else "–" for k in PHASES]
        body.append([name, str(len(rows)), f"{sum(seconds):.0f}", cell(seconds, 1, 0), *shares])
    return _table(["stages", "n", "total s", "s per stage (mean ± sd)",
                   *(f"% {k}" for k in PHASES)], body)


# ---------------------------------------------------------------- the report

def report_markdown(results: dict[str, Any], plots: list[Path] | None = None) -> str:
    config = results.get("config", {})
    victim = config.get("victim", {})
    seeds = config.get("seeds") or ordered(r["seed"] for r in results["victims"])
    lines = [f"# divqat experiment: {results.get('experiment', '?')}", ""]
    lines += [f"Config: {results.get('source', '?')}; victims {victim.get('arch', '?')} on "
              f"{victim.get('dataset', '?')}; seeds {', '.join(map(str, seeds))}; divqat "
              f"{results.get('divqat_version', '?')}."]
    stages = results.get("stages")
    if stages:
        lines[-1] += (f" Stages: {stages['total']} ({stages['ran']} run now, {stages['cached']} "
                      f"cached, {stages['skipped']} skipped"
                      + (f", {stages['failed']} failed" if stages.get("failed") else "") + ").")
    lines += ["",
              "Numbers are mean ± sd over seeds (the sd only with two seeds or more). Errors, "
              "disagreement (100 − agreement with the defended victim's labels) and accuracies in %; "
              "L1 is the mean sum |y' − y| between defended and clean posteriors; latency in ms per "
              "query image with the defense. **Δ = divqat − qat**, paired by seed: the mean of the "
              "per-seed differences with its 95 % confidence interval [low, high] (Student's t, "
              "n − 1 degrees of freedom), and what its sign means in parentheses, or **within "
              "noise** where the interval contains 0 (with one seed: n=1, no interval). The "
              "strongest thief is, per victim × defense × transfer set × budget × seed, the thief "
              "with the highest adversary accuracy of all that ran there (the soft-label and "
              "label-only thieves, and where the config has them the recovery, semi-supervised, "
              "averaging, Sybil and other thieves of the same transfer set), named in its cells "
              "with the seeds it won.", "",
              "Latencies come from each seed's timing stage, which serves every victim behind "
              "every defense in turns in one process, so that they compare; a latency difference "
              "describes that measurement on this machine, not the method (the qat and divqat "
              "victims are the same int8 program, with other weights). Where no timing stage "
              f"finished, the latencies are each defense stage's own and their Δ is "
              f"{NOT_COMPARABLE} (not comparable: measured at other moments, under other load).",
              "", "## Victims", "", *victims_table(results), "",
              *outliers_lines(results),
              "## Defenses on the victims' test split", "", *defenses_table(results), ""]
    rows = results["attacks"]
    if rows:
        strongest = strongest_thief(rows)
        lines += ["## Attacks", ""]
        for setting in attack_settings(rows):
            mine = [r for r in rows if (r["attack"], r["attack_params"], r["transfer"]) == setting]
            title = setting_title(setting, rows)
            budget = max(r["budget"] for r in mine)
            lines += [f"### {title}: {budget} queries", "",
                      *attack_table([r for r in mine if r["budget"] == budget], strongest), ""]
            if len({r["budget"] for r in mine}) > 1:
                lines += [f"#### {title}: adversary accuracy % per query budget", "",
                          *budget_table(mine, strongest), ""]
        lines += strongest_lines(results)
    pays = pays_table(results)
    if pays:
        lines += ["## Where DivQAT pays", "",
                  "Per DivQAT victim and defense: what it costs the defender (Δ int8 test accuracy) "
                  "and what it takes from the strongest thief in each transfer set at the budget "
                  "where the most thieves ran (negative: the thief copies worse). Every Δ is against qat, paired by seed, "
                  "with its 95 % confidence interval; within noise where that contains 0.", "",
                  *pays, ""]
    lines += detector_lines(results)
    lines += ownership_lines(results)
    if results.get("copies"):
        lines += ["## On the device: copying the program beside the query attacks", "",
                  "The victims ran as ExecuTorch programs (`victim.target: edge`). Whoever holds the "
                  "device holds the `.pte` file: the file-copy thief sends no query and gets the "
                  "victim itself (agreement 100 % unless the file is encrypted and the thief has no "
                  "key). Beside it, the query thieves against the undefended program, per transfer "
                  "set at the budget where the most thieves ran, the strongest of them. Output perturbation and DivQAT only act on the second "
                  "kind.", "", *copy_table(results), ""]
        lines += fingerprint_lines(results)
    collapsed = [r for r in results["victims"] if r.get("collapsed")]
    if collapsed:
        lines += ["## Collapsed victims", ""]
        lines += [f"- {r['victim']}, seed {r['seed']}: {r.get('message')}" for r in collapsed]
        lines += [""]
    failures = results.get("failures") or []
    if failures:
        lines += ["## Failed stages", "",
                  "These stages raised; the stages that need them were skipped. Rerunning the same "
                  "command runs only what is missing.", ""]
        lines += [f"- {f['stage']}: {f['error']} (traceback: `{f['folder']}/error.txt`)"
                  for f in failures]
        lines += [""]
    lines += numerics_lines(results.get("numerics"))
    times = stage_times_table(results)
    if times:
        lines += ["## Where the time went", "",
                  "Stages finished in this folder (this run's and cached ones), by kind; the phases "
                  "are exclusive (compiling inside an evaluation counts as compile).", "", *times, ""]
    if plots:
        lines += ["## Plots", "", f"Points are means over seeds, error bars one standard deviation "
                  f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}).", ""]
        lines += [f"![{p.stem.replace('_', ' ')}]({p.as_posix()})" for p in plots]
        lines += [""]
    lines += [f"Long-format results: `{RESULTS_CSV}` (one row per victim × defense × attack × "
              f"budget × seed) and `{RESULTS_JSON}`; `divqat report DIR` rebuilds this file.", ""]
    return "\n".join(lines)


__all__ = ["MEANING", "REPORT", "attack_table", "budget_table", "build_report", "cell", "copy_table",
           "fingerprint_lines",
           "delta_cell", "detector_lines", "main_table", "outliers_lines", "overlap_note",
           "ownership_lines", "pays_table", "picks", "report_markdown", "stage_times_table",
           "strongest_lines"]
