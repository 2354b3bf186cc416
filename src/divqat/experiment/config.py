"""Experiment configuration: a YAML file (or a preset shipped with divqat) parsed into dataclasses.

Every error is one ``ConfigError`` line that names the key by its dotted path
(``attacks[1].budgets``) and what is allowed there. The schema, with the defaults::

    name: default                # names the output folder (runs/NAME) and the report
    seeds: [0]                   # every victim, defense and thief is run once per seed; the
                                 # report gives mean ± sd over seeds and paired 95 % CIs
    victim:
      dataset: fashion-mnist     # a registered dataset (`divqat train --help` lists them), or
                                 # a class subset of one: fashion-mnist[0-4] (relabelled 0..4)
      arch: resnet8              # a built-in architecture, torchvision:NAME, timm:NAME or
                                 # package.module:function (your own factory)
      image_size: null           # image-folder: H or HxW (resize + center crop; default 32x32)
      weights: null              # your trained model's weights (.pt state dict or .safetensors):
                                 # the fp32 teacher is imported from them instead of trained
      mean: null                 # with weights: the normalization it was trained with (one
      std: null                  # value per channel); null: the training images' statistics
      limit: null                # train on the first N training images only
      holdout: 0                 # keep the last N training images out of every victim: the
                                 # "holdout" transfer set (unseen, in-distribution)
      batch_size: 128
      target: x86                # int8 scheme: x86 (inductor, oneDNN) or edge (XNNPACK: every
                                 # int8 victim is exported to a .pte and attacked as the ExecuTorch
                                 # runtime runs it, and the file-copy thief is measured too)
    fp32:    {epochs: 10, lr: 0.1, seed: null,     # seed null: one teacher per run seed
              precision: fp32}           # bf16: autocast where the CPU has it (fp32 elsewhere)
    qat:     {epochs: 1, lr: 0.01, precision: fp32}
    divqat:  {alphas: [2.0], divergence: kl, cap: 0.15, ramp: 0.0, temperature: 1.0,
              epochs: 1, lr: 0.01, precision: fp32,  # unset: kl, cap 0.15; a divergence given
                                         # without a cap: uncapped
                                         # cap may be a list: a grid axis (alphas x caps)
              divergence_on: in, outliers: synth, distill: 0.0,  # in = the paper's DivQAT
              variants: []}      # more DivQAT victims: mappings of the keys above (not variants)
                                 # overriding the section's, plus name (divqat-..., the label);
                                 # e.g. {name: divqat-out, divergence_on: out, cap: 0.5}
    defenses:                    # "none" is always included
      - none
      - {name: dcp, params: {beta: [0.3, 0.5]}}     # a list is a grid axis
      - {name: mad, victims: [qat]}  # behind these victims only (qat, divqat or a variant's
                                     # name; default: every victim)
    attacks:
      - name: knockoff
        params: {}               # the attack's own parameters (`divqat attacks`)
        transfer: [holdout, mnist]                  # holdout or NAME[:SPLIT]; none if data-free
        labels_only: [false, true]
        budgets: [500, 2000, 10000]                 # one surrogate per budget
        surrogate: {arch: resnet8, epochs: 30, batch_size: 128, lr: 0.1,
                    weight_decay: 0.0005, temperature: 1.0,
                    min_steps: 0,            # at least this many SGD steps per surrogate
                    precision: fp32,         # bf16: autocast where the CPU has it
                    eval_precision: fp32}    # bf16: the test split under autocast, BN folded
        defenses: null           # restrict to these defense names (default: every defense)
        watermark: null          # this attack's own watermark: {rate: ...} (its rates instead of
                                 # the top level's), or false: none (default: the top level's)
    detectors: []                # extraction detectors watching every thief's stream (`divqat
                                 # detectors`): a name, or {name, params, target_far: 0.05,
                                 # streams: 20, benign_streams: 20}; each is calibrated per victim
                                 # for target_far on `streams` benign streams of the largest
                                 # budget, its false-alarm rate measured on `benign_streams` others
    numerics: {threads: 1}       # torch threads of every stage, under every executor: CPU
                                 # training is reproducible only at a fixed thread count
    watermark:                   # absent: no watermark, no verify stage (the default)
      rate: 0.005                # DAWN's watermark on every thief's answers (a list: a grid axis);
                                 # each budget is then its own thief, its surrogate saved
      significance: 1.0e-6       # a surrogate is verified when its p-value is below this
      independent: []            # more never-stolen models for the false claims, besides the
                                 # other seeds' victims: {arch, seed}, trained as the fp32 teacher
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from divqat.attacks import ATTACKS, SurrogateTraining, create_attack
from divqat.checks import check_bool, check_choice, check_int, check_number
from divqat.data import dataset_names
from divqat.defenses import DEFENSES, NO_DEFENSE
from divqat.detectors import DETECTORS, check_detector
from divqat.errors import ConfigError, DivqatError
from divqat.experiment.numerics import Numerics
from divqat.models import check_arch
from divqat.ownership import DEFAULT_RATE, SIGNIFICANCE
from divqat.pipelines.attack import HOLDOUT, parse_transfer
from divqat.pipelines.defense_models import check_defense
from divqat.pipelines.thieves import check_known_defense
from divqat.registry import params_text
from divqat.train.losses import RECOMMENDED, DivQATSettings, divqat_settings
from divqat.train.trainer import PRECISIONS

_REQUIRED = object()


# ---------------------------------------------------------------- the keys of each mapping

# The keys each mapping of a config accepts, with what each means, by the mapping's path ("" is
# the top level, "[]" an entry of a list). The validator takes its allowed keys from here
# (``_keys``) and the docs' config reference is generated from it, so the two cannot drift; the
# defaults are those ``parse_config`` fills in.
SCHEMA: dict[str, dict[str, str]] = {
    "": {"name": "names the output folder (runs/NAME) and the report",
         "seeds": "every victim, defense and thief runs once per seed; the report gives mean ± sd "
                  "over seeds and paired 95 % CIs",
         "victim": "the victims' data and architecture", "fp32": "the fp32 teacher's training",
         "qat": "the QAT victim's fine-tuning", "divqat": "the DivQAT victims",
         "defenses": "defenses with parameter grids (none is always included)",
         "attacks": "extraction attacks, each run against every victim x defense",
         "detectors": "extraction detectors watching every thief's stream",
         "numerics": "what every stage computes under, whichever executor runs it",
         "watermark": "DAWN's watermark on the victims' answers to every thief, its stolen "
                      "surrogates saved and verified (absent: none)"},
    "victim": {"dataset": "a registered dataset, or a class subset of one: fashion-mnist[0-4]",
               "arch": "a built-in architecture, torchvision:NAME, timm:NAME or "
                       "package.module:function (your own factory)",
               "image_size": "image-folder: H or HxW, resize + center crop (default: 32x32)",
               "weights": "your trained model's weights (.pt state dict or .safetensors): the fp32 "
                          "teacher is imported from them instead of trained",
               "mean": "with weights: the normalization mean it was trained with (default: the "
                       "training images')",
               "std": "with weights: the normalization std it was trained with",
               "limit": "train on the first N training images only",
               "holdout": "keep the last N training images out of every victim: the holdout "
                          "transfer set (unseen, in-distribution)",
               "batch_size": "training batch size",
               "target": "int8 scheme: x86 (inductor, oneDNN) or edge (XNNPACK: every int8 victim "
                         "is exported to a .pte, attacked through ExecuTorch, and copied)"},
    "fp32": {"epochs": "training epochs", "lr": "peak learning rate (one-cycle)",
             "seed": "null: one teacher per run seed; an integer: one teacher for every seed",
             "precision": "bf16: autocast where the CPU has native bf16 (fp32 elsewhere)"},
    "qat": {"epochs": "fine-tuning epochs", "lr": "peak learning rate (cosine)",
            "precision": "bf16: the fake-quantized forward passes under autocast where the CPU "
                         "has native bf16 (fp32 elsewhere)"},
    "divqat": {"alphas": "the divergence weights: one victim per alpha (a grid axis)",
               "divergence": "kl (the paper's), reverse-kl, js or tail-kl",
               "cap": "stop pushing a sample past this divergence (0: no cap); a list is a grid "
                      "axis (alphas x caps)",
               "ramp": "alpha grows from 0 over this fraction of the steps",
               "temperature": "softmax temperature of the divergence",
               "divergence_on": "in (the training images, the paper's), out (outliers) or both",
               "outliers": "synth, synth:KIND[+KIND] or an unlabeled dataset NAME[:SPLIT]",
               "distill": "with divergence_on out: weight of a KL pull toward the teacher on the "
                          "training images",
               "epochs": "fine-tuning epochs", "lr": "peak learning rate (cosine)",
               "precision": "bf16: the student's and the teacher's forward passes under autocast "
                            "where the CPU has native bf16 (fp32 elsewhere)",
               "variants": "more DivQAT victims: mappings of the keys above plus name"},
    "divqat.variants[]": {"alphas": "as the section's", "divergence": "as the section's",
                          "cap": "one cap (a changed divergence without a cap runs uncapped)",
                          "ramp": "as the section's", "temperature": "as the section's",
                          "divergence_on": "as the section's", "outliers": "as the section's",
                          "distill": "as the section's", "epochs": "as the section's",
                          "lr": "as the section's", "precision": "as the section's",
                          "name": "the label of its victims (starts with divqat; default "
                                  "divqat-<divergence_on>)"},
    "defenses[]": {"name": "a defense (`divqat defenses`); an entry may be the bare name",
                   "params": "the defense's parameters; a list is a grid axis",
                   "misinformation_epochs": "adaptive-misinformation: epochs of its model",
                   "victims": "serve only these victims behind it: qat, divqat (the section's "
                              "own) or a variant's name (default: every victim)"},
    "attacks[]": {"name": "an attack (`divqat attacks`)",
                  "params": "the attack's own parameters",
                  "transfer": "holdout or NAME[:SPLIT], one or a list; not for data-free attacks",
                  "labels_only": "false, true or both: the black box answers labels only",
                  "budgets": "query budgets: one surrogate per budget",
                  "surrogate": "how the surrogates train",
                  "defenses": "run behind these defense names only (default: every defense)",
                  "watermark": "this attack's watermark: {rate: ...} instead of the top level's, "
                               "or false for none (default: the top level's)"},
    "attacks[].watermark": {"rate": "fraction of this thief's answers marked; a list is a grid axis"},
    "attacks[].surrogate": {"arch": "surrogate architecture", "epochs": "training epochs",
                            "batch_size": "batch size", "lr": "peak learning rate (cosine)",
                            "weight_decay": "SGD weight decay",
                            "temperature": "temperature of the soft cross-entropy",
                            "min_steps": "at least this many SGD steps per surrogate",
                            "precision": "bf16: autocast where the CPU has it",
                            "eval_precision": "bf16: the test split under autocast with BatchNorm "
                                              "folded (fp32 where the CPU lacks native bf16)"},
    "detectors[]": {"name": "a detector (`divqat detectors`); an entry may be the bare name",
                    "params": "the detector's parameters (not its threshold: calibrated)",
                    "target_far": "the false-alarm rate its threshold is calibrated for",
                    "streams": "benign streams it is calibrated on (as long as the largest budget)",
                    "benign_streams": "other honest clients its false-alarm rate is measured on"},
    "numerics": {"threads": "torch threads of every stage's training and evaluation, under every "
                            "executor (CPU training is reproducible only at a fixed thread count; "
                            "a Ray worker reserves as many CPUs unless --cpus-per-stage says)"},
    "watermark": {"rate": "fraction of every thief's answers marked, in (0, 0.5] (default: 0.005, "
                          "DAWN's); a list is a grid axis: every watermarked thief once per rate",
                  "significance": "a stolen surrogate (or an independent model) is verified when "
                                  "its p-value is below this (default: 1e-6)",
                  "independent": "more independent models for the false claims, besides the other "
                                 "seeds' victims: mappings of arch and seed, each trained as the "
                                 "fp32 teacher on the victims' training images, never stolen from"},
    "watermark.independent[]": {"arch": "its architecture (as victim.arch)",
                                "seed": "its training seed"},
}


def _keys(path: str) -> tuple[str, ...]:
    """The keys the mapping at ``path`` (a ``SCHEMA`` key) accepts."""
    return tuple(SCHEMA[path])


# ---------------------------------------------------------------- the parsed config

@dataclass(frozen=True)
class VictimSpec:
    """The victims' data and architecture, shared by the fp32 teacher and every int8 victim."""

    dataset: str = "fashion-mnist"
    arch: str = "resnet8"
    limit: int | None = None
    holdout: int = 0
    batch_size: int = 128
    target: str = "x86"
    # image-folder's (H, W), already folded into ``dataset`` (``image-folder@96``), kept for the record.
    image_size: tuple[int, int] | None = None
    # The user's own model (``divqat import``): the teacher comes from this file, not training.
    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """Epochs, peak learning rate and precision of one training mode; ``seed`` only for the fp32
    teacher (None: one teacher per run seed; an integer: one teacher shared by every seed);
    precision "bf16": autocast where the CPU has it."""

    epochs: int
    lr: float
    seed: int | None = None
    precision: str = "fp32"


@dataclass(frozen=True)
class DivQATSpec:
    """The DivQAT victims: one per alpha (and per cap, when ``caps`` holds several), all with
    the same objective otherwise (``objective``, whose own alpha is ignored and whose cap is the
    first of ``caps``), fine-tuned for ``epochs`` at peak ``lr``."""

    alphas: tuple[float, ...] = (RECOMMENDED.alpha,)
    objective: DivQATSettings = RECOMMENDED
    epochs: int = 1
    lr: float = 0.01
    caps: tuple[float | None, ...] = ()  # empty: the objective's cap
    precision: str = "fp32"  # bf16: autocast where the CPU has it (student and teacher)
    # The variants: more DivQAT victims, each a DivQATSpec of its own labelled "<name> a=<alpha>"
    # (the section's name is "divqat"); the out-of-distribution DivQAT is in ``objective``.
    name: str = "divqat"
    variants: tuple[DivQATSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.caps:
            object.__setattr__(self, "caps", (self.objective.cap,))

    def settings(self, alpha: float, cap: float | None | bool = False) -> DivQATSettings:
        """The objective at ``alpha`` (and ``cap``, when given)."""
        changes: dict[str, Any] = {"alpha": alpha}
        if cap is not False:
            changes["cap"] = cap
        return dataclasses.replace(self.objective, **changes)

    def grid(self) -> list[DivQATSettings]:
        """Every DivQAT victim's settings: alphas x caps, alpha first."""
        return [self.settings(alpha, cap) for alpha in self.alphas for cap in self.caps]

    def __getattr__(self, name: str) -> Any:
        # The objective's fields read through the spec (``spec.cap``, ``spec.divergence_on``).
        if name != "objective" and name in DivQATSettings.USER_FIELDS:
            return getattr(self.objective, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def victims(self) -> list[tuple[DivQATSpec, DivQATSettings]]:
        """(spec, settings) of every DivQAT victim: the section's alphas x caps, then each
        variant's alphas."""
        return [(self, x) for x in self.grid()] + [(v, x) for v in self.variants for x in v.grid()]


@dataclass(frozen=True)
class DetectorSpec:
    """An extraction detector of the experiment: calibrated per victim for ``target_far`` on
    ``streams`` benign streams (``divqat calibrate``), its false-alarm rate then measured on
    ``benign_streams`` other honest clients (test split and holdout), and watching every thief."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    target_far: float = 0.05
    streams: int = 20
    benign_streams: int = 20


@dataclass(frozen=True)
class DefenseSpec:
    """A defense and its parameter grid: a list value is an axis of the grid."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    misinformation_epochs: int = 5
    # Only these victims behind it (``victim_kind``: qat, divqat, a variant's name); None: all.
    victims: tuple[str, ...] | None = None

    def serves(self, victim: str) -> bool:
        """Whether the victim of kind ``victim`` (``victim_kind``) is served behind it."""
        return self.victims is None or victim in self.victims

    def grid(self) -> list[dict[str, Any]]:
        """Every parameter setting of the grid, in the order written."""
        keys = list(self.params)
        axes = [v if isinstance(v, list) else [v] for v in self.params.values()]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


@dataclass(frozen=True)
class AttackSpec:
    """One attack run against every victim x defense setting, for each transfer set and
    label-only flag; ``budgets`` share one attack stage (one surrogate per budget).
    ``watermark``: the rates of DAWN's watermark on its answers (None: not watermarked); a
    watermarked thief is one stage per rate and budget, each budget its own thief and key."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    transfer: tuple[str | None, ...] = (None,)
    labels_only: tuple[bool, ...] = (False,)
    budgets: tuple[int, ...] = (1000,)
    surrogate: SurrogateTraining = field(default_factory=SurrogateTraining)
    defenses: tuple[str, ...] | None = None
    watermark: tuple[float, ...] | None = None


@dataclass(frozen=True)
class IndependentSpec:
    """A model trained as the fp32 teacher on the victims' training images, with its own
    architecture and seed, and never stolen from: a suspect that must not be verified."""

    arch: str
    seed: int


@dataclass(frozen=True)
class WatermarkSpec:
    """``watermark:``: DAWN's watermark on the thieves' answers and the verification of what they
    stole (``rates``: the top level's rates, which attacks without their own take; ``significance``
    of a verdict; ``independent``: extra never-stolen models)."""

    rates: tuple[float, ...] = (DEFAULT_RATE,)
    significance: float = SIGNIFICANCE
    independent: tuple[IndependentSpec, ...] = ()


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    seeds: tuple[int, ...]
    victim: VictimSpec
    fp32: TrainingSpec
    qat: TrainingSpec
    divqat: DivQATSpec
    defenses: tuple[DefenseSpec, ...]
    attacks: tuple[AttackSpec, ...]
    source: str = "<dict>"
    detectors: tuple[DetectorSpec, ...] = ()
    numerics: Numerics = field(default_factory=Numerics)
    # Set when any attack is watermarked (the top level's section, or its defaults).
    watermark: WatermarkSpec | None = None

    def stream_length(self) -> int:
        """The longest thief's stream (the largest budget): the length of the benign streams a
        detector is calibrated and measured on."""
        return max((b for a in self.attacks for b in a.budgets), default=0)

    def transfer_specs(self) -> list[str]:
        """Every transfer set an attack needs, once each, in config order."""
        seen = dict.fromkeys(t for a in self.attacks for t in a.transfer if t is not None)
        return list(seen)


# ---------------------------------------------------------------- reading one mapping

def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Mapping:
    """One mapping of the YAML: refuses unknown keys, reads typed values; errors name the path."""

    def __init__(self, raw: Any, path: str, allowed: Sequence[str]) -> None:
        where = path or "the config"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(allowed)}; got "
                              f"{_shown(raw)}")
        for key in raw:
            if key not in allowed:
                raise ConfigError(f"{_at(path, str(key))}: unknown key; allowed: {', '.join(allowed)}")
        self.raw, self.path = raw, path

    def where(self, key: str) -> str:
        return _at(self.path, key)

    def get(self, key: str, default: Any) -> Any:
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.where(key)}: required")
        return default

    def int(self, key: str, default: Any, low: int, optional: bool = False) -> int | None:
        return _int(self.get(key, default), self.where(key), low, optional)

    def number(self, key: str, default: Any, low: float | None = None, low_open: bool = False,
               high: float | None = None, optional: bool = False) -> float | None:
        return _number(self.get(key, default), self.where(key), low, low_open, high, optional)

    def choice(self, key: str, default: Any, choices: Sequence[str]) -> str:
        return _choice(self.get(key, default), self.where(key), choices)

    def list(self, key: str, default: Any, item: Callable[[Any, str], Any]) -> tuple:
        """A list (a single value counts as a list of one), each item read by ``item``."""
        value = self.get(key, default)
        where = self.where(key)
        values = value if isinstance(value, list | tuple) else [value]
        if not values:
            raise ConfigError(f"{where}: give at least one value")
        return tuple(item(v, _at(where, i)) for i, v in enumerate(values))


def _shown(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


# One line each over ``divqat.checks``, so a config error names its key like every other error.

def _int(value: Any, where: str, low: int, optional: bool = False) -> int | None:
    return check_int(where, "", value, low=low, optional=optional)


def _number(value: Any, where: str, low: float | None = None, low_open: bool = False,
            high: float | None = None, optional: bool = False) -> float | None:
    return check_number(where, "", value, low=low, low_open=low_open, high=high, optional=optional)


def _bool(value: Any, where: str) -> bool:
    return check_bool(where, "", value)


def _choice(value: Any, where: str, choices: Sequence[str]) -> str:
    return check_choice(where, "", value, choices)


def _wrapped(where: str, check: Callable[[], Any]) -> Any:
    """Run a library validator, re-raising its error as one line that names the config key."""
    try:
        return check()
    except DivqatError as e:
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------- the sections

TOP_KEYS = _keys("")


def parse_config(raw: Any, source: str = "<dict>") -> ExperimentConfig:
    """Validate a loaded YAML document and return the ``ExperimentConfig``.

    Every defense and attack is built once with its real parameters (a model-backed defense
    without its model), so a bad value anywhere is one line here, before anything trains."""
    top = _Mapping(raw, "", TOP_KEYS)
    name = top.get("name", Path(source).stem if source != "<dict>" else "experiment")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name: must be a non-empty string usable as a folder name; got {name!r}")
    seeds = top.list("seeds", [0], lambda v, w: _int(v, w, 0))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: each seed once; got {list(seeds)}")
    victim = _victim(top.get("victim", {}))
    fp32 = _training(top.get("fp32", {}), "fp32", epochs=10, lr=0.1, with_seed=True)
    qat = _training(top.get("qat", {}), "qat", epochs=1, lr=0.01)
    divqat = _divqat(top.get("divqat", {}))
    defenses = _defenses(top.get("defenses", []), ["qat", *(v.name for v in (divqat, *divqat.variants))])
    watermark = _watermark(top.raw["watermark"]) if top.raw.get("watermark") is not None else None
    attacks = _attacks(top.get("attacks", []), victim, [d.name for d in defenses], watermark)
    _outliers_are_not_transfer_sets(divqat, attacks)
    detectors = _detectors(top.get("detectors", []), attacks)
    numerics = _numerics(top.get("numerics", {}))
    if watermark is None and any(a.watermark for a in attacks):
        watermark = WatermarkSpec()  # an attack's own watermark: verified at the defaults
    return ExperimentConfig(name=name, seeds=seeds, victim=victim, fp32=fp32, qat=qat, divqat=divqat,
                            defenses=defenses, attacks=attacks, source=source, detectors=detectors,
                            numerics=numerics, watermark=watermark)


def _rates(m: _Mapping, default: Any) -> tuple[float, ...]:
    rates = m.list("rate", default, lambda v, w: _number(v, w, 0, low_open=True, high=0.5))
    if len(set(rates)) != len(rates):
        raise ConfigError(f"{m.where('rate')}: each rate once; got {list(rates)}")
    return rates


def _watermark(raw: Any) -> WatermarkSpec:
    m = _Mapping(raw, "watermark", _keys("watermark"))
    entries = m.get("independent", [])
    if not isinstance(entries, list):
        raise ConfigError(f"watermark.independent: expected a list of mappings (keys: arch, seed); "
                          f"got {_shown(entries)}")
    independent: list[IndependentSpec] = []
    for i, entry in enumerate(entries):
        where = f"watermark.independent[{i}]"
        e = _Mapping(entry, where, _keys("watermark.independent[]"))
        arch = e.get("arch", _REQUIRED)
        spec = IndependentSpec(_wrapped(e.where("arch"), lambda a=arch: check_arch(a)), e.int("seed", _REQUIRED, 0))
        if spec in independent:
            raise ConfigError(f"{where}: {spec.arch} seed {spec.seed} is listed twice")
        independent.append(spec)
    return WatermarkSpec(rates=_rates(m, [DEFAULT_RATE]),
                         significance=m.number("significance", SIGNIFICANCE, 0, low_open=True, high=0.5),
                         independent=tuple(independent))


def _attack_watermark(m: _Mapping, top: WatermarkSpec | None) -> tuple[float, ...] | None:
    """An attack's watermark rates: its own ``{rate: ...}``, none for ``false``, else the top
    level's (None without one)."""
    raw = m.raw.get("watermark")
    if raw is None:
        return None if top is None else top.rates
    if raw is False:
        return None
    if raw is True:
        raise ConfigError(f"{m.where('watermark')}: give {{rate: ...}} (or false for none); true "
                          "says no rate")
    own = _Mapping(raw, m.where("watermark"), _keys("attacks[].watermark"))
    return _rates(own, list(top.rates) if top is not None else [DEFAULT_RATE])


def _numerics(raw: Any) -> Numerics:
    m = _Mapping(raw, "numerics", _keys("numerics"))
    return Numerics(threads=m.int("threads", Numerics.threads, 1))


def _victim(raw: Any) -> VictimSpec:
    m = _Mapping(raw, "victim", _keys("victim"))
    dataset = _dataset(m.get("dataset", "fashion-mnist"), m.where("dataset"), dataset_names())
    image_size = None
    if m.get("image_size", None) is not None:
        from divqat.data import parse_image_size, sized_name

        image_size = _wrapped(m.where("image_size"), lambda: parse_image_size(str(m.get("image_size", None))))
        dataset = _wrapped(m.where("image_size"), lambda: sized_name(dataset, image_size))
    arch = m.get("arch", "resnet8")
    weights = m.get("weights", None)
    if weights is not None:
        if not isinstance(weights, str) or not Path(weights).expanduser().is_file():
            raise ConfigError(f"{m.where('weights')}: no weights file at {weights!r}")
        weights = str(Path(weights).expanduser().resolve())
    mean, std = (_floats(m.get(k, None), m.where(k)) for k in ("mean", "std"))
    if (mean is None) != (std is None) or (mean is not None and weights is None):
        raise ConfigError(f"{m.where('mean')}: give mean and std together, and only with weights")
    return VictimSpec(dataset=dataset,
                      arch=_wrapped(m.where("arch"), lambda: check_arch(arch)),
                      image_size=image_size, weights=weights, mean=mean, std=std,
                      limit=m.int("limit", None, 1, optional=True),
                      holdout=m.int("holdout", 0, 0),
                      batch_size=m.int("batch_size", 128, 1),
                      target=m.choice("target", "x86", ("x86", "edge")))


def _floats(value: Any, where: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: expected a number or a list of numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _dataset(value: Any, where: str, names: Sequence[str]) -> str:
    """A registered dataset, optionally a class subset (``fashion-mnist[0-4]``): its canonical name."""
    from divqat.data import dataset_spec

    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a dataset name (one of: {', '.join(names)}), optionally "
                          f"with a class subset such as fashion-mnist[0-4]; got {value!r}")
    return _wrapped(where, lambda: dataset_spec(value).name)


def _training(raw: Any, path: str, epochs: int, lr: float, with_seed: bool = False) -> TrainingSpec:
    m = _Mapping(raw, path, _keys(path))
    seed = m.int("seed", None, 0, optional=True) if with_seed else None
    precision = m.choice("precision", "fp32", PRECISIONS)
    return TrainingSpec(epochs=m.int("epochs", epochs, 1), lr=m.number("lr", lr, 0, low_open=True),
                        seed=seed, precision=precision)


# The DivQAT objective's own fields (all but alpha, which is the grid axis ``alphas``).
_OBJECTIVE_KEYS = tuple(k for k in DivQATSettings.USER_FIELDS if k != "alpha")


def _divqat(raw: Any, path: str = "divqat", base: DivQATSpec | None = None) -> DivQATSpec:
    """The divqat section, or (with ``base``) one of its variants: unset keys take the section's."""
    keys = _keys("divqat" if base is None else "divqat.variants[]")
    m = _Mapping(raw, path, keys)
    d = base or DivQATSpec()
    given = {k: m.raw[k] for k in _OBJECTIVE_KEYS if m.raw.get(k) is not None}
    caps_given = given.pop("cap", None) if base is None else None
    if base is None:
        # Unset fields take the recommended setting, as `divqat train` does (DivQATSettings checks
        # each value and names it: divqat.cap, divqat.ramp, ...). A list of caps is a grid axis.
        cap_list = caps_given if isinstance(caps_given, list) else [caps_given]
        if not cap_list:
            raise ConfigError("divqat.cap: give at least one value")
        settings = [divqat_settings(**given, cap=c) for c in cap_list]
        caps = tuple(x.cap for x in settings)
        if len(set(caps)) != len(caps):
            raise ConfigError(f"divqat.cap: each cap once; got {cap_list}")
        objective = settings[0]
    else:
        # A variant's unset fields take the section's; a divergence it changes without a cap of
        # its own runs uncapped (the section's cap belongs to the section's divergence). A
        # variant has one cap (the grid over caps is the section's).
        if "divergence" in given and given["divergence"] != d.objective.divergence and "cap" not in given:
            given["cap"] = None
        if given.get("cap") == 0:
            given["cap"] = None
        objective = _wrapped(path, lambda: dataclasses.replace(d.objective, **given))
        caps = (objective.cap,)
    on = objective.divergence_on
    spec = DivQATSpec(
        alphas=m.list("alphas", list(d.alphas), lambda v, w: _number(v, w, 0, low_open=True)),
        objective=objective, epochs=m.int("epochs", d.epochs, 1), lr=m.number("lr", d.lr, 0, low_open=True),
        caps=caps, precision=m.choice("precision", d.precision, PRECISIONS),
        name=m.get("name", f"divqat-{on}" if base is not None else "divqat"))
    if not isinstance(spec.name, str) or not spec.name.startswith("divqat") or "|" in spec.name:
        raise ConfigError(f"{m.where('name')}: must be a label starting with 'divqat' (e.g. divqat-out); "
                          f"got {spec.name!r}")
    if len(set(spec.alphas)) != len(spec.alphas):
        raise ConfigError(f"{m.where('alphas')}: each alpha once; got {list(spec.alphas)}")
    if base is not None:
        return spec
    variants = m.get("variants", [])
    if not isinstance(variants, list):
        raise ConfigError(f"divqat.variants: expected a list of mappings (keys: {', '.join(keys[:-1])}, "
                          f"name); got {_shown(variants)}")
    out = tuple(_divqat(v, f"divqat.variants[{i}]", spec) for i, v in enumerate(variants))
    names = [spec.name] + [v.name for v in out]
    for i, v in enumerate(out):
        if v.name in names[:i + 1]:
            raise ConfigError(f"divqat.variants[{i}].name: {v.name!r} already labels other DivQAT victims; "
                              "give each variant a distinct name (e.g. divqat-out-cap1)")
    return dataclasses.replace(spec, variants=out)


def _outliers_are_not_transfer_sets(divqat: DivQATSpec, attacks: tuple[AttackSpec, ...]) -> None:
    """A defense trained on the thief's own transfer set would measure memorization of those
    images, not protection against unseen foreign ones: refused (another split is allowed, and
    the report says that it is the same dataset)."""
    for i, v in enumerate((divqat, *divqat.variants)):
        where = "divqat.outliers" if i == 0 else f"divqat.variants[{i - 1}].outliers"
        for j, a in enumerate(attacks):
            if v.divergence_on != "in" and v.outliers in a.transfer:
                raise ConfigError(f"{where}: {v.outliers} is also attacks[{j}]'s transfer set; the outliers "
                                  "a defense trains on must not be the thief's queries (use another split "
                                  "or set, or synth)")


def _named_entries(raw: Any, section: str, keys: tuple[str, ...], names: Any, *,
                  shorthand: bool = True, grid: bool = False):
    """The entries of a list section (``defenses``, ``detectors``, ``attacks``): for each,
    (``where``, its ``_Mapping``, its checked ``name``, its ``params`` mapping). With
    ``shorthand`` an entry may be a bare name; ``grid``: params may hold lists (the message
    says so)."""
    if not isinstance(raw, list):
        shape = "a name, or a mapping with" if shorthand else "mappings with"
        raise ConfigError(f"{section}: expected a list of {section} ({shape} {', '.join(keys)}); "
                          f"got {_shown(raw)}")
    for i, entry in enumerate(raw):
        where = f"{section}[{i}]"
        if shorthand and isinstance(entry, str):
            entry = {"name": entry}
        m = _Mapping(entry, where, keys)
        name = m.choice("name", _REQUIRED, names)
        params = m.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params: expected a mapping of parameter: value"
                              f"{' (a list for a grid)' if grid else ''}; got {_shown(params)}")
        yield where, m, name, params


def _defenses(raw: Any, victims: Sequence[str]) -> tuple[DefenseSpec, ...]:
    out: list[DefenseSpec] = []
    for where, m, name, params in _named_entries(raw, "defenses", _keys("defenses[]"),
                                                 DEFENSES.names(), grid=True):
        only = m.get("victims", None)
        if only is not None:
            if name == NO_DEFENSE:
                raise ConfigError(f"{where}.victims: every victim is served behind none (the "
                                  "reference of every table); remove the key")
            only = m.list("victims", None, lambda v, w: _choice(v, w, sorted(set(victims))))
        spec = DefenseSpec(name, dict(params), m.int("misinformation_epochs", 5, 1), only)
        for setting in spec.grid():
            _wrapped(f"{where}.params", lambda n=name, s=setting: check_defense(n, s))
        out.append(spec)
    settings = [(d.name, s) for d in out for s in d.grid()]
    for j, (name, s) in enumerate(settings):
        if (name, s) in settings[:j]:
            raise ConfigError(f"defenses: {name} {params_text(s) or '(defaults)'} is listed twice")
    if not any(d.name == NO_DEFENSE for d in out):
        out.insert(0, DefenseSpec(NO_DEFENSE))  # the undefended victim is the reference of every table
    return tuple(out)


def _detectors(raw: Any, attacks: tuple[AttackSpec, ...]) -> tuple[DetectorSpec, ...]:
    out: list[DetectorSpec] = []
    for where, m, name, params in _named_entries(raw, "detectors", _keys("detectors[]"),
                                                 DETECTORS.names()):
        cls = _wrapped(f"{where}.params", lambda n=name, p=params: check_detector(n, dict(p)))
        if cls.threshold_param in params:
            raise ConfigError(f"{where}.params.{cls.threshold_param}: set by the calibration for "
                              "target_far (leave it out)")
        spec = DetectorSpec(name, dict(params), m.number("target_far", 0.05, 0, high=0.5),
                            m.int("streams", 20, 1), m.int("benign_streams", 20, 1))
        if any(d.name == name for d in out):
            raise ConfigError(f"{where}: {name} is listed twice")
        out.append(spec)
    if out and not attacks:
        raise ConfigError("detectors: they watch the attacks' query streams; the config has no attack")
    return tuple(out)


def _attacks(raw: Any, victim: VictimSpec, defense_names: list[str],
             watermark: WatermarkSpec | None = None) -> tuple[AttackSpec, ...]:
    out = []
    for where, m, name, params in _named_entries(raw, "attacks", _keys("attacks[]"), ATTACKS.names(),
                                                 shorthand=False):
        # The built attack answers for itself (a Sybil thief's needs are its inner attack's).
        thief = _wrapped(f"{where}.params", lambda n=name, p=params: create_attack(n, **p))
        # A recovery thief's own defense, checked here rather than in every stage it would fail;
        # without one it inverts the defense it is served behind (each a checked defense).
        _wrapped(f"{where}.params", lambda t=thief: check_known_defense(t, NO_DEFENSE, None))
        if thief.uses_transfer_set:
            transfer = m.list("transfer", _REQUIRED, lambda v, w: _transfer(v, w, victim))
            if len(set(transfer)) != len(transfer):
                raise ConfigError(f"{where}.transfer: each transfer set once; got {list(transfer)}")
        else:
            if m.get("transfer", None) is not None:
                raise ConfigError(f"{where}.transfer: attack {name!r} is data-free and takes no "
                                  "transfer set; remove the key")
            transfer = (None,)
        labels_only = m.list("labels_only", [False], _bool)
        if len(set(labels_only)) != len(labels_only):
            raise ConfigError(f"{where}.labels_only: each of true/false once; got {list(labels_only)}")
        if thief.soft_only and True in labels_only:
            raise ConfigError(f"{where}.labels_only: attack {name!r} needs posteriors; allowed: [false]")
        budgets = m.list("budgets", _REQUIRED, lambda v, w: _int(v, w, 1))
        if len(set(budgets)) != len(budgets):
            raise ConfigError(f"{where}.budgets: each budget once; got {list(budgets)}")
        only = m.get("defenses", None)
        if only is not None:
            only = m.list("defenses", None, lambda v, w: _choice(v, w, sorted(set(defense_names) | {"none"})))
        out.append(AttackSpec(name=name, params=dict(params), transfer=transfer, labels_only=labels_only,
                              budgets=tuple(sorted(budgets)),
                              surrogate=_surrogate(m.get("surrogate", {}), f"{where}.surrogate"),
                              defenses=only, watermark=_attack_watermark(m, watermark)))
    return tuple(out)


def _transfer(value: Any, where: str, victim: VictimSpec) -> str:
    if value == HOLDOUT and victim.holdout < 1:
        raise ConfigError(f"{where}: the {HOLDOUT!r} transfer set needs victim.holdout >= 1 "
                          "(training images kept out of every victim); set it, or name a dataset")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected {HOLDOUT!r} or NAME[:SPLIT]; got {value!r}")
    return _wrapped(where, lambda: parse_transfer(value))


def _surrogate(raw: Any, where: str) -> SurrogateTraining:
    m = _Mapping(raw, where, _keys("attacks[].surrogate"))
    given = {k: v for k, v in m.raw.items() if v is not None}
    # Checked here so that an error names the key: attacks[0].surrogate.epochs.
    return SurrogateTraining(**SurrogateTraining.check(given, where))


def divqat_fields(d: DivQATSpec, full: bool = False) -> dict[str, Any]:
    """A DivQAT section (or, ``full``, a variant) as config data; the section's out-of-distribution
    keys only when set, so the config.yaml of a run without them reads as before."""
    o = d.objective
    cap = [c or 0 for c in d.caps] if len(d.caps) > 1 else o.cap or 0
    out: dict[str, Any] = {"alphas": list(d.alphas), "divergence": o.divergence, "cap": cap,
                           "ramp": o.ramp, "temperature": o.temperature, "epochs": d.epochs, "lr": d.lr}
    if d.precision != "fp32":
        out["precision"] = d.precision
    if full or o.divergence_on != "in":
        out.update(divergence_on=o.divergence_on, outliers=o.outliers, distill=o.distill)
    return out



# ---------------------------------------------------------------- files and presets

def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror or e}") from None
    return parse_config(_yaml(text, str(path)), str(path))


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML ({problem})") from None


def _presets():
    return resources.files("divqat.experiment").joinpath("presets")


def preset_names() -> list[str]:
    """The presets shipped with divqat (``divqat run --preset NAME``)."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    return _presets().joinpath(f"{name}.yaml").read_text()


def load_preset(name: str) -> ExperimentConfig:
    """A preset shipped inside the package (``smoke``, ``default``, ``paper-cifar10``)."""
    return parse_config(_yaml(preset_text(name), f"preset {name}"), f"preset {name}")


def config_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config (defaults filled in) as plain data, loadable by ``parse_config``."""
    def defense(d: DefenseSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"name": d.name, "params": d.params}
        if DEFENSES.get(d.name).trains_model:
            out["misinformation_epochs"] = d.misinformation_epochs
        if d.victims is not None:
            out["victims"] = list(d.victims)
        return out

    def attack(a: AttackSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"name": a.name, "params": a.params}
        if a.transfer != (None,):
            out["transfer"] = list(a.transfer)
        out.update(labels_only=list(a.labels_only), budgets=list(a.budgets),
                   surrogate=a.surrogate.recipe())
        if a.defenses is not None:
            out["defenses"] = list(a.defenses)
        if config.watermark is not None:  # each attack's own, so that the file reads back the same
            out["watermark"] = {"rate": list(a.watermark)} if a.watermark else False
        return out

    v, d = config.victim, config.divqat
    return {
        "name": config.name, "seeds": list(config.seeds),
        "victim": {"dataset": v.dataset, "arch": v.arch, "limit": v.limit, "holdout": v.holdout,
                   "batch_size": v.batch_size, "target": v.target,
                   **({"weights": v.weights} if v.weights else {}),
                   **({"mean": list(v.mean), "std": list(v.std)} if v.mean else {})},
        "fp32": {"epochs": config.fp32.epochs, "lr": config.fp32.lr, "seed": config.fp32.seed,
                 **({"precision": config.fp32.precision} if config.fp32.precision != "fp32" else {})},
        "qat": {"epochs": config.qat.epochs, "lr": config.qat.lr,
                **({"precision": config.qat.precision} if config.qat.precision != "fp32" else {})},
        "divqat": {**divqat_fields(d),
                   **({"variants": [{"name": x.name, **divqat_fields(x, full=True)} for x in d.variants]}
                      if d.variants else {})},
        "defenses": [defense(x) for x in config.defenses],
        "attacks": [attack(x) for x in config.attacks],
        **({"detectors": [dataclasses.asdict(x) for x in config.detectors]} if config.detectors else {}),
        "numerics": dataclasses.asdict(config.numerics),
        **({"watermark": {"rate": list(config.watermark.rates),
                          "significance": config.watermark.significance,
                          "independent": [dataclasses.asdict(x) for x in config.watermark.independent]}}
           if config.watermark is not None else {}),
    }


__all__ = ["AttackSpec", "DefenseSpec", "DetectorSpec", "DivQATSpec", "ExperimentConfig", "HOLDOUT",
           "IndependentSpec", "TrainingSpec", "VictimSpec", "WatermarkSpec", "config_dict", "load_config",
           "load_preset", "parse_config", "preset_names", "preset_text"]
