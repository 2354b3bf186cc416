"""MAZE (Kariyappa et al., "MAZE: Data-Free Model Stealing Attack Using Zeroth-Order Gradient
Estimation", CVPR 2021).

DFME's generator-versus-student game (``divqat.attacks.dfme``, sharing ``divqat.attacks.data_free``) with MAZE's choices: the
disagreement is KL(victim || student), the gradient estimate averages more directions, the first
student step reuses the generator step's already-answered images, and the student also replays
past queries, which costs no queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divqat.attacks.base import ATTACKS
from divqat.attacks.data_free import MIN_BATCH, DataFreeAttack, DataFreeSettings
from divqat.boundary import QueryBoundary
from divqat.checks import check_int


def kl_per_image(logits: Tensor, posteriors: Tensor) -> Tensor:
    """``KL(p || softmax(logits))`` per image (N,), for posteriors p (N, K); 0 log 0 = 0."""
    return F.kl_div(F.log_softmax(logits, dim=1), posteriors, reduction="none").sum(dim=1)


class ReplayBuffer:
    """A uniform sample (reservoir sampling) of at most ``capacity`` answered queries.

    MAZE's reference keeps every queried batch, which grows without bound (4 GB of CIFAR images
    at 5M queries); a reservoir keeps what it replays distributed like that, over the whole run, in
    fixed memory. images (capacity, C, H, W) and posteriors (capacity, K) live on ``device``.
    """

    def __init__(self, capacity: int, shape: tuple[int, int, int], num_classes: int,
                 device: torch.device) -> None:
        self.images = torch.empty((capacity, *shape), device=device)
        self.answers = torch.empty((capacity, num_classes), device=device)
        self.capacity, self.size, self.seen = capacity, 0, 0

    def add(self, images: Tensor, answers: Tensor, rng: torch.Generator) -> None:
        n = len(images)
        fill = min(n, self.capacity - self.size)
        self.images[self.size:self.size + fill] = images[:fill]
        self.answers[self.size:self.size + fill] = answers[:fill]
        self.size += fill
        # Item t of the stream (0-based) replaces a random slot with probability capacity / (t + 1).
        seen = self.seen + fill + torch.arange(1, n - fill + 1, dtype=torch.float64)
        slots = (torch.rand(n - fill, generator=rng, dtype=torch.float64) * seen).long()
        # In stream order: a later item may overwrite an earlier one in the same batch.
        for i, slot in enumerate(slots.tolist()):
            if slot < self.capacity:
                self.images[slot] = images[fill + i]
                self.answers[slot] = answers[fill + i]
        self.seen += n

    def sample(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randperm(self.size, generator=rng)[:n].to(self.images.device)
        return self.images[idx], self.answers[idx]


@dataclass(frozen=True)
class MAZESettings(DataFreeSettings):
    """MAZE's parameters with the reference's defaults (see ``MAZE``): DFME's game, plus the
    experience replay."""

    batch_size: int = 128
    g_iter: int = 1
    d_iter: int = 5
    directions: int = 10
    eps: float = 1e-3
    generator_lr: float = 1e-4
    student_lr: float = 0.1
    nz: int = 100
    generator_width: int = 64
    replay_size: int = 5000
    replay_steps: int = 10

    def checked(self, owner: str) -> dict[str, Any]:
        return {**super().checked(owner),
                "replay_size": check_int(owner, "replay_size", self.replay_size, low=MIN_BATCH),
                "replay_steps": check_int(owner, "replay_steps", self.replay_steps, low=0)}


@ATTACKS.register("maze")
class MAZE(DataFreeAttack):
    """MAZE: DFME's game with a KL disagreement, 10 directions and experience replay.

    Kariyappa et al., CVPR 2021 (algorithms.md section 4). Each iteration: ``g_iter`` generator
    steps ascending ``KL(victim posteriors || student posteriors)``, whose gradient through the box
    is a forward-difference estimate over ``directions`` random unit directions; ``d_iter`` student
    steps descending the same KL, the first on the last generator step's unperturbed images (already
    answered, as in the reference); then ``replay_steps`` student steps on batches drawn from a
    replay buffer of every answered student query (a uniform sample of at most ``replay_size``),
    which cost no queries. An iteration costs
    ``batch_size * (g_iter * (directions + 1) + d_iter - 1)`` queries (1,920 with the defaults).
    Student and generator: SGD momentum 0.9, weight decay from ``SurrogateTraining``, cosine
    learning rate over the largest budget (the reference's settings). Queries are float32
    (N, C, H, W) in [0, 1]. Budgets are served as in ``DataFreeAttack.steal`` (one run, a snapshot
    of the student per budget).

    Arguments:
        batch_size (int): images per generated batch (>= 2). (Default: 128.)
        g_iter (int): generator steps per iteration (0 = a fixed random generator). (Default: 1.)
        d_iter (int): student steps per iteration on new queries. (Default: 5.)
        directions (int): random directions of the gradient estimate. (Default: 10.)
        eps (float): forward-difference step, in the generator's pre-activation. (Default: 1e-3.)
        generator_lr (float): SGD learning rate of the generator. (Default: 1e-4.)
        student_lr (float): SGD learning rate of the student. (Default: 0.1.)
        nz (int): latent size of the generator. (Default: 100.)
        generator_width (int): channels of the generator's last hidden layer (twice that in the
            first). (Default: 64.)
        replay_size (int): most queries kept for replay (MAZE's reference kept all).
            (Default: 5000.)
        replay_steps (int): student steps on replayed queries per iteration (0 = no replay).
            (Default: 10.)

    Example::
        >>> stolen = MAZE().steal(box, [100_000, 1_000_000], SurrogateTraining())
        >>> stolen[-1].info["replay_loss"]
    """

    name = "maze"
    reuse_generator_batch = True

    Settings = MAZESettings
    replay_size: int
    replay_steps: int

    def sample_loss(self, logits: Tensor, posteriors: Tensor) -> Tensor:
        return kl_per_image(logits, posteriors)

    def student_loss(self, logits: Tensor, posteriors: Tensor) -> Tensor:
        return kl_per_image(logits, posteriors).mean()

    def generator_optimizer(self, params, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.generator_lr, momentum=0.9,
                               weight_decay=weight_decay)

    def lr_factor(self, progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _begin(self, box: QueryBoundary, device: torch.device) -> ReplayBuffer | None:
        if self.replay_steps == 0:
            return None
        return ReplayBuffer(self.replay_size, box.input_shape, box.num_classes, device)

    def _after_student_steps(self, state: Any, student: nn.Module, optimizer: torch.optim.Optimizer,
                             batches: list[tuple[Tensor, Tensor]], rng: torch.Generator) -> dict:
        if state is None:
            return {}
        for images, answers in batches:
            state.add(images, answers, rng)
        total = 0.0
        for _ in range(self.replay_steps):
            images, answers = state.sample(self.batch_size, rng)
            loss = self.student_loss(student(images), answers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        return {"replay_loss": total / self.replay_steps}
