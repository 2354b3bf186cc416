"""Rounding the posteriors to a few decimals."""

from __future__ import annotations

import torch
from torch import Tensor

from divqat.checks import check_int
from divqat.defenses.base import DEFENSES, Defense, one_hot_argmax


@DEFENSES.register("rounding")
class Rounding(Defense):
    """Rounding: round each probability to a few decimals, then renormalize.

    The coarse-output defense of Tramer et al., "Stealing Machine Learning Models via Prediction
    APIs" (USENIX Security 2016), also a baseline in Orekondy et al. (ICLR 2020).

    Arguments:
        decimals (int): decimals kept, >= 0. (Default: 2, i.e. whole percentages.)

    Rounding is half to even (``torch.round``). A row that rounds to all zeros (e.g. ``decimals=0``
    and every probability below 0.5) would have no distribution left; it becomes a one-hot label
    on its argmax (lowest index on ties), the coarsest answer that keeps the prediction.
    Renormalizing means the output need not itself have ``decimals`` decimals.

    Shape:
        posteriors (N, K) -> (N, K).

    Examples::
        >>> defense = Rounding(decimals=1)
        >>> defended = defense(posteriors)
    """

    name = "rounding"
    fusable = True

    def __init__(self, decimals: int = 2) -> None:
        self.decimals = check_int(self.name, "decimals", decimals, low=0)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        rounded = torch.round(y, decimals=self.decimals)
        dead = rounded.amax(dim=1, keepdim=True) <= 0
        # Eagerly the rare dead row is worth a check; compiled, the branch-free form fuses.
        if torch.compiler.is_compiling() or dead.any():
            rounded = torch.where(dead, one_hot_argmax(y), rounded)
        return rounded  # renormalized by the base class
