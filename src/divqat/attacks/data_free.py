"""What the data-free attacks (DFME, MAZE) share: the query generator, the zeroth-order gradient
estimate through the black box, and the budgeted generator-versus-student training loop.

Truong et al., "Data-Free Model Extraction", CVPR 2021; Kariyappa et al., "MAZE", CVPR 2021.
"""

from __future__ import annotations

import abc
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divqat.attacks.base import Attack, Stolen, SurrogateTraining, build_surrogate
from divqat.boundary import QueryBoundary
from divqat.checks import check_int, check_number

# Posteriors are floored here before the log: a defense (or float32 softmax) may return exact
# zeros, and an unbounded pseudo-logit would dominate the L1 loss.
PROBABILITY_FLOOR = 1e-8

# BatchNorm in the generator and the student needs more than one image per batch; a final,
# budget-shrunk iteration smaller than this is not run.
MIN_BATCH = 2


class QueryGenerator(nn.Module):
    """DCGAN-style generator of queries (the DFME / MAZE generator).

    z (N, nz) -> a linear layer to 2 * width channels at a quarter of the image size, BatchNorm,
    two (nearest x2 upsample, 3x3 conv, BatchNorm, LeakyReLU 0.2) stages (2 * width then width
    channels; the references' width is 64), a 3x3 conv to C channels and a BatchNorm without
    affine parameters. ``forward`` returns that last output, the *pre-activation* (N, C, H, W);
    ``to_images`` maps it into [0, 1] with ``(tanh(a) + 1) / 2``. Any (H, W) works: the
    generator draws at 4 * ceil(H / 4) x 4 * ceil(W / 4) and bilinearly resizes the
    pre-activation when that differs.

    Example::
        >>> g = QueryGenerator(256, (1, 28, 28))
        >>> images = QueryGenerator.to_images(g(torch.randn(8, 256)))   # (8, 1, 28, 28) in [0, 1]
    """

    def __init__(self, nz: int, image_shape: tuple[int, int, int], width: int = 64) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (c, h, w)
        self.base = (math.ceil(h / 4), math.ceil(w / 4))
        self.project = nn.Linear(nz, 2 * width * self.base[0] * self.base[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.block1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
                                    nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(2 * width, width, 3, 1, 1), nn.BatchNorm2d(width),
                                    nn.LeakyReLU(0.2))
        self.head = nn.Sequential(nn.Conv2d(width, c, 3, 1, 1), nn.BatchNorm2d(c, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        x = self.project(z).view(len(z), -1, *self.base)
        x = self.block1(F.interpolate(self.bn0(x), scale_factor=2))
        x = self.head(self.block2(F.interpolate(x, scale_factor=2)))
        if tuple(x.shape[2:]) != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return x

    @staticmethod
    def to_images(pre: Tensor) -> Tensor:
        return (torch.tanh(pre) + 1) / 2


def pseudo_logits(posteriors: Tensor) -> Tensor:
    """DFME's stand-in for the victim's logits: ``log p`` (floored at 1e-8) minus its row mean,
    (N, K). A softmax forgets the logits' per-row offset; centring fixes one."""
    log_p = posteriors.clamp_min(PROBABILITY_FLOOR).log()
    return log_p - log_p.mean(dim=1, keepdim=True)


@dataclass(frozen=True)
class DataFreeSettings:
    """The parameters of the generator-versus-student game that DFME and MAZE share. Each attack
    declares them again with its reference's defaults (``DFMESettings``, ``MAZESettings``) and
    says what each one does; the attack takes them by name (``DFME(directions=2)``,
    ``--attack-param directions=2``), and its ``params()`` lists them in this order."""

    batch_size: int
    g_iter: int
    d_iter: int
    directions: int
    eps: float
    generator_lr: float
    student_lr: float
    nz: int
    generator_width: int

    def checked(self, owner: str) -> dict[str, Any]:
        """The parameters by name, each validated and converted as the checks return it;
        errors name ``owner`` (the attack)."""
        return {
            "batch_size": check_int(owner, "batch_size", self.batch_size, low=MIN_BATCH),
            "g_iter": check_int(owner, "g_iter", self.g_iter, low=0),
            "d_iter": check_int(owner, "d_iter", self.d_iter, low=1),
            "directions": check_int(owner, "directions", self.directions, low=1),
            "eps": check_number(owner, "eps", self.eps, low=0, low_open=True),
            "generator_lr": check_number(owner, "generator_lr", self.generator_lr, low=0, low_open=True),
            "student_lr": check_number(owner, "student_lr", self.student_lr, low=0, low_open=True),
            "nz": check_int(owner, "nz", self.nz, low=1),
            "generator_width": check_int(owner, "generator_width", self.generator_width, low=1),
        }


class DataFreeAttack(Attack):
    """The generator-versus-student loop shared by DFME and MAZE (not registered itself).

    Subclasses declare their parameters and defaults as ``Settings`` (a ``DataFreeSettings``;
    the constructor takes them by name and sets each, validated, as an attribute of the same
    name) and define the losses, the generator's optimizer and the learning-rate schedule;
    ``_begin`` / ``_after_student_steps`` add per-run state such as MAZE's experience replay.
    """

    soft_only = True
    # MAZE trains the student's first step on the generator step's unperturbed images (already
    # answered), which saves one batch of queries per iteration; DFME draws a fresh batch.
    reuse_generator_batch: ClassVar[bool] = False

    # The attack's parameters with their defaults: what the registry lists and ``params()`` reads;
    # each becomes an attribute of the same name (``self.batch_size``, ...: DataFreeSettings).
    Settings: ClassVar[type[DataFreeSettings]]

    def __init__(self, **params: Any) -> None:
        for name, value in self.Settings(**params).checked(self.name).items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ what subclasses define
    @abc.abstractmethod
    def sample_loss(self, logits: Tensor, posteriors: Tensor) -> Tensor:
        """Per-image disagreement (N,) that the generator maximizes."""

    @abc.abstractmethod
    def student_loss(self, logits: Tensor, posteriors: Tensor) -> Tensor:
        """Scalar loss the student minimizes."""

    @abc.abstractmethod
    def generator_optimizer(self, params, weight_decay: float) -> torch.optim.Optimizer:
        """The generator's optimizer over ``params``."""

    def lr_factor(self, progress: float) -> float:
        """Learning-rate multiplier (student and generator) at ``progress`` in [0, 1] of the run."""
        return 1.0

    def _begin(self, box: QueryBoundary, device: torch.device) -> Any:
        return None

    def _after_student_steps(self, state: Any, student: nn.Module, optimizer: torch.optim.Optimizer,
                             batches: list[tuple[Tensor, Tensor]], rng: torch.Generator) -> dict:
        return {}

    # ------------------------------------------------------------------ the shared loop
    def queries_per_image(self) -> int:
        """Queries per image of the batch in one iteration (an iteration costs batch * this)."""
        reuse = int(self.reuse_generator_batch and self.g_iter > 0)
        return self.g_iter * (self.directions + 1) + self.d_iter - reuse

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              **kwargs: Any) -> list[Stolen]:
        """One online run up to the largest budget; the student is snapshotted at each budget.

        A data-free surrogate is trained *during* the querying, so it cannot be retrained on a
        prefix of the queries as KnockoffNets does; a fresh run per budget would cost the sum of
        the budgets. As in the DFME and MAZE papers (which report accuracy against queries over one
        run), each budget's ``Stolen`` is a copy of the student (eval mode) taken when the run
        reaches that budget. The learning-rate schedule spans the largest budget, so a smaller
        budget's snapshot is not what a run with only that budget would give.

        The iteration before each snapshot is shrunk (a smaller batch) to fit the budget, so each
        snapshot uses fewer than ``2 * queries_per_image()`` queries less than its budget (the
        smallest batch is 2 images), unless the box runs out first. ``Stolen.queries_used`` counts
        this attack's queries (the box's count when the box was fresh).

        Of ``training`` the attack uses ``arch``, ``seed`` (student and generator initialization,
        noise, directions), ``device``, ``progress`` and ``weight_decay``; ``epochs``,
        ``batch_size``, ``lr``, ``temperature``, ``augment`` and ``hflip`` describe training on
        stored queries and do not apply.
        """
        box, budgets = self._start(box, budgets)
        from tqdm.auto import tqdm

        start = time.perf_counter()
        device = torch.device(training.device)
        rng = torch.Generator().manual_seed(training.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(training.seed)
            generator = QueryGenerator(self.nz, box.input_shape, self.generator_width).to(device)
        student = build_surrogate(training.arch, box.input_shape, box.num_classes, None,
                                  training.seed).to(device)
        opt_s = torch.optim.SGD(student.parameters(), lr=self.student_lr, momentum=0.9,
                                weight_decay=training.weight_decay)
        opt_g = self.generator_optimizer(generator.parameters(), training.weight_decay)
        base_lrs = [(opt, [group["lr"] for group in opt.param_groups]) for opt in (opt_s, opt_g)]
        state = self._begin(box, device)

        first = box.queries_used
        per_image = self.queries_per_image()
        pending = list(budgets)
        out: list[Stolen] = []
        iterations, losses = 0, {}
        bar = tqdm(total=budgets[-1], desc=f"{self.name} queries", unit="q", leave=False,
                   disable=None if training.progress else True, dynamic_ncols=True)
        try:
            while pending:
                used = box.queries_used - first
                room = pending[0] - used
                if box.queries_left is not None:
                    room = min(room, box.queries_left)
                batch = min(self.batch_size, room // per_image)
                if batch < MIN_BATCH:
                    info = {"iterations": iterations,
                            "queries_per_iteration": self.batch_size * per_image,
                            **{k: round(v, 6) for k, v in losses.items()}}
                    out.append(Stolen(pending.pop(0), copy.deepcopy(student).eval(), used,
                                      time.perf_counter() - start, [], info))
                    continue
                factor = self.lr_factor(used / budgets[-1])
                for opt, lrs in base_lrs:
                    for group, lr in zip(opt.param_groups, lrs, strict=True):
                        group["lr"] = lr * factor
                losses = self._iteration(box, generator, student, opt_g, opt_s, batch, rng,
                                         device, state)
                iterations += 1
                bar.update(box.queries_used - first - used)
                bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        finally:
            bar.close()
        return out

    def _iteration(self, box: QueryBoundary, generator: QueryGenerator, student: nn.Module,
                   opt_g: torch.optim.Optimizer, opt_s: torch.optim.Optimizer, batch: int,
                   rng: torch.Generator, device: torch.device, state: Any) -> dict[str, float]:
        generator.train()
        losses: dict[str, float] = {}
        reused = None
        for _ in range(self.g_iter):
            pre = generator(self._noise(batch, rng, device))
            grad, loss, reused = self._estimate_gradient(box, student, pre.detach(), rng)
            opt_g.zero_grad(set_to_none=True)
            # The optimizer descends; the generator ascends the disagreement.
            pre.backward(-grad)
            opt_g.step()
            losses["generator_loss"] = loss
        student.train()
        batches = []
        for step in range(self.d_iter):
            if step == 0 and self.reuse_generator_batch and reused is not None:
                images, answers = reused
            else:
                with torch.no_grad():
                    images = QueryGenerator.to_images(generator(self._noise(batch, rng, device)))
                answers = box.query(images.cpu()).to(device)
            loss = self.student_loss(student(images), answers)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            batches.append((images, answers))
            losses["student_loss"] = float(loss.detach())
        losses.update(self._after_student_steps(state, student, opt_s, batches, rng))
        return losses

    def _noise(self, n: int, rng: torch.Generator, device: torch.device) -> Tensor:
        return torch.randn((n, self.nz), generator=rng).to(device)

    @torch.no_grad()
    def _estimate_gradient(self, box: QueryBoundary, student: nn.Module, pre: Tensor,
                           rng: torch.Generator) -> tuple[Tensor, float, tuple[Tensor, Tensor]]:
        """Forward-difference estimate of d mean_i L_i / d pre, L_i = ``sample_loss`` of image i.

        pre: the generator's pre-activation (N, C, H, W). With m unit directions u_j per image,
        ``grad_i = (d / m) sum_j (L_i(a_i + eps u_j) - L_i(a_i)) / eps * u_j / N``, d = C * H * W
        (DFME eq. 5, MAZE eq. 7). As in both references the points are perturbed before the
        activation, so every query is a valid image in [0, 1] without clamping (a clamp would
        zero the estimate's components at saturated pixels). All N * (m + 1) points are one
        query. Returns the estimate, the mean loss at the unperturbed points and those images
        with their answers.
        """
        n, m, d = len(pre), self.directions, pre[0].numel()
        u = torch.randn((n, m, *pre.shape[1:]), generator=rng).to(pre.device)
        u /= u.flatten(2).norm(dim=2)[..., None, None, None]
        points = torch.cat([pre.unsqueeze(1), pre.unsqueeze(1) + self.eps * u], dim=1)
        images = QueryGenerator.to_images(points.flatten(0, 1))
        answers = box.query(images.cpu()).to(pre.device)
        # Eval mode: each image's loss must not depend on the rest of the batch (BatchNorm's batch
        # statistics would mix the perturbed copies), and the copies must not move its statistics.
        was_training = student.training
        student.eval()
        loss = self.sample_loss(student(images), answers).view(n, m + 1)
        student.train(was_training)
        slopes = (loss[:, 1:] - loss[:, :1]) / self.eps
        grad = (d / m) * (slopes[..., None, None, None] * u).sum(dim=1) / n
        first = images.view(n, m + 1, *pre.shape[1:])[:, 0]
        return grad, float(loss[:, 0].mean()), (first, answers.view(n, m + 1, -1)[:, 0])
