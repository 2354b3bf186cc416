"""Random noise under an L1 budget."""

from __future__ import annotations

import torch
from torch import Tensor

from divqat.checks import check_choice, check_int, check_number
from divqat.defenses.base import DEFENSES, Defense


@DEFENSES.register("random-noise")
class RandomNoise(Defense):
    """Random noise: mix each posterior with a random distribution under an L1 budget.

    The random-perturbation baseline of Orekondy et al., "Prediction Poisoning: Towards Defenses
    Against DNN Model Stealing Attacks" (ICLR 2020)::

        y' = (1 - eps/2) y + (eps/2) u

    with ``u`` a random distribution, so ``||y' - y||_1 = (eps/2) ||u - y||_1 <= eps`` for every
    row (two distributions are at most 2 apart in L1): the budget holds exactly, not on average.

    Arguments:
        eps (float): L1 budget in [0, 2]. (Default: 0.5.) 0 returns ``y``.
        target (str): how ``u`` is drawn. "simplex" (default): uniform on the simplex
            (Dirichlet(1)); "vertex": a one-hot on a random class other than the argmax, as in
            the code of Mazeika et al. (2022) that Khaled et al. evaluate with, which spends more
            of the budget (``||y' - y||_1 = eps (1 - y_j)``) and may flip the argmax.
        seed (int, optional): seed of the private ``torch.Generator``. Two instances with the
            same seed give the same outputs for the same sequence of queries. ``None`` draws a
            seed, which ``params()`` then reports so a run can be repeated.

    The noise is fresh at every call, so an attacker who repeats a query can average it away;
    that is the weakness of this baseline, kept on purpose.

    Shape:
        posteriors (N, K) -> (N, K).

    Examples::
        >>> defense = RandomNoise(eps=0.5, seed=0)
        >>> defended = defense(posteriors)
    """

    name = "random-noise"
    not_fusable_because = ("it draws fresh random noise for every query, and a device program is a "
                           "fixed formula of the posteriors")

    def __init__(self, eps: float = 0.5, target: str = "simplex", seed: int | None = None) -> None:
        self.eps = check_number(self.name, "eps", eps, low=0.0, high=2.0)
        self.target = check_choice(self.name, "target", target, ("simplex", "vertex"))
        self._generator = torch.Generator()
        if seed is None:
            seed = self._generator.seed()
        self.seed = check_int(self.name, "seed", seed, low=0)
        self._generator.manual_seed(self.seed)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        n, k = y.shape
        # Drawn on the CPU from the private generator, so the noise does not depend on the device
        # nor on anyone else's use of the global RNG.
        if self.target == "simplex":
            # Exp(1) samples -log(1 - U), finite since U < 1; normalized, they are Dirichlet(1).
            u = -torch.log1p(-torch.rand(n, k, generator=self._generator, dtype=torch.float64))
            u = u / u.sum(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
        else:
            # A random class among the K - 1 non-argmax ones: shift draws at or past the argmax.
            top = y.argmax(dim=1).cpu()
            pick = torch.randint(max(k - 1, 1), (n,), generator=self._generator)
            pick = torch.where((pick >= top) & (k > 1), pick + 1, pick)
            u = torch.zeros(n, k, dtype=torch.float64).scatter_(1, pick[:, None], 1.0)
        u = u.to(y.device)
        return (1 - self.eps / 2) * y + (self.eps / 2) * u
