"""Data-free model extraction (Truong et al., "Data-Free Model Extraction", CVPR 2021).

The thief owns no images. A generator turns noise into queries; the student (the surrogate) learns
to match the victim on them while the generator learns to make queries on which the two disagree
most. The victim is a black box, so the generator's gradient through it is estimated by forward
differences along random directions, and every one of those evaluation points is a counted query.

The generator, the zeroth-order gradient estimate and the budgeted training loop that DFME shares
with MAZE are in ``divqat.attacks.data_free``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from divqat.attacks.base import ATTACKS
from divqat.attacks.data_free import DataFreeAttack, DataFreeSettings, pseudo_logits


@dataclass(frozen=True)
class DFMESettings(DataFreeSettings):
    """DFME's parameters with the reference's defaults (see ``DFME``)."""

    batch_size: int = 256
    g_iter: int = 1
    d_iter: int = 5
    directions: int = 1
    eps: float = 1e-3
    generator_lr: float = 1e-4
    student_lr: float = 0.1
    nz: int = 256
    generator_width: int = 64


@ATTACKS.register("dfme")
class DFME(DataFreeAttack):
    """DFME: a generator makes queries, the student matches the victim's pseudo-logits on them.

    Truong et al., "Data-Free Model Extraction", CVPR 2021 (algorithms.md section 4). Each
    iteration runs ``g_iter`` generator steps, then ``d_iter`` student steps on fresh generated
    batches. The student minimizes, the generator maximizes, the L1 distance between the
    student's logits and the victim's pseudo-logits ``log p - mean_k log p_k`` (the box returns
    posteriors, not logits). The generator's gradient through the box is a forward-difference
    estimate over ``directions`` random unit directions with step ``eps``; every evaluation point
    is a query, so an iteration costs ``batch_size * (g_iter * (directions + 1) + d_iter)`` queries
    (1,792 with the defaults). Student: SGD momentum 0.9, weight decay from ``SurrogateTraining``;
    generator: Adam; both learning rates x0.3 at 10 %, 30 % and 50 % of the largest budget (the
    reference's multistep schedule). Images from the generator are float32 (N, C, H, W) in
    [0, 1] at the box's input shape. See ``DataFreeAttack.steal`` for how budgets are served.

    Arguments:
        batch_size (int): images per generated batch (>= 2). (Default: 256.)
        g_iter (int): generator steps per iteration (0 = a fixed random generator). (Default: 1.)
        d_iter (int): student steps per iteration. (Default: 5.)
        directions (int): m, random directions of the gradient estimate. (Default: 1.)
        eps (float): forward-difference step, in the generator's pre-activation. (Default: 1e-3.)
        generator_lr (float): Adam learning rate of the generator (the reference's default; its
            published CIFAR-10 / SVHN runs used 5e-4 / 5e-5). (Default: 1e-4.)
        student_lr (float): SGD learning rate of the student. (Default: 0.1.)
        nz (int): latent size of the generator. (Default: 256.)
        generator_width (int): channels of the generator's last hidden layer (twice that in the
            first); the reference's 64 dominates the cost of a small victim. (Default: 64.)

    Example::
        >>> stolen = DFME(batch_size=128).steal(box, [100_000, 1_000_000], SurrogateTraining())
        >>> stolen[-1].surrogate(images).argmax(1), stolen[-1].info["iterations"]
    """

    name = "dfme"

    Settings = DFMESettings

    def sample_loss(self, logits: Tensor, posteriors: Tensor) -> Tensor:
        return (logits - pseudo_logits(posteriors)).abs().mean(dim=1)

    def student_loss(self, logits: Tensor, posteriors: Tensor) -> Tensor:
        return F.l1_loss(logits, pseudo_logits(posteriors))

    def generator_optimizer(self, params, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.generator_lr)

    def lr_factor(self, progress: float) -> float:
        return 0.3 ** sum(progress >= step for step in (0.1, 0.3, 0.5))
