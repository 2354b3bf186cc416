"""No defense: the victim's posteriors as they are (the baseline every defense is compared to)."""

from __future__ import annotations

import torch
from torch import Tensor

from divqat.defenses.base import DEFENSES, Defense


@DEFENSES.register("none")
class NoDefense(Defense):
    """No defense: return the victim's posteriors unchanged.

    Shape:
        posteriors (N, K) -> (N, K), the same values and dtype (a detached copy).

    Examples::
        >>> defense = NoDefense()
        >>> defended = defense(posteriors)
    """

    name = "none"
    fusable = True

    def __call__(self, posteriors: Tensor, *, logits: Tensor | None = None,
                 images: Tensor | None = None) -> Tensor:
        # Validate like every defense, but hand back the exact values: renormalizing in float64
        # and casting back could move a float32 entry by one ulp, and the baseline's l1 must be 0.
        self._checked(posteriors, logits, images)
        return posteriors.detach().clone()

    def serve(self, posteriors: Tensor, logits: Tensor, images: Tensor) -> Tensor:
        return posteriors.detach().clone()

    def epilogue(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        clean = torch.softmax(logits.float(), dim=1)
        return clean, clean.clone(), torch.zeros((), dtype=torch.int64, device=clean.device)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        return y
