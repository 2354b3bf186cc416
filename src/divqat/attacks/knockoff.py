"""KnockoffNets with the random policy (Orekondy et al., "Knockoff Nets: Stealing Functionality
of Black-Box Models", CVPR 2019).

The thief queries natural images of its own (a transfer set, e.g. MNIST against a Fashion-MNIST
victim, or unseen in-distribution images), stores the answers and trains a surrogate on them
with soft cross-entropy; from a label-only box it trains on the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    Stolen,
    SurrogateTraining,
    TransferSet,
    query_in_batches,
    train_per_budget,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_int


@ATTACKS.register("knockoff")
class Knockoff(Attack):
    """KnockoffNets, random policy: query a random sample of the transfer set, train on the answers.

    Orekondy et al., CVPR 2019. The largest budget's images are drawn once (without replacement,
    seeded) and queried once; the surrogate of a smaller budget trains on a prefix of them, so a
    sweep costs the largest budget's queries, not their sum.

    Arguments:
        batch_size (int): images per query. (Default: 256.)

    Example::
        >>> stolen = Knockoff().steal(box, [1000, 10000], SurrogateTraining(epochs=30), transfer=mnist)
        >>> stolen[-1].surrogate(images).argmax(1)
    """

    name = "knockoff"
    uses_transfer_set = True

    def __init__(self, batch_size: int = 256) -> None:
        self.batch_size = check_int("knockoff", "batch_size", batch_size, low=1)

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        n = min(budgets[-1], len(transfer))
        generator = torch.Generator().manual_seed(training.seed)
        chosen = torch.randperm(len(transfer), generator=generator)[:n]
        cache = QueryCache()
        query_in_batches(cache, box, transfer.images[chosen], self.batch_size, training.progress)
        info = {"transfer_set": transfer.name, "transfer_images": len(transfer)}
        if budgets[-1] > len(transfer):
            info["note"] = f"the transfer set has only {len(transfer)} images; larger budgets used all of them"
        return train_per_budget(cache, budgets, training, box, transfer.stats, cache.seconds, self.name, info)
