"""Jacobian-based dataset augmentation (Papernot et al., "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017, section 4).

The thief starts from a small seed set of natural images and grows it where the substitute's
decision boundaries are: each round moves every image it already has one signed-gradient step in
the direction that raises the substitute's score for the victim's label, and queries the moved
copies. The set doubles per round until the query budget is spent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    Stolen,
    SurrogateTraining,
    TransferSet,
    train_per_budget,
    train_surrogate,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_int, check_number
from divqat.data import to_float


def jacobian_step(substitute: nn.Module, images: Tensor, labels: Tensor, step: float,
                  batch_size: int = 256, device: str = "cpu") -> Tensor:
    """``clip(x + step * sign(d substitute(x)[label] / dx), 0, 1)`` for float images (N, C, H, W)
    in [0, 1] and labels (N,) int64; float32 (N, C, H, W) on the CPU."""
    substitute.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float().requires_grad_(True)
        y = labels[start:start + batch_size].to(device)
        # Per-image gradients by summing: in eval mode the images do not interact.
        (grad,) = torch.autograd.grad(substitute(x).gather(1, y[:, None]).sum(), x)
        out.append((x.detach() + step * grad.sign()).clamp_(0, 1).cpu())
    return torch.cat(out) if out else images.new_empty((0, *images.shape[1:]))


@ATTACKS.register("jbda")
class JBDA(Attack):
    """JBDA: grow a small seed set by Jacobian-sign steps of the substitute, query the new images.

    Papernot et al., AsiaCCS 2017. ``seed_size`` images are drawn at random (``training.seed``)
    from the transfer set and queried. Each round then trains a substitute (``SurrogateTraining``,
    from scratch) on everything queried so far and, for every queried image ``x`` with the
    victim's label ``y`` (argmax of the answer, or the label of a label-only box), queries
    ``x' = clip(x + lambda_r * sign(d F(x)_y / dx), 0, 1)``, doubling the set. With ``tau`` the step
    alternates sign every ``tau`` rounds, ``lambda_r = step * (-1) ** (r // tau)`` (the paper's
    periodic step size, section 6; it used tau = 3 with reservoir sampling, which is left out).

    The last round queries a random subset of its candidates, to fill the largest budget
    exactly; since every round queries its candidates in random order, the first ``budget``
    stored queries are what a run with that budget would have queried, and each budget's
    surrogate is trained from scratch on them. Images are float32 in [0, 1] (no longer uint8
    after the first step). Soft answers are trained on as posteriors, labels as labels.

    Arguments:
        seed_size (int): natural images in the seed set (the paper: 150 MNIST test images).
            (Default: 150.)
        step (float): lambda, the L-infinity size of one augmentation step. (Default: 0.1.)
        tau (int, optional): alternate the step's sign every ``tau`` rounds. (Default: None,
            never; the paper's periodic variant used 3.)
        batch_size (int): images per query and per Jacobian batch. (Default: 256.)

    ``Stolen.info`` records ``seed_size`` (images actually seeded) and ``set_sizes`` (images
    queried after the seed and after each round).

    Example::
        >>> stolen = JBDA(seed_size=150).steal(box, [1000, 10000], SurrogateTraining(), transfer=ts)
        >>> stolen[-1].info["set_sizes"]    # [150, 300, 600, ...]
    """

    name = "jbda"
    uses_transfer_set = True

    def __init__(self, seed_size: int = 150, step: float = 0.1, tau: int | None = None,
                 batch_size: int = 256) -> None:
        self.seed_size = check_int("jbda", "seed_size", seed_size, low=1)
        self.step = check_number("jbda", "step", step, low=0, low_open=True)
        self.tau = None if tau is None else check_int("jbda", "tau", tau, low=1)
        self.batch_size = check_int("jbda", "batch_size", batch_size, low=1)

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        start = time.perf_counter()
        target = budgets[-1]
        generator = torch.Generator().manual_seed(training.seed)
        n_seed = min(self.seed_size, target, len(transfer))
        seed = transfer.images[torch.randperm(len(transfer), generator=generator)[:n_seed]]
        cache = QueryCache()
        self._query(cache, box, to_float(seed))
        sizes = [len(cache)]
        rounds = 0
        while len(cache) < target:
            images, answers = cache.take()
            labels = answers if answers.ndim == 1 else answers.argmax(dim=1)
            substitute, _ = train_surrogate(images, answers, training, box.input_shape, box.num_classes,
                                            transfer.stats, desc=f"jbda round {rounds + 1}")
            step = self.step if self.tau is None else self.step * (-1) ** (rounds // self.tau)
            # Random order, so that a prefix of this round is a random subset of its candidates.
            order = torch.randperm(len(images), generator=generator)[:target - len(cache)]
            moved = jacobian_step(substitute, images[order], labels[order], step, self.batch_size,
                                  training.device)
            self._query(cache, box, moved)
            rounds += 1
            sizes.append(len(cache))
        info = {"transfer_set": transfer.name, "seed_size": n_seed, "rounds": rounds, "set_sizes": sizes}
        # The substitutes of the rounds are part of the thief's cost, as the queries are.
        return train_per_budget(cache, budgets, training, box, transfer.stats,
                                time.perf_counter() - start, self.name, info)

    def _query(self, cache: QueryCache, box: QueryBoundary, images: Tensor) -> None:
        for start in range(0, len(images), self.batch_size):
            cache.query(box, images[start:start + self.batch_size].float().contiguous())
