"""DCP, "Deception": reverse-sigmoid noise only where the victim is unsure (Khaled et al.)."""

from __future__ import annotations

from torch import Tensor

from divqat.checks import check_bool, check_number
from divqat.defenses.base import DEFENSES, Defense, uncertainty_gate
from divqat.defenses.reverse_sigmoid import reverse_sigmoid_noise


@DEFENSES.register("dcp")
class DCP(Defense):
    """DCP: reverse-sigmoid perturbation gated by a soft uncertainty detector.

    Khaled et al., "Efficient Defense Against Model Stealing Attacks on Convolutional Neural
    Networks" (arXiv 2309.01838; code: KacemKhaled/defending-extraction)::

        a(x) = 1 / (1 + exp(nu * (max_k y_k - tau)))      ~1 if max y < tau, ~0 above
        y'   = N(y - a(x) * beta * r(y)),                  r = reverse-sigmoid noise

    Confident answers (max y clearly above tau) pass unchanged; unsure ones, typical of the
    out-of-distribution queries of a thief, get reverse-sigmoid noise. No extra model and no
    gradients, hence its low latency.

    Arguments:
        beta (float): perturbation strength, >= 0. (Default: 0.5.)
        tau (float, optional): detector threshold on the max probability, >= 0 (> 1 perturbs
            every answer). (Default: None, meaning tau = beta: the authors sweep a single number
            over 0, 0.1, ..., 1.0, 1.2, 1.5, so ``beta=0.5`` alone gives tau = beta = 0.5.)
        gamma (float): sigmoid slope of the noise, >= 0. (Default: 0.2; 0.1 for CIFAR-100.)
        nu (float): detector steepness, > 0. (Default: 1000.)
        clamp_odds (bool): the reference code's odds clamp, see ``ReverseSigmoid``. (Default: True,
            as in the authors' code.)

    With nu = 1000 a posterior whose max is >= tau + 0.02 has a < 2.1e-9, so it moves by at most
    about 1e-9 * beta (in L1, a few times that).

    Shape:
        posteriors (N, K) -> (N, K).

    Examples::
        >>> defense = DCP(beta=0.5)            # tau = beta = 0.5
        >>> defense = DCP(beta=0.8, tau=0.6)
        >>> defended = defense(posteriors)
    """

    name = "dcp"
    fusable = True

    def __init__(self, beta: float = 0.5, tau: float | None = None, gamma: float = 0.2,
                 nu: float = 1000.0, clamp_odds: bool = True) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0)
        self.tau = self.beta if tau is None else check_number(self.name, "tau", tau, low=0.0)
        self.gamma = check_number(self.name, "gamma", gamma, low=0.0)
        self.nu = check_number(self.name, "nu", nu, low=0.0, low_open=True)
        self.clamp_odds = check_bool(self.name, "clamp_odds", clamp_odds)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        gate = uncertainty_gate(y, self.tau, self.nu)
        r = reverse_sigmoid_noise(y, self.gamma, self.clamp_odds)
        return y - (self.beta * gate) * r  # N(.) is the base class's output normalization
