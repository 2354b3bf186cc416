"""The report's plots, drawn from a results dict (``results.json``) with matplotlib's Agg canvas.

- ``error_vs_alpha.png``: victim (int8 test) error and adversary error (no defense, largest
  budget) versus the DivQAT alpha; qat is alpha 0.
- ``kl_vs_alpha.png``: KL(fp32 || quantized victim) on the test split versus alpha.
- ``tradeoff.png``: defender error versus adversary error per defense setting, one line per
  victim (qat and divqat on the same axes), per attack setting and thief, largest budget. The
  victim is the colour and the defense the marker (one legend for the figure), so points that
  coincide stay identifiable where per-point text would overlap.
- ``budget.png``: adversary accuracy versus query budget (log axis, ticked at the budgets run:
  500, 2k, 10k), per attack setting and defense; a setting with a single budget is drawn as
  points around that budget. Each victim x thief is shifted sideways a little so error bars
  at the same budget stay apart.

Points are means over seeds, error bars one standard deviation (each figure's title says over
how many seeds). Colours, markers and legends are shared by all panels of a figure (one legend
below it), so no legend covers data. A DivQAT grid over several caps draws one line per cap
(qat, alpha 0, starts each).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from divqat.defenses import NO_DEFENSE
from divqat.experiment.results import (
    attack_settings,
    setting_title,
    short_title,
    victim_labels,
)
from divqat.experiment.stats import mean_sd

MARKERS = "osD^v<>p*h"
THIEF_STYLES = {"soft": "-", "label-only": "--"}  # the strongest thief is in the report's tables
DODGE = 1.03  # factor between neighbouring series' x positions on the budget plot's log axis
MAX_TICKS = 8  # more fixed ticks than this would collide; matplotlib's locators take over


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _figure_legend(fig: Figure, *rows: list) -> None:
    """One legend below all panels (inside a panel it would cover data), each list of handles on
    a row of its own: matplotlib fills a legend column by column, so the rows are interleaved
    and padded with blank entries."""
    rows = tuple(r for r in rows if r)
    if not rows:
        return
    ncols = max(len(r) for r in rows)
    blank = Line2D([], [], linestyle="none", label=" ")
    padded = [[*r, *[blank] * (ncols - len(r))] for r in rows]
    handles = [r[c] for c in range(ncols) for r in padded]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=7, frameon=False)


def budget_text(budget: float) -> str:
    """A query budget as a tick label: 500, 2k, 2.5k, 10k, 1M."""
    for size, suffix in ((1_000_000, "M"), (1000, "k")):
        if budget >= size:
            return f"{budget / size:g}{suffix}"
    return f"{budget:g}"


def _budget_axis(ax, budgets: list[int], spread: float = 1.0) -> None:
    """Log x axis ticked at the budgets run, without minor tick labels (those overlap as soon
    as the budgets span less than a decade). A single budget gets a range around it; ``spread``
    is the largest factor a dodged point lies away from its budget."""
    ax.set_xscale("log")
    if len(budgets) <= MAX_TICKS:
        ax.xaxis.set_major_locator(FixedLocator(budgets))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: budget_text(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    margin = max(2.0 if len(budgets) == 1 else 1.3, 1.1 * spread)  # dodged points and caps fit
    ax.set_xlim(budgets[0] / margin, budgets[-1] * margin)


def _alpha_axis(ax, alphas: list[float]) -> None:
    """Tick the alphas that were trained, unless they would crowd each other."""
    if 1 < len(alphas) <= MAX_TICKS:
        span = alphas[-1] - alphas[0]
        if min(b - a for a, b in zip(alphas, alphas[1:], strict=False)) >= 0.06 * span:
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    ax.set_xlabel("DivQAT alpha (0 = qat)")


def _by_alpha(rows: list[dict[str, Any]], metric: str, scale: float = 1.0):
    """(alphas, means, stds) over the rows' victims (qat = alpha 0), sorted by alpha. Only the
    paper's DivQAT: an out-of-distribution variant at the same alpha is another method (it is in
    the report's tables and on the trade-off and budget plots)."""
    groups: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("divergence_on") in ("out", "both"):
            continue
        if r.get("alpha") is not None and r.get(metric) is not None:
            groups[float(r["alpha"])].append(r[metric] * scale)
    xs = sorted(groups)
    stats = [mean_sd(groups[x]) for x in xs]
    return xs, [s[0] for s in stats], [s[1] or 0.0 for s in stats]


def _per_cap(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label suffix, rows) per DivQAT cap, each with the qat rows; one group when the
    experiment has one cap."""
    caps = sorted({r.get("cap") for r in rows if r.get("victim_mode") == "divqat"},
                  key=lambda c: (c is None, c or 0.0))
    if len(caps) <= 1:
        return [("", rows)]
    return [(f", cap {'none' if c is None else f'{c:g}'}",
             [r for r in rows if r.get("victim_mode") != "divqat" or r.get("cap") == c]) for c in caps]


def _seeds_note(fig: Figure, results: dict[str, Any]) -> None:
    n = len({r["seed"] for r in results["victims"]}) or len(results.get("config", {}).get("seeds", []))
    fig.suptitle(f"mean ± sd over {n} seed{'s' if n != 1 else ''}", fontsize=7, color="0.4")


def _largest_budget(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        return []
    top = max(r["budget"] for r in rows)
    return [r for r in rows if r["budget"] == top]


def _of_setting(rows, setting):
    return [r for r in rows if (r["attack"], r["attack_params"], r["transfer"]) == setting]


def plot_error_vs_alpha(results: dict[str, Any], path: Path) -> Path | None:
    victims = [{**r, "victim_error": 1.0 - r["victim_accuracy"]} for r in results["victims"]
               if r["victim_mode"] != "fp32" and not r.get("collapsed")]
    if not victims:
        return None
    fig, axes = _figure(width=6.4, height=4.8)
    ax = axes[0, 0]
    alphas: list[float] = []
    for k, (cap, group) in enumerate(_per_cap(victims)):
        xs, ys, es = _by_alpha(group, "victim_error", 100)
        ax.errorbar(xs, ys, yerr=es, marker="o", color=str(0.45 * k / max(1, k + 1)), capsize=3,
                    linestyle=("-", "--", ":", "-.")[k % 4], label=f"victim (int8 test){cap}")
        alphas = sorted(set(alphas) | set(xs))
    teachers = [1 - r["victim_accuracy"] for r in results["victims"] if r["victim_mode"] == "fp32"
                and r.get("victim_accuracy") is not None]
    if teachers:
        ax.axhline(100 * mean_sd(teachers)[0], color="gray", linestyle=":", label="fp32 teacher")
    undefended = [r for r in results["attacks"] if r["defense"] == NO_DEFENSE]
    for i, setting in enumerate(attack_settings(undefended)):
        rows = _largest_budget(_of_setting(undefended, setting))
        for j, (thief, style) in enumerate(THIEF_STYLES.items()):
            mine = [r for r in rows if r["thief"] == thief]
            for k, (cap, group) in enumerate(_per_cap(mine) if mine else []):
                xs, ys, es = _by_alpha(group, "adversary_error", 100)
                ax.errorbar(xs, ys, yerr=es, marker=MARKERS[(2 * i + j + 1 + k) % len(MARKERS)],
                            linestyle=style, capsize=3, color=f"C{(2 * i + j) % 10}",
                            alpha=1.0 - 0.25 * k / max(1, k + 1),
                            label=f"thief {short_title(setting)}, {thief}, "
                                  f"{budget_text(rows[0]['budget'])} queries{cap}")
    _alpha_axis(ax, alphas)
    ax.set_ylabel("test error %")
    ax.set_title("Victim and adversary error vs alpha (no defense)")
    ax.grid(alpha=0.3)
    _seeds_note(fig, results)
    handles, labels = ax.get_legend_handles_labels()
    ours = [h for h, label in zip(handles, labels, strict=True) if not label.startswith("thief")]
    thieves = [h for h, label in zip(handles, labels, strict=True) if label.startswith("thief")]
    # Two entries a row: the thieves' labels are long, three would run off the figure.
    _figure_legend(fig, ours, *(thieves[k:k + 2] for k in range(0, len(thieves), 2)))
    return _save(fig, path)


def plot_kl_vs_alpha(results: dict[str, Any], path: Path) -> Path | None:
    victims = [r for r in results["victims"] if r["victim_mode"] != "fp32" and not r.get("collapsed")
               and r.get("kl_to_teacher") is not None]
    if not victims:
        return None
    fig, axes = _figure(width=5.6, height=3.8)
    ax = axes[0, 0]
    groups = _per_cap(victims)
    every: list[float] = []
    for k, (cap, group) in enumerate(groups):
        xs, ys, es = _by_alpha(group, "kl_to_teacher")
        ax.errorbar(xs, ys, yerr=es, marker=MARKERS[k % len(MARKERS)], capsize=3, color=f"C{3 + k}",
                    label=cap.removeprefix(", ") or None)
        every += ys
    xs = sorted({x for _, group in groups for x in _by_alpha(group, "kl_to_teacher")[0]})
    if len(groups) > 1:
        ax.legend(fontsize=7)
    if all(y > 0 for y in every):
        ax.set_yscale("log")
        # Plain numbers at 1, 2, 5 x 10^k: the default labels every minor tick as "4 x 10^-3".
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    _alpha_axis(ax, xs)
    ax.set_ylabel("KL(fp32 ‖ victim), nats")
    ax.set_title("How far the int8 posteriors moved from fp32")
    ax.grid(alpha=0.3)
    _seeds_note(fig, results)
    return _save(fig, path)


def plot_tradeoff(results: dict[str, Any], path: Path) -> Path | None:
    rows = results["attacks"]
    panels = [(s, t) for s in attack_settings(rows) for t in THIEF_STYLES
              if any(r["thief"] == t for r in _of_setting(rows, s))]
    if not panels:
        return None
    # Colour = victim, marker = defense, the same in every panel: per-point text labels overlap
    # wherever defenses coincide (reverse-sigmoid keeps the argmax, so its defender error is
    # that of no defense).
    victims = victim_labels(rows)
    defenses = list(dict.fromkeys(r["defense_label"] for r in rows))
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = _figure(ncols, nrows, width=5.4, height=4.0)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (setting, thief) in zip(axes.flat, panels, strict=False):
        mine = [r for r in _largest_budget(_of_setting(rows, setting)) if r["thief"] == thief]
        for i, v in enumerate(victims):
            points = []
            for k, d in enumerate(defenses):
                group = [r for r in mine if r["victim"] == v and r["defense_label"] == d]
                if group:
                    dx, sx, _ = mean_sd(100 * r["defender_error"] for r in group)
                    ay, sy, _ = mean_sd(100 * r["adversary_error"] for r in group)
                    points.append((dx, ay, sx or 0.0, sy or 0.0, k))
            if not points:
                continue
            points.sort()
            color = f"C{i}"
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.5, lw=1)
            for x, y, sx, sy, k in points:
                # Half-transparent faces: a marker drawn over another still shows the one below.
                # No bar for a zero std (one seed): its caps would show through as a cross.
                ax.errorbar(x, y, xerr=sx or None, yerr=sy or None, color=color, marker=MARKERS[k % len(MARKERS)],
                            markersize=8, markerfacecolor=(*to_rgb(color), 0.3), markeredgewidth=1.5,
                            elinewidth=0.8, capsize=2)
        ax.set_xlabel("defender error %")
        ax.set_ylabel("adversary error %")
        ax.set_title(f"{setting_title(setting, rows)}\n{thief}, {budget_text(mine[0]['budget'])} "
                     "queries", fontsize=9)
        ax.grid(alpha=0.3)
    _seeds_note(fig, results)
    _figure_legend(fig, [Line2D([], [], color=f"C{i}", lw=2, label=v) for i, v in enumerate(victims)],
                   [Line2D([], [], color="0.3", marker=MARKERS[k % len(MARKERS)], linestyle="none",
                           markerfacecolor="0.8", label=f"defense: {d}") for k, d in enumerate(defenses)])
    return _save(fig, path)


def plot_budget(results: dict[str, Any], path: Path) -> Path | None:
    rows = results["attacks"]
    settings = attack_settings(rows)
    defenses = list(dict.fromkeys(r["defense_label"] for r in rows))
    if not settings:
        return None
    victims = victim_labels(rows)  # one colour and marker per victim across all panels
    thieves = [t for t in THIEF_STYLES if any(r["thief"] == t for r in rows)]
    n_series = len(victims) * len(thieves)
    fig, axes = _figure(len(defenses), len(settings), width=4.2, height=3.4)
    for row, setting in enumerate(settings):
        mine = _of_setting(rows, setting)
        budgets = sorted({r["budget"] for r in mine})
        for col, d in enumerate(defenses):
            ax = axes[row, col]
            here = [r for r in mine if r["defense_label"] == d]
            if not here:  # the config does not run this attack against this defense
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{setting_title(setting, rows)}\ndefense: {d}\nnot run", ha="center",
                        va="center", fontsize=8, color="0.5", transform=ax.transAxes)
                continue
            for i, v in enumerate(victims):
                for j, thief in enumerate(thieves):
                    line = [r for r in here if r["victim"] == v and r["thief"] == thief]
                    if not line:
                        continue
                    xs = sorted({r["budget"] for r in line})
                    stats = [mean_sd(100 * r["adversary_accuracy"] for r in line if r["budget"] == b)
                             for b in xs]
                    shift = DODGE ** (i * len(thieves) + j - (n_series - 1) / 2)
                    ax.errorbar([x * shift for x in xs], [s[0] for s in stats],
                                yerr=[s[1] or 0.0 for s in stats], linestyle=THIEF_STYLES[thief],
                                marker=MARKERS[i % len(MARKERS)], color=f"C{i}", capsize=2)
            _budget_axis(ax, budgets, DODGE ** ((n_series - 1) / 2))
            ax.set_xlabel("query budget" + (" (a single budget)" if len(budgets) == 1 else ""))
            ax.set_ylabel("adversary accuracy %")
            ax.set_title(f"{setting_title(setting, rows)}\ndefense: {d}", fontsize=8)
            ax.grid(alpha=0.3)
    _seeds_note(fig, results)
    _figure_legend(fig, [Line2D([], [], color=f"C{i}", marker=MARKERS[i % len(MARKERS)], label=v)
                         for i, v in enumerate(victims)]
                   + [Line2D([], [], color="0.3", linestyle=THIEF_STYLES[t], label=f"{t} thief")
                      for t in thieves])
    return _save(fig, path)


def make_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """Draw every plot the results allow into ``folder``; returns the files written."""
    folder = Path(folder)
    drawn = [plot_error_vs_alpha(results, folder / "error_vs_alpha.png"),
             plot_kl_vs_alpha(results, folder / "kl_vs_alpha.png"),
             plot_tradeoff(results, folder / "tradeoff.png"),
             plot_budget(results, folder / "budget.png")]
    return [p for p in drawn if p is not None]


__all__ = ["budget_text", "make_plots", "plot_budget", "plot_error_vs_alpha", "plot_kl_vs_alpha",
           "plot_tradeoff"]
