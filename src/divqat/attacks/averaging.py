"""The averaging thief against randomized defenses: ModelGuard's smoothing attacker (Tang et al.,
"ModelGuard: Information-Theoretic Defense Against Model Extraction Attacks", USENIX Security
2024; code Yoruko-Tang/ModelGuard, ``queries_per_image``).

A defense that draws fresh noise for every answer hides less from a thief who asks several times:
the mean of ``m`` answers to views of one image has ``1/m`` of the noise's variance (not less of
its bias: noise toward a uniform target still flattens the mean). Every view is a query and counts
against the budget, so a budget of ``B`` buys ``B // m`` images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    Stolen,
    SurrogateTraining,
    TransferSet,
    train_per_budget,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_choice, check_int, check_number
from divqat.data import augment, to_float
from divqat.errors import ConfigError

VIEWS = ("crop", "noise", "repeat")


@ATTACKS.register("averaging")
class Averaging(Attack):
    """Averaging thief (ModelGuard's smoothing attacker): several augmented queries per image, averaged.

    Tang et al., USENIX Security 2024. The thief draws a random sample of its transfer set (as
    KnockoffNets) and queries ``views`` views of each image, all counted; the surrogate trains on
    the original image with the mean of its answers (from a label-only box, the share of views
    that got each label: a soft label). The views (``augment``):

    - ``crop``: random crop (pad 4) and, where the surrogate recipe flips, horizontal flip,
      each view its own draw: ModelGuard's ``--train_transform`` at query time;
    - ``noise``: Gaussian pixel noise of standard deviation ``sigma``, clipped to [0, 1];
    - ``repeat``: the image itself ``views`` times: only the defense's own randomness differs.

    A budget of B buys ``B // views`` images, each queried ``views`` times, in one call per
    image block; a smaller budget's surrogate trains on the first ``budget // views`` images,
    exactly what a run with that budget sends. Against a deterministic defense the views are
    plain test-time augmentation, at ``views`` times the price per image.

    Arguments:
        views (int): queries per image, >= 1. (Default: 4.)
        augment (str): ``crop``, ``noise`` or ``repeat``. (Default: ``crop``.)
        sigma (float): the noise's standard deviation for ``noise``. (Default: 0.05.)
        batch_size (int): queries per call (a multiple of ``views`` is sent: at least one
            image's views). (Default: 256.)

    ``Stolen.info`` records ``views`` and ``images`` (images bought), and the queries left unspent
    when the budget is not a multiple of ``views``.

    Example::
        >>> stolen = Averaging(views=4).steal(box, [4000], SurrogateTraining(), transfer=ts)
        >>> stolen[0].queries_used, stolen[0].info["images"]      # 4000, 1000
    """

    name = "averaging"
    uses_transfer_set = True

    def __init__(self, views: int = 4, augment: str = "crop", sigma: float = 0.05,
                 batch_size: int = 256) -> None:
        self.views = check_int("averaging", "views", views, low=1)
        self.augment = check_choice("averaging", "augment", augment, VIEWS)
        self.sigma = check_number("averaging", "sigma", sigma, low=0)
        self.batch_size = check_int("averaging", "batch_size", batch_size, low=1)

    @property
    def training_cost(self) -> float:
        return 1.0 / self.views  # one trained image per ``views`` queries

    @property
    def queries_transfer_set_only(self) -> bool:
        return self.augment == "repeat"  # crops and noise are not the transfer set's images

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        if budgets[0] < self.views:
            raise ConfigError(f"averaging: a budget of {budgets[0]} buys no image at {self.views} "
                              "queries per image")
        generator = torch.Generator().manual_seed(training.seed)
        n = min(budgets[-1] // self.views, len(transfer))
        images = transfer.images[torch.randperm(len(transfer), generator=generator)[:n]]
        cache = QueryCache()
        per_call = max(1, self.batch_size // self.views)
        from tqdm.auto import tqdm

        for start in tqdm(range(0, n, per_call), desc="averaging", leave=False,
                          disable=None if training.progress else True, dynamic_ncols=True):
            chunk = images[start:start + per_call]
            begun = time.perf_counter()
            answers = self._ask(box, chunk, generator, training.hflip)
            cache.add(chunk, answers, time.perf_counter() - begun)
        # The cache holds one row per image; train_per_budget takes images, not queries.
        image_budgets = [b // self.views for b in budgets]
        stolen = train_per_budget(cache, image_budgets, training, box, transfer.stats, cache.seconds,
                                  self.name, {"transfer_set": transfer.name, "views": self.views,
                                              "augment": self.augment})
        for s, budget in zip(stolen, budgets, strict=True):
            s.info.update(images=s.queries_used, unspent=budget - s.queries_used * self.views)
            if budget // self.views > n:
                s.info["note"] = f"the transfer set has only {len(transfer)} images"
            s.budget, s.queries_used = budget, s.queries_used * self.views
        return stolen

    def _ask(self, box: QueryBoundary, chunk: Tensor, generator: torch.Generator,
             hflip: bool) -> Tensor:
        """The mean answer (N, K) over ``views`` views of each of the uint8 images (N, C, H, W):
        posteriors, or label frequencies from a label-only box."""
        x = to_float(chunk)
        m = self.views
        views = x.repeat(m, 1, 1, 1)  # view-major: rows i, n + i, 2n + i, ... are image i's
        if self.augment == "crop":
            views = augment(views, hflip=hflip, generator=generator)
        elif self.augment == "noise":
            noise = torch.randn(views.shape, generator=generator) * self.sigma
            views = (views + noise).clamp_(0, 1)
        views = views.contiguous()
        if box.label_only:
            answers = F.one_hot(box.query_labels(views), box.num_classes).float()
        else:
            answers = box.query(views).float()
        return answers.view(m, len(x), -1).mean(dim=0)
