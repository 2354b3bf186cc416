"""The extraction-attack contract, its registry, and what every attack shares.

An attack gets a ``QueryBoundary`` (nothing else of the victim), a list of query budgets and the recipe
for its surrogate, and returns one trained surrogate per budget (``Stolen``). Everything it learns
about the victim comes through ``box.query`` / ``box.query_labels``, and every image it sends is
counted by the box.

Shared here:

- ``SurrogateTraining``: the KnockoffNets surrogate recipe (algorithms.md, section 4: soft
  cross-entropy at temperature 1, SGD nesterov lr 0.1, wd 5e-4, cosine, augmentation of the
  stored transfer images), trained by the project's one trainer (``divqat.train.fit``).
- ``QueryCache``: the images an attack sent and the answers it got, collected once and reused
  across budgets and epochs; a prefix of it is exactly what a smaller budget would have bought.
- ``soft_cross_entropy``, ``build_surrogate``, ``train_surrogate``.
"""

from __future__ import annotations

import abc
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divqat.boundary import QueryBoundary
from divqat.checks import check_bool, check_choice, check_int, check_number
from divqat.data import channel_stats, to_float
from divqat.errors import ConfigError
from divqat.models import VictimNet, check_arch
from divqat.registry import Registry, parse_params
from divqat.train.trainer import PRECISIONS, FitConfig, fit

ATTACKS: Registry[type[Attack]] = Registry("attack")

# The thief does not know the victim's normalization; without statistics of its own data it
# assumes images spread over [0, 1] (BatchNorm after the first conv absorbs the rest).
DEFAULT_STATS = ((0.5,), (0.25,))



def _checked_arch(owner: str, spec: Any) -> str:
    """A surrogate architecture spec (built-in, torchvision:, timm: or module:function), its
    canonical spelling; ConfigError naming ``owner.arch`` otherwise."""
    if not isinstance(spec, str):
        raise ConfigError(f"{owner}.arch: expected an architecture name, got {spec!r}")
    try:
        return check_arch(spec)
    except ConfigError as e:
        raise ConfigError(f"{owner}.arch: {e}") from None

@dataclass(frozen=True)
class SurrogateTraining:
    """How a surrogate is trained (KnockoffNets' recipe, algorithms.md section 4).

    arch: registered architecture of the surrogate. epochs, batch_size, lr, weight_decay:
    SGD nesterov with a cosine schedule. min_steps: at least this many optimizer steps per
    surrogate; a small query set gets more epochs (measured: a 500-query KnockoffNets thief of
    the Fashion-MNIST QAT victim reached 42.9 % after 5 epochs = 20 steps and 79.1 % after
    300 steps), so a small budget measures what the answers teach, not an undertrained
    surrogate (default 0: ``epochs`` as given). eval_precision: "bf16" measures the surrogates
    on the test split under bf16 autocast with BatchNorm folded (about 3x faster; fp32 where the
    CPU lacks native bf16; ``divqat.pipelines.attack.surrogate_predictions``). precision: "bf16"
    trains under bf16 autocast
    where the CPU has native bf16 (fp32 elsewhere; see ``divqat.train.trainer``); it applies to
    the surrogates trained on stored queries (``train_surrogate``), not to the data-free
    attacks' online training, which stays fp32. temperature: of the soft cross-entropy (1 = the
    reference). augment / hflip: random crop (pad 4) and horizontal flip of the stored transfer
    images. seed: initialization and batch order. device: where the surrogate trains.
    """

    arch: str = "resnet8"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    temperature: float = 1.0
    min_steps: int = 0
    precision: str = "fp32"
    eval_precision: str = "fp32"
    augment: bool = True
    hflip: bool = True
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    # The fields that make up the recipe (what a config's ``surrogate:`` mapping and a stage key
    # hold); seed, device and progress are set per run.
    RECIPE: ClassVar[tuple[str, ...]] = ("arch", "epochs", "batch_size", "lr", "weight_decay",
                                         "temperature", "min_steps", "precision", "eval_precision")

    def __post_init__(self) -> None:
        # Stored as the checks return them (lr 1 -> 1.0), so a stage key does not depend on how
        # a config wrote a number.
        for name, value in self.check(vars(self), "surrogate").items():
            object.__setattr__(self, name, value)
        check_bool("surrogate", "augment", self.augment)
        check_bool("surrogate", "hflip", self.hflip)
        check_int("surrogate", "seed", self.seed)

    @staticmethod
    def check(fields: dict[str, Any], owner: str) -> dict[str, Any]:
        """The recipe fields present in ``fields``, checked and converted; errors name
        ``owner.field``."""
        checks = {
            "arch": lambda v: _checked_arch(owner, v),
            "epochs": lambda v: check_int(owner, "epochs", v, low=1),
            "batch_size": lambda v: check_int(owner, "batch_size", v, low=1),
            "lr": lambda v: check_number(owner, "lr", v, low=0, low_open=True),
            "weight_decay": lambda v: check_number(owner, "weight_decay", v, low=0),
            "temperature": lambda v: check_number(owner, "temperature", v, low=0, low_open=True),
            "min_steps": lambda v: check_int(owner, "min_steps", v, low=0),
            "precision": lambda v: check_choice(owner, "precision", v, PRECISIONS),
            "eval_precision": lambda v: check_choice(owner, "eval_precision", v, PRECISIONS),
        }
        return {name: checks[name](fields[name]) for name in SurrogateTraining.RECIPE
                if name in fields}

    def recipe(self) -> dict[str, Any]:
        """The recipe fields as plain data (a stage's settings); ``min_steps``, ``precision``
        and ``eval_precision`` only when they differ from their defaults, so the stage keys of
        configs written before they existed stay valid."""
        out = {k: getattr(self, k) for k in self.RECIPE}
        if not out["min_steps"]:
            del out["min_steps"]
        for name in ("precision", "eval_precision"):
            if out[name] == "fp32":
                del out[name]
        return out

    def epochs_for(self, n_images: int) -> int:
        """The epochs a surrogate trains on ``n_images`` stored queries: ``epochs``, raised
        until it makes at least ``min_steps`` optimizer steps."""
        steps_per_epoch = max(1, math.ceil(n_images / self.batch_size))
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))

    def fit_config(self, desc: str, n_images: int = 0) -> FitConfig:
        return FitConfig(epochs=self.epochs_for(n_images), batch_size=self.batch_size, lr=self.lr,
                         weight_decay=self.weight_decay, schedule="cosine", augment=self.augment,
                         hflip=self.hflip, seed=self.seed, device=self.device,
                         precision=self.precision, progress=self.progress, log_epochs=False,
                         desc=desc)


@dataclass(frozen=True)
class TransferSet:
    """The thief's own natural images, already at the victim's input shape.

    images: uint8 (N, C, H, W). labels: (N,) int64, the transfer set's *own* classes (not the
    victim's; the adaptive KnockoffNets policy samples by them). name: e.g. "mnist:train".
    """

    name: str
    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ConfigError(f"transfer set {self.name}: images must be a uint8 (N, C, H, W) tensor")
        if len(self.images) == 0:
            raise ConfigError(f"transfer set {self.name} is empty")
        if not isinstance(self.labels, Tensor) or self.labels.shape != (len(self.images),):
            raise ConfigError(f"transfer set {self.name}: labels must be (N,) with N = {len(self.images)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std): the normalization a thief can compute from its own data."""
        return channel_stats(self.images)


@dataclass
class Stolen:
    """One surrogate trained with ``budget`` queries.

    surrogate: the trained model in eval mode (images float32 (N, C, H, W) in [0, 1] -> logits
    (N, K)). queries_used: images the black box answered for it (<= budget). seconds: wall time
    of querying plus training. history: per-epoch training logs; info: attack-specific records.
    """

    budget: int
    surrogate: nn.Module
    queries_used: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def check_blackbox(box: Any) -> QueryBoundary:
    """Attacks take a query boundary (a ``BlackBox``, or a ``RemoteBlackBox`` over HTTP) and
    nothing else: a model, a victim or a defended victim handed in by mistake would let the
    attack see more than a thief does."""
    if not isinstance(box, QueryBoundary):
        raise TypeError(f"attacks only take a divqat query boundary (BlackBox, RemoteBlackBox), got "
                        f"{type(box).__name__}: wrap the victim with BlackBox(victim, defense, budget)")
    return box


def check_budgets(budgets: Any, box: QueryBoundary) -> list[int]:
    """Sorted distinct budgets, each >= 1, the largest within the box's budget."""
    if isinstance(budgets, int) and not isinstance(budgets, bool):
        budgets = [budgets]
    if not isinstance(budgets, Sequence) or not budgets:
        raise ConfigError(f"budgets must be a non-empty list of integers, got {budgets!r}")
    out = sorted({check_int("attack", "budget", b, low=1) for b in budgets})
    if box.budget is not None and out[-1] > box.queries_used + box.queries_left:
        raise ConfigError(f"the largest budget {out[-1]} exceeds the black box's query budget {box.budget}")
    return out


def soft_cross_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``mean_i -sum_k t_ik log softmax(z_i / T)_k``: cross-entropy against posteriors (N, K);
    with int64 labels (N,) the ordinary cross-entropy (the label-only thief)."""
    if targets.ndim == 1:
        return F.cross_entropy(logits / temperature, targets)
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


class SoftCrossEntropy:
    """``fit`` objective for surrogates: soft cross-entropy on the victim's answers."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def __call__(self, logits, targets, images, progress):
        loss = soft_cross_entropy(logits, targets, self.temperature)
        return loss, {"loss": loss.detach()}


def build_surrogate(arch: str, input_shape: tuple[int, int, int], num_classes: int,
                    stats: tuple[Sequence[float], Sequence[float]] | None = None,
                    seed: int = 0) -> nn.Module:
    """A fresh surrogate: normalization (the thief's own ``stats`` = (mean, std) per channel)
    followed by a registered architecture, like a victim."""
    mean, std = stats if stats is not None else DEFAULT_STATS
    c = input_shape[0]
    if len(mean) != c:  # gray statistics for an RGB victim or the reverse
        mean, std = (float(np.mean(mean)),) * c, (float(np.mean(std)),) * c
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VictimNet(arch, c, num_classes, tuple(mean), tuple(std))


def train_surrogate(images: Tensor, targets: Tensor, training: SurrogateTraining,
                    input_shape: tuple[int, int, int], num_classes: int,
                    stats: tuple[Sequence[float], Sequence[float]] | None = None,
                    desc: str = "surrogate", objective: Any = None) -> tuple[nn.Module, list[dict]]:
    """Train a fresh surrogate on stored queries; returns it in eval mode with its history.

    images: uint8 or float32 in [0, 1], (N, C, H, W) at the victim's input shape. targets: the
    victim's answers, posteriors (N, K) float or labels (N,) int64. objective: a ``fit``
    objective (default: ``SoftCrossEntropy`` at the recipe's temperature; the semi-supervised
    thief passes its own).
    """
    model = build_surrogate(training.arch, input_shape, num_classes, stats, training.seed)
    if objective is None:
        objective = SoftCrossEntropy(training.temperature)
    history = fit(model, images, targets, objective, training.fit_config(desc, len(images)))
    model.eval()
    return model, history.epochs


class QueryCache:
    """The images an attack sent and the black box's answers, in query order.

    Answers are posteriors (N, K) float32 or, from a label-only box, labels (N,) int64. The first
    ``n`` entries are exactly what a budget of ``n`` would have bought, so one pass of queries
    serves every budget of a sweep and every epoch of training; nothing is queried twice.
    """

    def __init__(self) -> None:
        self._images: list[Tensor] = []
        self._answers: list[Tensor] = []
        self.seconds = 0.0

    def query(self, box: QueryBoundary, images: Tensor, stored: Tensor | None = None) -> Tensor:
        """Send ``images`` (float32 in [0, 1]) through ``box``, store ``stored`` (default: the
        images themselves; e.g. their uint8 originals) with the answers, and return the answers."""
        start = time.perf_counter()
        answers = box.query_labels(images) if box.label_only else box.query(images)
        self.seconds += time.perf_counter() - start
        self._images.append((images if stored is None else stored).detach().cpu())
        self._answers.append(answers.detach().cpu())
        return answers

    def add(self, stored: Tensor, answers: Tensor, seconds: float = 0.0) -> None:
        """Store images with answers obtained otherwise (e.g. the averaged answers of several
        queries per image, each counted by the box when it was sent)."""
        self._images.append(stored.detach().cpu())
        self._answers.append(answers.detach().cpu())
        self.seconds += seconds

    def __len__(self) -> int:
        return sum(len(a) for a in self._answers)

    def take(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """The first ``n`` (default: all) stored images and answers."""
        if not self._answers:
            raise ConfigError("the query cache is empty: no query was answered")
        images, answers = torch.cat(self._images), torch.cat(self._answers)
        self._images, self._answers = [images], [answers]
        return (images, answers) if n is None else (images[:n], answers[:n])


def query_in_batches(cache: QueryCache, box: QueryBoundary, images_uint8: torch.Tensor, batch_size: int,
                     progress: bool = True, desc: str = "querying") -> None:
    """Send uint8 images (N, C, H, W) through the box in batches, storing them in ``cache``."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(images_uint8), batch_size), desc=desc, leave=False,
                      disable=None if progress else True, dynamic_ncols=True):
        chunk = images_uint8[start:start + batch_size]
        cache.query(box, to_float(chunk), stored=chunk)


def train_per_budget(cache: QueryCache, budgets: Sequence[int], training: SurrogateTraining,
                     box: QueryBoundary, stats, collect_seconds: float, name: str,
                     info: dict | None = None) -> list[Stolen]:
    """A fresh surrogate for each budget, on the first ``budget`` cached queries (never
    continued from a smaller budget's surrogate)."""
    out = []
    for budget in budgets:
        images, answers = cache.take(budget)
        start = time.perf_counter()
        surrogate, history = train_surrogate(images, answers, training, box.input_shape,
                                             box.num_classes, stats, desc=f"{name} {budget}")
        # Wall time of this budget's thief: its share of collecting the queries plus its training.
        share = collect_seconds * len(images) / max(1, len(cache))
        out.append(Stolen(budget, surrogate, len(images), share + time.perf_counter() - start,
                          history, copy.deepcopy(info or {})))
    return out


class Attack(abc.ABC):
    """Base of every extraction attack: ``attack.steal(box, budgets, training) -> [Stolen]``.

    Subclasses take their own parameters in ``__init__`` (validated there, with defaults in the
    signature, or declared as a settings dataclass ``Settings``, see ``Registry.defaults``) and
    implement ``steal``. ``soft_only`` attacks need posteriors and refuse a
    label-only box. ``params()`` returns the constructor arguments (for metrics).
    """

    name: ClassVar[str] = ""
    soft_only: ClassVar[bool] = False
    # Whether the attack draws its queries from a transfer set (``steal(..., transfer=...)``).
    uses_transfer_set: ClassVar[bool] = False

    @property
    def queries_transfer_set_only(self) -> bool:
        """Whether every query is an image of the transfer set, unchanged (no synthesized or
        other images): then a defense that leaves the labels of the whole transfer set as they
        were shows a label-only thief exactly what no defense does."""
        return False

    @property
    def training_cost(self) -> float:
        """Images through a surrogate in training per query, relative to KnockoffNets' one
        (for time estimates): the recovery thief's shadows, FixMatch's unlabeled views, the
        averaging thief's several queries per trained image."""
        return 1.0

    @property
    def streams(self) -> int:
        """How many query boundaries (API keys, monitored streams) the thief holds: 1, except
        for the Sybil thief, whose ``steal`` takes a list of that many boxes from the driver."""
        return 1

    @abc.abstractmethod
    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              **kwargs: Any) -> list[Stolen]:
        """Query ``box`` and return one trained surrogate per budget (ascending)."""

    def _start(self, box: Any, budgets: Any, transfer: Any = None) -> tuple[QueryBoundary, list[int]]:
        """Validate the box, the budgets and, for attacks that use one, the transfer set (every
        attack calls this first)."""
        box = check_blackbox(box)
        if self.soft_only and box.label_only:
            raise ConfigError(f"attack {self.name!r} needs posteriors; it cannot run on a label-only "
                              "black box")
        if self.uses_transfer_set:
            if not isinstance(transfer, TransferSet):
                raise ConfigError(f"attack {self.name!r} needs a transfer set (TransferSet)")
            if tuple(transfer.images.shape[1:]) != box.input_shape:
                raise ConfigError(f"transfer set {transfer.name} has images {tuple(transfer.images.shape[1:])}; "
                                  f"the victim takes {box.input_shape} (adapt them first)")
        return box, check_budgets(budgets, box)

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ATTACKS.defaults(type(self))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


def param_mapping(owner: str, name: str, value: Any) -> dict[str, Any]:
    """A mapping parameter (another attack's or a defense's parameters) from a config's mapping
    or from the command line's ``"k=v,k=v"`` text (``--attack-param defense_params=beta=0.5``);
    None is empty. ConfigError naming ``owner.name`` otherwise."""
    if value is None:
        return {}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{owner}.{name}: keys must be parameter names, got {value!r}")
        return dict(value)
    if isinstance(value, str):
        try:
            return parse_params([item for item in value.split(",") if item.strip()])
        except ConfigError as e:
            raise ConfigError(f"{owner}.{name}: {e}") from None
    raise ConfigError(f"{owner}.{name}: expected a mapping or 'key=value,key=value', got {value!r}")


def create_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack by its CLI name: ``create_attack("dfme", directions=1)``."""
    return ATTACKS.create(name, **params)


def describe_attacks() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, first docstring line, parameter defaults) of every registered attack."""
    return ATTACKS.describe()
