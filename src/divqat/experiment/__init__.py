"""Experiments: one config (YAML or a shipped preset) from nothing to the paper's tables.

    >>> from divqat.experiment import load_preset, run_experiment
    >>> results = run_experiment(load_preset("smoke"), "runs/smoke")   # OUT/report.md, plots, CSV

``config`` parses and validates the YAML; ``cache`` keys and stores the stages; ``runner`` plans
and runs them (resuming what an interrupted run finished); ``report`` and ``plots`` turn
``results.json`` into ``report.md`` and PNGs (``divqat report DIR`` rebuilds them).
"""

from divqat.experiment.config import (
    ExperimentConfig,
    load_config,
    load_preset,
    parse_config,
    preset_names,
)
from divqat.experiment.report import build_report, main_table
from divqat.experiment.results import load_results
from divqat.experiment.runner import plan_stages, run_experiment

__all__ = [
    "ExperimentConfig",
    "build_report",
    "load_config",
    "load_preset",
    "load_results",
    "main_table",
    "parse_config",
    "plan_stages",
    "preset_names",
    "run_experiment",
]
