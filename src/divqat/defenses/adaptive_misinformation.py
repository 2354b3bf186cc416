"""Adaptive misinformation (Kariyappa & Qureshi, CVPR 2020), and its misinformation loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from divqat.checks import check_number
from divqat.defenses.base import DEFENSES, Defense, module_device, uncertainty_gate
from divqat.errors import ConfigError


def misinformation_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Loss that trains the misinformation model to be wrong: ``-log(1 - p_y + 1e-12)``.

    Minimizing it drives the probability of the true class ``p_y`` to 0 (Kariyappa & Qureshi,
    CVPR 2020). Computed as ``-logaddexp(log(1 - p_y), log 1e-12)`` with ``log(1 - p_y)`` from a
    logsumexp over the other classes, which is the same number without the cancellation of
    ``1 - p_y`` when ``p_y`` is close to 1.

    Shape:
        logits (N, K), labels (N,) int64 -> scalar ("mean", "sum") or (N,) ("none").
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"misinformation_loss: logits (N, K) and labels (N,) expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    log_p = F.log_softmax(logits, dim=1)
    true = F.one_hot(labels, logits.shape[1]).bool()
    log_not_y = torch.logsumexp(log_p.masked_fill(true, -math.inf), dim=1)
    loss = -torch.logaddexp(log_not_y, torch.full_like(log_not_y, math.log(1e-12)))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"misinformation_loss: reduction must be mean, sum or none, got {reduction!r}")


@DEFENSES.register("adaptive-misinformation")
class AdaptiveMisinformation(Defense):
    """Adaptive misinformation: answer unsure queries with a deliberately wrong model's posterior.

    Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with Adaptive Misinformation"
    (CVPR 2020)::

        a(x) = 1 / (1 + exp(nu * (max_k y_k - tau)))      ~1 if max y < tau (likely OOD)
        y'   = (1 - a(x)) y + a(x) y_mis,    y_mis = softmax(misinformation_model(x))

    The detector is the max-probability (MSP) score, as in the reference code; the paper also
    uses an outlier-exposure detector, not implemented here.

    Arguments:
        misinformation_model (callable): images (N, C, H, W) -> logits (N, K), trained with
            ``misinformation_loss`` on the victim's training set (training it is not this
            class's job). It sees the same images as the victim (same preprocessing). Required.
        tau (float): threshold on the max probability, >= 0. (Default: 0.5.)
        nu (float): detector steepness, > 0. (Default: 1000.)

    Shape:
        posteriors (N, K), images (N, C, H, W) -> (N, K).

    Examples::
        >>> defense = AdaptiveMisinformation(misinformation_model=mis_model, tau=0.5)
        >>> defended = defense(posteriors, images=images)
    """

    name = "adaptive-misinformation"
    not_fusable_because = "it runs a second model (the misinformation model) beside the victim"
    model_param = "misinformation_model"
    model_help = ("a model of the victim's architecture trained to be wrong on the victim's training "
                  "images; trained on first use (--misinformation-epochs), kept in "
                  "VICTIM/misinformation/")
    trains_model = True
    needs_inputs = True

    def __init__(self, misinformation_model: Callable[[Tensor], Tensor] | None = None,
                 tau: float = 0.5, nu: float = 1000.0) -> None:
        if misinformation_model is None or not callable(misinformation_model):
            raise ConfigError(
                f"{self.name}: needs misinformation_model, a callable images -> logits trained "
                "with divqat.defenses.adaptive_misinformation.misinformation_loss; got "
                f"{misinformation_model!r}")
        if isinstance(misinformation_model, torch.nn.Module):
            misinformation_model.eval()  # its BatchNorm must not learn from the attacker's queries
        self.misinformation_model = misinformation_model
        self.tau = check_number(self.name, "tau", tau, low=0.0)
        self.nu = check_number(self.name, "nu", nu, low=0.0, low_open=True)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        device = module_device(self.misinformation_model)
        x = images if device is None else images.to(device)
        mis_logits = self.misinformation_model(x)
        if not isinstance(mis_logits, Tensor) or mis_logits.shape != y.shape:
            raise ValueError(f"{self.name}: misinformation_model must return logits of shape "
                             f"{tuple(y.shape)}, got {getattr(mis_logits, 'shape', type(mis_logits))}")
        y_mis = torch.softmax(mis_logits.to(device=y.device, dtype=torch.float64), dim=1)
        gate = uncertainty_gate(y, self.tau, self.nu)
        return (1 - gate) * y + gate * y_mis
