"""Top-k truncation (label-only at k = 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from divqat.checks import check_int
from divqat.defenses.base import DEFENSES, Defense, one_hot_argmax


@DEFENSES.register("top-k")
class TopK(Defense):
    """Top-k: keep the k largest probabilities of each posterior and renormalize.

    The passive truncation defense discussed by Tramer et al., "Stealing Machine Learning Models
    via Prediction APIs" (USENIX Security 2016) and Orekondy et al. (ICLR 2020). ``k = 1`` returns
    a one-hot label, i.e. a label-only API.

    Arguments:
        k (int): number of classes kept, >= 1. (Default: 1, label-only.) ``k >= K`` keeps all.

    Ties are broken deterministically: among equal probabilities the lowest class index is kept.

    Shape:
        posteriors (N, K) -> (N, K), at most k non-zero entries per row.

    Examples::
        >>> defense = TopK(k=3)
        >>> defended = defense(posteriors)
    """

    name = "top-k"
    fusable = True

    def __init__(self, k: int = 1) -> None:
        self.k = check_int(self.name, "k", k, low=1)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        k = min(self.k, y.shape[1])
        if k == 1:
            return one_hot_argmax(y)  # the same answer as the sort below, at a third of the cost
        # A stable descending sort keeps equal entries in index order, so ties go to the lowest
        # index (torch.topk makes no such promise).
        order = torch.sort(y, dim=1, descending=True, stable=True).indices[:, :k]
        kept = torch.zeros_like(y).scatter_(1, order, y.gather(1, order))
        # The largest entry of a distribution is > 0, so no row sums to zero.
        return kept / kept.sum(dim=1, keepdim=True)
