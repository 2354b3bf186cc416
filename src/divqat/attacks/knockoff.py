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
from divqat.checks import check_int, check_number
from divqat.errors import ConfigError


@ATTACKS.register("knockoff")
class Knockoff(Attack):
    """KnockoffNets, random policy: query a random sample of the transfer set, train on the answers.

    Orekondy et al., CVPR 2019. The largest budget's images are drawn once (without replacement,
    seeded) and queried once; the surrogate of a smaller budget trains on a prefix of them, so a
    sweep costs the largest budget's queries, not their sum.

    The evasive thief (``mix`` > 0): against a detector that watches its stream, the thief mixes
    benign-looking queries into it, in-distribution images it holds (``steal(..., benign=...)``),
    a fraction ``mix`` of every budget, at random places in the stream. They are paid for and
    answered like the others (the surrogate trains on them too), but they are spent to look
    honest: a budget of N buys only (1 - mix) N transfer-set queries.

    Arguments:
        batch_size (int): images per query. (Default: 256.)
        mix (float): the share of benign-looking queries, in [0, 1). (Default: 0.)

    Example::
        >>> stolen = Knockoff().steal(box, [1000, 10000], SurrogateTraining(epochs=30), transfer=mnist)
        >>> stolen[-1].surrogate(images).argmax(1)
        >>> Knockoff(mix=0.5).steal(box, [5000], training, transfer=mnist, benign=holdout)
    """

    name = "knockoff"
    uses_transfer_set = True

    def __init__(self, batch_size: int = 256, mix: float = 0.0) -> None:
        self.batch_size = check_int("knockoff", "batch_size", batch_size, low=1)
        self.mix = check_number("knockoff", "mix", mix, low=0.0, high=0.999)

    @property
    def queries_transfer_set_only(self) -> bool:
        return self.mix == 0  # the evasive thief's benign images are not the transfer set's

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, benign: TransferSet | None = None,
              **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        generator = torch.Generator().manual_seed(training.seed)
        info = {"transfer_set": transfer.name, "transfer_images": len(transfer)}
        if self.mix > 0:
            if not isinstance(benign, TransferSet) or benign.images.shape[1:] != transfer.images.shape[1:]:
                raise ConfigError("knockoff with mix > 0 needs the thief's benign-looking images "
                                  "(benign=TransferSet at the victim's input shape)")
            images, is_benign = self._mixed(transfer, benign, budgets[-1], generator)
            info.update(mix=self.mix, benign_set=benign.name, benign_queries=int(is_benign.sum()),
                        benign_positions=is_benign.nonzero().flatten().add(1).tolist()[:10])
        else:
            n = min(budgets[-1], len(transfer))
            images = transfer.images[torch.randperm(len(transfer), generator=generator)[:n]]
        cache = QueryCache()
        query_in_batches(cache, box, images, self.batch_size, training.progress)
        if budgets[-1] > len(images):
            info["note"] = f"the transfer set has only {len(images)} images; larger budgets used all of them"
        return train_per_budget(cache, budgets, training, box, transfer.stats, cache.seconds, self.name, info)

    def _mixed(self, transfer: TransferSet, benign: TransferSet, n: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` queries, ``round(mix * n)`` of them benign, at random places (uint8 images, and
        which are benign)."""
        n_benign = min(round(self.mix * n), len(benign))
        n_transfer = min(n - n_benign, len(transfer))
        is_benign = torch.zeros(n_benign + n_transfer, dtype=torch.bool)
        is_benign[torch.randperm(len(is_benign), generator=generator)[:n_benign]] = True
        images = torch.empty(len(is_benign), *transfer.images.shape[1:], dtype=torch.uint8)
        images[~is_benign] = transfer.images[torch.randperm(len(transfer), generator=generator)[:n_transfer]]
        images[is_benign] = benign.images[torch.randperm(len(benign), generator=generator)[:n_benign]]
        return images, is_benign
