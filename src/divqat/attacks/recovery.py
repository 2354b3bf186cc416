"""The recovery thief, after D-DAE (Chen et al., "D-DAE: Defense-Penetrating Model Extraction
Attacks", IEEE S&P 2023): a thief who knows the defense and undoes it.

Perturbation defenses are public math: a thief who reads the documentation knows the family and
its public parameters (Kerckhoffs). It trains a shadow model of its own, runs the defense on the
shadow's posteriors, learns a small network from perturbed to clean posteriors, and distils its
surrogate on the victim's answers passed through that network.

The attack never imports a defense (the import contract of ``attacks/``): the driver, which may,
hands it the defense as an opaque callable (``KnownDefense``), built from the defense's name and
parameters (``divqat.pipelines.thieves.known_defense``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    Stolen,
    SurrogateTraining,
    TransferSet,
    param_mapping,
    query_in_batches,
    train_surrogate,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_int
from divqat.data import to_float
from divqat.errors import ConfigError

# The fewest optimizer steps a shadow model trains. Measured on a 300-query digits thief behind
# reverse sigmoid (beta 0.5; the answers 1.29 in L1 from the clean posteriors): shadows of 60
# steps agreed with the victim on 24 % of their held-out half, of 300 steps on 60 %, and the
# recovered answers' L1 fell from 0.56 to 0.36 (temperatures 0.5 to 4), then to 0.23 with the
# sharper temperatures 0.25 to 2 (the victim's top probability averaged 0.97).
SHADOW_MIN_STEPS = 200
# Probabilities below this are one number to the recovery network (log-space inputs stay finite
# on the zeros of top-k and rounding answers).
_FLOOR = 1e-6


@dataclass(frozen=True)
class KnownDefense:
    """The defense as the thief can run it: what a driver hands the recovery thief.

    name, params: the defense family and the public parameters the thief assumes (recorded).
    simulator: ``simulator(images, labels) -> perturb``. Given the thief's own images (uint8
    (N, C, H, W)) labeled by the victim ((N,) int64), the defense as the thief can run it:
    ``perturb(posteriors (N, K) float32, images float32 (N, C, H, W) in [0, 1]) -> perturbed
    posteriors (N, K)``. A formula defense ignores the images; a defense that runs a model gets
    one of the thief's own in place of the defender's (which the thief does not have).
    """

    name: str
    params: dict[str, Any]
    simulator: Callable[[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor]]


class RecoveryNet(nn.Module):
    """Perturbed posteriors (N, K) -> logits (N, K) of the recovered clean posteriors.

    An MLP on ``[y', log y']`` (the perturbations of reverse sigmoid and DCP act on the logit
    scale) whose output is added to ``log y'``: an answer the defense left alone needs only a
    zero correction, so the network starts near the identity.
    """

    def __init__(self, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, perturbed: Tensor) -> Tensor:
        log_p = perturbed.clamp_min(_FLOOR).log()
        return log_p + self.mlp(torch.cat([perturbed, log_p], dim=1))


def fit_recovery(perturbed: Tensor, clean: Tensor, *, hidden: int = 256, steps: int = 2000,
                 batch_size: int = 256, lr: float = 1e-3, permute: bool = True,
                 seed: int = 0) -> RecoveryNet:
    """Train a ``RecoveryNet`` on pairs (perturbed (N, K), clean (N, K)) with the soft
    cross-entropy of the clean posteriors (= KL up to a constant), Adam at ``lr`` with a cosine
    decay over ``steps``. ``permute``: each row's classes are shuffled the same way in both
    members of its pair at every step: the formula defenses treat every class alike, so the
    network learns one correction for all classes instead of one per class from a few thousand
    pairs. Deterministic for a ``seed``; returns the network in eval mode on the CPU."""
    if perturbed.shape != clean.shape or perturbed.ndim != 2 or len(perturbed) == 0:
        raise ConfigError(f"recovery pairs must be two (N, K) tensors, got {tuple(perturbed.shape)} "
                          f"and {tuple(clean.shape)}")
    perturbed, clean = perturbed.float(), clean.float()
    n, k = perturbed.shape
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RecoveryNet(k, hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        x, y = perturbed[idx], clean[idx]
        if permute:
            order = torch.rand(len(idx), k, generator=generator).argsort(dim=1)
            x, y = x.gather(1, order), y.gather(1, order)
        loss = -(y * F.log_softmax(net(x), dim=1)).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return net.eval()


@torch.no_grad()
def recover(net: RecoveryNet, answers: Tensor, batch_size: int = 4096) -> Tensor:
    """The recovered posteriors (N, K) float32 of defended answers (N, K)."""
    out = [torch.softmax(net(answers[i:i + batch_size].float()), dim=1)
           for i in range(0, len(answers), batch_size)]
    return torch.cat(out) if out else answers.float()


def keep_labels(recovered: Tensor, labels: Tensor) -> Tensor:
    """``recovered`` (N, K) with each row's argmax moved back to ``labels`` (N,): where they
    differ, the probabilities of the two classes are swapped (the rest of the row is kept)."""
    out = recovered.clone()
    rows = (out.argmax(dim=1) != labels).nonzero().flatten()
    if len(rows):
        top = out[rows].argmax(dim=1)
        at_label = out[rows, labels[rows]].clone()
        out[rows, labels[rows]] = out[rows, top]
        out[rows, top] = at_label
    return out


def l1(a: Tensor, b: Tensor) -> float:
    """Mean L1 distance between the rows of two (N, K) tensors."""
    return float((a.float() - b.float()).abs().sum(dim=1).mean()) if len(a) else 0.0


@torch.no_grad()
def _logits(model: nn.Module, images: Tensor, device: str, batch_size: int = 512) -> Tensor:
    model.eval()
    out = [model(to_float(images[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _all_labels(answers: Tensor) -> bool:
    """Answers that carry nothing but the label: labels (N,) or one-hot rows."""
    return answers.ndim == 1 or bool((answers.amax(dim=1) >= 1 - 1e-6).all())


@ATTACKS.register("recovery")
class Recovery(Attack):
    """Recovery thief (D-DAE): simulate the known defense on a shadow model, learn to undo it.

    Chen et al., IEEE S&P 2023. The thief queries a random sample of its transfer set (as
    KnockoffNets, the same images for the same seed), then, for each budget, from that budget's
    queries alone:

    1. shadow posteriors: two shadow models (the surrogate recipe, another seed), each trained on
       half of the queried images with the victim's labels (argmax of the answers), give the
       posteriors of the other half (out of fold: a shadow is as unsure on them as a model is on
       images it never trained on); each shadow trains at least 200 steps. Each posterior is
       taken at ``temperatures`` temperatures ``2 ** (i - temperatures // 2)`` (0.25, 0.5, 1, 2
       for 4): the victim's confidence is unknown, and a victim is usually surer than a shadow
       of a few hundred images;
    2. the known defense runs on them (``KnownDefense``: the driver's simulation), giving pairs
       (perturbed, clean);
    3. a ``RecoveryNet`` (MLP, ``hidden`` units, ``steps`` Adam steps) learns perturbed -> clean;
    4. the victim's answers go through it (when the simulated defense kept the label of every
       pair, each recovered answer keeps its answer's label: ``keep_labels``), and the surrogate
       is distilled on the recovered posteriors with the usual recipe.

    Deviations from D-DAE: the defense is told, not identified from the answers (D-DAE's first
    module, a meta-classifier over answer statistics, is left out: the thief knows the family and
    its public parameters); the recovery model is a deterministic regressor (the conditional
    mean), not D-DAE's generative model.

    What it cannot invert: answers that carry only the label (a label-only box, ``top-k`` with
    k = 1): there the thief trains on the labels, as the label-only KnockoffNets thief, and says
    so in ``Stolen.info``. Behind no defense there is nothing to undo and it trains on the
    answers as they are. Fresh random noise (``random-noise``) is not a function of the
    posterior: the network learns the mean clean posterior given a noisy one, which removes part
    of the noise, never all of it. ``rounding`` and ``top-k`` (k > 1) lose information the
    network can only guess from the shadow's typical posteriors. Defenses that run a model
    (``adaptive-misinformation``, ``mad``) are simulated with the thief's own model (its own
    misinformation model trained on its labeled queries; a random surrogate of its own), which
    is the defender's only in distribution. ``Stolen.info["recovery"]`` records, on held-out
    shadow pairs, the L1 distance of the perturbed and of the recovered posteriors to the clean
    ones: the thief's own estimate of what it undid.

    Arguments:
        defense (str, optional): the defense family the thief assumes. (Default: None, the
            defense the victim is served with, as the driver knows it in process; over HTTP,
            where the service does not say, it must be named.)
        defense_params (mapping or "k=v,k=v", optional): its public parameters. (Default: None,
            those the victim is served with when ``defense`` is None, else the defense's
            defaults.)
        temperatures (int): temperature-scaled copies of each shadow posterior, at
            ``2 ** (i - temperatures // 2)``, i = 0 .. temperatures - 1. (Default: 4: 0.25 to 2.)
        hidden (int): hidden units of the recovery network. (Default: 256.)
        steps (int): Adam steps of the recovery network, batch 256, lr 1e-3. (Default: 2000.)
        batch_size (int): images per query. (Default: 256.)

    Example::
        >>> known = KnownDefense("dcp", {"beta": 0.5}, lambda images, labels: dcp_on_posteriors)
        >>> stolen = Recovery().steal(box, [5000], SurrogateTraining(), transfer=ts, known=known)
        >>> stolen[0].info["recovery"]      # {"l1_perturbed": ..., "l1_recovered": ..., ...}
    """

    name = "recovery"
    uses_transfer_set = True

    def __init__(self, defense: str | None = None, defense_params: dict[str, Any] | str | None = None,
                 temperatures: int = 4, hidden: int = 256, steps: int = 2000,
                 batch_size: int = 256) -> None:
        if defense is not None and (not isinstance(defense, str) or not defense):
            raise ConfigError(f"recovery.defense: expected a defense name, got {defense!r}")
        self.defense = defense
        # None when empty, as the default is: the recorded parameters name what was given.
        self.defense_params = param_mapping("recovery", "defense_params", defense_params) or None
        if self.defense is None and self.defense_params:
            raise ConfigError("recovery.defense_params: name the defense they belong to "
                              "(recovery.defense), or leave both out for the victim's own")
        self.temperatures = check_int("recovery", "temperatures", temperatures, low=1)
        self.hidden = check_int("recovery", "hidden", hidden, low=1)
        self.steps = check_int("recovery", "steps", steps, low=1)
        self.batch_size = check_int("recovery", "batch_size", batch_size, low=1)

    @property
    def training_cost(self) -> float:
        return 2.0  # two shadows on half the queries each, then the surrogate

    @property
    def queries_transfer_set_only(self) -> bool:
        return True

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, known: KnownDefense | None = None,
              **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        if not isinstance(known, KnownDefense):
            raise ConfigError("the recovery thief needs the defense it inverts as a KnownDefense "
                              "(steal(..., known=...)); the attack drivers build it from "
                              "recovery.defense")
        if self.defense is not None and known.name != self.defense:
            raise ConfigError(f"the recovery thief assumes {self.defense!r} but was handed {known.name!r}")
        generator = torch.Generator().manual_seed(training.seed)
        n = min(budgets[-1], len(transfer))
        images = transfer.images[torch.randperm(len(transfer), generator=generator)[:n]]
        cache = QueryCache()
        query_in_batches(cache, box, images, self.batch_size, training.progress, desc="recovery")
        base = {"transfer_set": transfer.name, "transfer_images": len(transfer),
                "defense_known": {"name": known.name, "params": known.params}}
        out = []
        for budget in budgets:
            queried, answers = cache.take(budget)
            start = time.perf_counter()
            targets, record = self._targets(queried, answers, known, training, box, transfer.stats,
                                            budget)
            surrogate, history = train_surrogate(queried, targets, training, box.input_shape,
                                                 box.num_classes, transfer.stats,
                                                 desc=f"recovery {budget}")
            share = cache.seconds * len(queried) / max(1, len(cache))
            info = {**copy.deepcopy(base), "recovery": record}
            if budget > n:  # only the budgets the transfer set cut short
                info["note"] = f"the transfer set has only {n} images; larger budgets used all of them"
            out.append(Stolen(budget, surrogate, len(queried), share + time.perf_counter() - start,
                              history, info))
        return out

    def _targets(self, images: Tensor, answers: Tensor, known: KnownDefense,
                 training: SurrogateTraining, box: QueryBoundary, stats, budget: int
                 ) -> tuple[Tensor, dict[str, Any]]:
        """What the surrogate of one budget trains on, and the record of how it was made."""
        if _all_labels(answers):
            return answers, {"applied": False, "why": "the answers carry only labels: nothing to "
                             "invert, the surrogate trains on the labels"}
        if known.name == "none":
            return answers, {"applied": False, "why": "no defense to invert"}
        labels = answers.argmax(dim=1)
        perturbed, clean, shadow_agreement = self._pairs(images, labels, known, training, box, stats,
                                                         budget)
        # The last tenth of the pairs (whole images, all their temperatures) measures the net.
        per_image = len(images)
        held = torch.zeros(len(clean), dtype=torch.bool)
        held_images = torch.arange(per_image) % 10 == 9
        held[held_images.repeat(self.temperatures)] = True
        if held.all() or not held.any():
            held[:] = False
        net = fit_recovery(perturbed[~held], clean[~held], hidden=self.hidden, steps=self.steps,
                           seed=training.seed)
        # A defense that kept every label of the thief's own pairs keeps the victim's too: the
        # recovered answers keep the answers' labels (the network alone moves a few across).
        kept = bool((perturbed.argmax(dim=1) == clean.argmax(dim=1)).all())

        def undo(rows: Tensor) -> Tensor:
            out = recover(net, rows)
            return keep_labels(out, rows.argmax(dim=1)) if kept else out

        record: dict[str, Any] = {"applied": True, "pairs": int((~held).sum()),
                                  "shadow_agreement": shadow_agreement, "labels_kept": kept}
        if held.any():
            record.update(l1_perturbed=l1(perturbed[held], clean[held]),
                          l1_recovered=l1(undo(perturbed[held]), clean[held]))
        recovered = undo(answers)
        record["answers_moved_l1"] = l1(recovered, answers)
        record["labels_changed"] = int((recovered.argmax(dim=1) != labels).sum())
        return recovered, record

    def _pairs(self, images: Tensor, labels: Tensor, known: KnownDefense,
               training: SurrogateTraining, box: QueryBoundary, stats, budget: int
               ) -> tuple[Tensor, Tensor, float]:
        """(perturbed, clean) posteriors of the shadow models on the thief's own images, at
        every temperature (image-major within each temperature), and the shadows' out-of-fold
        agreement with the victim's labels."""
        n = len(images)
        # Another seed; and enough steps that a shadow of a small budget learns something (its
        # posteriors are all the recovery network learns from).
        shadow_training = dataclasses.replace(training, seed=training.seed + 1,
                                              min_steps=max(training.min_steps, SHADOW_MIN_STEPS))
        logits = torch.empty(n, box.num_classes)
        if n >= 4:
            fold = torch.arange(n) % 2 == 1
            for part in (fold, ~fold):
                shadow, _ = train_surrogate(images[~part], labels[~part], shadow_training,
                                            box.input_shape, box.num_classes, stats,
                                            desc=f"recovery {budget} shadow")
                logits[part] = _logits(shadow, images[part], training.device)
        else:  # too few images to hold any out: in-sample posteriors
            shadow, _ = train_surrogate(images, labels, shadow_training, box.input_shape,
                                        box.num_classes, stats, desc=f"recovery {budget} shadow")
            logits = _logits(shadow, images, training.device)
        agreement = float((logits.argmax(dim=1) == labels).float().mean())
        perturb = known.simulator(images, labels)
        floats = to_float(images)
        clean, perturbed = [], []
        for i in range(self.temperatures):
            y = torch.softmax(logits / 2.0 ** (i - self.temperatures // 2), dim=1)
            y_perturbed = torch.cat([perturb(y[s:s + 1024], floats[s:s + 1024]).float()
                                     for s in range(0, n, 1024)])
            clean.append(y)
            perturbed.append(y_perturbed)
        return torch.cat(perturbed), torch.cat(clean), agreement
