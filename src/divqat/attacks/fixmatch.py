"""The semi-supervised thief: FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised
Learning with Consistency and Confidence", NeurIPS 2020) on the images the thief did not query.

A real thief holds more images than it can afford to query. Jagielski et al. ("High Accuracy and
High Fidelity Extraction of Neural Networks", USENIX Security 2020) showed that the unqueried rest
is worth training on (they used MixMatch); FixMatch is the simpler modern choice: the surrogate
labels a weakly augmented unlabeled image itself, and where it is confident, learns to give a
strongly augmented view of it the same label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    Stolen,
    SurrogateTraining,
    TransferSet,
    query_in_batches,
    soft_cross_entropy,
    train_surrogate,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_int, check_number
from divqat.data import augment, to_float


def strong_augment(x: Tensor, generator: torch.Generator, cutout: float = 0.5) -> Tensor:
    """A RandAugment-like strong augmentation of a float batch (N, C, H, W) in [0, 1], per sample,
    vectorized: each of brightness (+-0.3), contrast (x0.5-1.5), solarize (threshold 0.5-1),
    posterize (2-5 bits) and a translation of up to an eighth of the side is applied with
    probability 0.5 at a random magnitude, then one Cutout square of side ``cutout`` x the
    shorter side, filled with 0.5 (FixMatch's strong augmentation is RandAugment, two random ops
    of a list of 14 at random magnitudes, followed by Cutout)."""
    n, _, h, w = x.shape

    def draw(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    def chosen() -> Tensor:
        return (draw(n) < 0.5).view(n, 1, 1, 1)

    x = torch.where(chosen(), x + (draw(n) * 0.6 - 0.3).view(n, 1, 1, 1), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.where(chosen(), (x - mean) * (0.5 + draw(n)).view(n, 1, 1, 1) + mean, x).clamp(0, 1)
    threshold = (0.5 + 0.5 * draw(n)).view(n, 1, 1, 1)
    x = torch.where(chosen() & (x >= threshold), 1 - x, x)
    levels = (2 ** torch.randint(2, 6, (n,), generator=generator)).float().view(n, 1, 1, 1)
    x = torch.where(chosen(), torch.floor(x * (levels - 1) + 0.5) / (levels - 1), x)
    shift = max(1, min(h, w) // 8)
    x = torch.where(chosen(), augment(x, pad=shift, hflip=False, generator=generator), x)
    side = max(1, round(cutout * min(h, w)))
    top = torch.randint(-(side // 2), h - side // 2, (n, 1, 1), generator=generator)
    left = torch.randint(-(side // 2), w - side // 2, (n, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hole = ((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)).unsqueeze(1)
    return torch.where(hole, torch.full_like(x, 0.5), x)


class FixMatchObjective:
    """The FixMatch loss as a ``fit`` objective: ``fit`` appends the unlabeled batch
    (``extra_inputs``: ``mu`` x the labeled batch, a weak and a strong view of each image) to the
    labeled one, and the loss is ``l_s + lambda_u * l_u`` with

    - ``l_s``: soft cross-entropy of the labeled batch on the victim's answers (cross-entropy on
      labels from a label-only box);
    - ``l_u = mean_b 1[max q_b >= threshold] * CE(argmax q_b, p(strong_b))``, ``q_b`` the
      surrogate's own posterior on the weak view (no gradient through it).
    """

    def __init__(self, unlabeled: Tensor, *, mu: int, threshold: float, lambda_u: float,
                 hflip: bool, temperature: float = 1.0) -> None:
        self.unlabeled, self.mu, self.threshold = unlabeled, mu, threshold
        self.lambda_u, self.hflip, self.temperature = lambda_u, hflip, temperature

    def extra_inputs(self, images: Tensor, generator: torch.Generator) -> Tensor | None:
        if len(self.unlabeled) == 0:
            return None
        index = torch.randint(len(self.unlabeled), (self.mu * len(images),), generator=generator)
        u = to_float(self.unlabeled[index])
        weak = augment(u, hflip=self.hflip, generator=generator)
        strong = strong_augment(augment(u, hflip=self.hflip, generator=generator), generator)
        return torch.cat([weak, strong])

    def __call__(self, logits: Tensor, targets: Tensor, images: Tensor, progress: float):
        n = len(targets)
        supervised = soft_cross_entropy(logits[:n], targets, self.temperature)
        if len(logits) == n:
            return supervised, {"loss": supervised.detach()}
        weak, strong = logits[n:].chunk(2)
        confidence, pseudo = torch.softmax(weak.detach(), dim=1).max(dim=1)
        mask = (confidence >= self.threshold).float()
        unsupervised = (F.cross_entropy(strong, pseudo, reduction="none") * mask).mean()
        loss = supervised + self.lambda_u * unsupervised
        return loss, {"loss": loss.detach(), "unlabeled_loss": unsupervised.detach(),
                      "mask": mask.mean()}


@ATTACKS.register("fixmatch")
class FixMatch(Attack):
    """Semi-supervised thief (FixMatch): query the budget, train on the unqueried rest too.

    Sohn et al., NeurIPS 2020; the threat after Jagielski et al., USENIX Security 2020. The
    thief queries a random sample of its transfer set (as KnockoffNets: the same images for the
    same seed) and keeps the transfer set's other images unlabeled. For each budget, a fresh
    surrogate trains (the surrogate recipe, ``epochs`` over the labeled queries) on the
    ``FixMatchObjective``: each step a labeled batch of answers and ``mu`` times as many
    unlabeled images, a weak view (crop, flip) to pseudo-label and a strong view
    (``strong_augment``) to learn from, where the surrogate's confidence on the weak view is at
    least ``threshold``. The unlabeled pool of a budget is every transfer image its own queries
    did not include (so a smaller budget's thief uses the larger budgets' queried images as
    unlabeled, as a thief with that budget would), at most ``unlabeled`` of them. Soft answers
    are distilled as posteriors, a label-only box's as labels; each labeled step costs
    ``1 + 2 mu`` images through the surrogate.

    Deviations from FixMatch: the strong augmentation is a fixed list of five photometric and
    geometric ops applied each with probability 0.5, plus Cutout (RandAugment draws two of 14);
    ``mu`` defaults to 3 (the paper: 7) to keep a CPU thief's training within 7 passes per
    labeled batch; the schedule is the surrogate recipe's (SGD nesterov, cosine), without the
    paper's EMA of the weights.

    Arguments:
        threshold (float): confidence above which a pseudo-label counts, in (0, 1].
            (Default: 0.95, the paper's.)
        mu (int): unlabeled images per labeled image in a step. (Default: 3.)
        lambda_u (float): weight of the unlabeled loss. (Default: 1, the paper's.)
        unlabeled (int, optional): most unlabeled images kept. (Default: None, all the rest.)
        batch_size (int): images per query. (Default: 256.)

    ``Stolen.info`` records ``unlabeled_images`` and the last epoch's ``mask`` (the share of
    unlabeled images above the threshold).

    Example::
        >>> stolen = FixMatch().steal(box, [1000], SurrogateTraining(), transfer=ts)   # ts >> 1000
        >>> stolen[0].info["unlabeled_images"]
    """

    name = "fixmatch"
    uses_transfer_set = True

    def __init__(self, threshold: float = 0.95, mu: int = 3, lambda_u: float = 1.0,
                 unlabeled: int | None = None, batch_size: int = 256) -> None:
        self.threshold = check_number("fixmatch", "threshold", threshold, low=0, high=1, low_open=True)
        self.mu = check_int("fixmatch", "mu", mu, low=1)
        self.lambda_u = check_number("fixmatch", "lambda_u", lambda_u, low=0)
        self.unlabeled = check_int("fixmatch", "unlabeled", unlabeled, low=0, optional=True)
        self.batch_size = check_int("fixmatch", "batch_size", batch_size, low=1)

    @property
    def training_cost(self) -> float:
        return 1.0 + 2 * self.mu  # a weak and a strong view of mu unlabeled images per labeled one

    @property
    def queries_transfer_set_only(self) -> bool:
        return True

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        generator = torch.Generator().manual_seed(training.seed)
        order = torch.randperm(len(transfer), generator=generator)
        n = min(budgets[-1], len(transfer))
        cache = QueryCache()
        query_in_batches(cache, box, transfer.images[order[:n]], self.batch_size, training.progress,
                         desc="fixmatch")
        out = []
        for budget in budgets:
            images, answers = cache.take(budget)
            rest = order[len(images):]
            if self.unlabeled is not None:
                rest = rest[:self.unlabeled]
            objective = FixMatchObjective(transfer.images[rest], mu=self.mu, threshold=self.threshold,
                                          lambda_u=self.lambda_u, hflip=training.hflip,
                                          temperature=training.temperature)
            start = time.perf_counter()
            surrogate, history = train_surrogate(images, answers, training, box.input_shape,
                                                 box.num_classes, transfer.stats,
                                                 desc=f"fixmatch {budget}", objective=objective)
            share = cache.seconds * len(images) / max(1, len(cache))
            info = {"transfer_set": transfer.name, "transfer_images": len(transfer),
                    "unlabeled_images": len(rest),
                    "mask": round(float(history[-1].get("mask", 0.0)), 4) if history else None}
            if budget > n:
                info["note"] = f"the transfer set has only {n} images; larger budgets used all of them"
            out.append(Stolen(budget, surrogate, len(images), share + time.perf_counter() - start,
                              history, info))
        return out
