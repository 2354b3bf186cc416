"""Reverse sigmoid (Lee et al. 2019), and the perturbation it shares with DCP."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from divqat.checks import check_bool, check_number
from divqat.defenses.base import DEFENSES, Defense

# y is clamped into [_Y_MIN, 1 - _Y_MIN] before the logit, so y = 0 and y = 1 stay finite; this
# is also the lower odds clamp (1e-12) of the reference code.
_Y_MIN = 1e-12
# The reference code's upper clamp on the odds y / (1 - y), as a bound on the logit.
_LOGIT_MAX_CLAMPED = math.log(1 - 1e-12)


def reverse_sigmoid_noise(y: Tensor, gamma: float, clamp_odds: bool) -> Tensor:
    """``r(y) = sigmoid(gamma * logit(y)) - 1/2`` elementwise (Lee et al. 2019, eq. 3 without
    beta), for posteriors ``y`` (N, K) in float64.

    ``clamp_odds=True`` bounds the odds ``y / (1 - y)`` to [1e-12, 1 - 1e-12] as the code of
    Khaled et al. (and so the published DCP and DivQAT numbers) does: ``logit <= 0``, hence
    ``r = 0`` (to 1e-13) for ``y >= 1/2`` and ``r < 0`` below, so the defense only raises small
    probabilities.
    ``clamp_odds=False`` is the formula as printed: ``r`` has the sign of ``logit(y)``, lowering
    probabilities above 1/2 and raising those below.
    """
    logit = torch.logit(y, eps=_Y_MIN)  # clamps y into [eps, 1 - eps] first
    if clamp_odds:
        logit = logit.clamp_max(_LOGIT_MAX_CLAMPED)
    return torch.sigmoid(gamma * logit) - 0.5


@DEFENSES.register("reverse-sigmoid")
class ReverseSigmoid(Defense):
    """Reverse sigmoid: deceptive perturbation that inverts the sigmoid on each probability.

    Lee et al., "Defending Against NN Model Stealing Attacks Using Deceptive Perturbations"
    (IEEE S&P Workshops 2019)::

        r(y) = sigmoid(gamma * logit(y)) - 1/2
        y'   = N(y - beta * r(y)),     N = clip at 0, divide by the row sum

    Arguments:
        beta (float): perturbation strength, >= 0. (Default: 0.5; papers sweep 0 to about 1.3.)
        gamma (float): sigmoid slope, >= 0. (Default: 0.2, as Khaled et al.; 0.1 for CIFAR-100.)
        clamp_odds (bool): clamp the odds at 1 - 1e-12 like the reference code of Khaled et al.
            (Default: True.) Chosen so that reverse sigmoid, DCP and DivQAT+defense results are
            comparable with the published ones. With the clamp, ``r <= 0``: classes with
            ``y >= 1/2`` are untouched, the others raised, so the posterior flattens and the
            argmax is usually kept. ``False`` uses the printed formula (see
            ``reverse_sigmoid_noise``), which also lowers the top class and can flip the argmax.

    Deviations from the formula: ``y`` is clamped into [1e-12, 1 - 1e-12] before the logit so one-hot
    rows stay finite; a row that clipping leaves all zero becomes a one-hot on its argmax.

    Shape:
        posteriors (N, K) -> (N, K).

    Examples::
        >>> defense = ReverseSigmoid(beta=0.5, gamma=0.2)
        >>> defended = defense(posteriors)
    """

    name = "reverse-sigmoid"
    fusable = True

    def __init__(self, beta: float = 0.5, gamma: float = 0.2, clamp_odds: bool = True) -> None:
        self.beta = check_number(self.name, "beta", beta, low=0.0)
        self.gamma = check_number(self.name, "gamma", gamma, low=0.0)
        self.clamp_odds = check_bool(self.name, "clamp_odds", clamp_odds)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        r = reverse_sigmoid_noise(y, self.gamma, self.clamp_odds)
        return y - self.beta * r  # N(.) is the base class's output normalization
