"""KnockoffNets with the adaptive policy (Orekondy et al., "Knockoff Nets: Stealing Functionality
of Black-Box Models", CVPR 2019, section 4.1.2).

Instead of a uniform sample of the transfer set, the thief learns *which of its own classes* are
worth querying: a gradient bandit (Sutton & Barto, section 2.8) over the transfer set's classes,
rewarded by what the victim's answers teach an online surrogate. The answers are stored, and the
surrogate of each budget is then trained from scratch on them exactly as in the random policy.
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
    build_surrogate,
    train_per_budget,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_choice, check_int, check_number
from divqat.data import to_float

REWARDS = ("cert", "div", "loss", "all")


class _RunningStats:
    """Running mean and (population) variance of a vector of rewards (Welford)."""

    def __init__(self, size: int) -> None:
        self.n = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self._m2 = torch.zeros(size, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self._m2 += delta * (x - self.mean)

    def standardize(self, x: Tensor) -> Tensor:
        """z-scores against everything seen so far; 0 where the spread is still 0 (first step,
        or a reward that never varies, like cert on a label-only box)."""
        std = (self._m2 / max(self.n, 1)).sqrt()
        return torch.where(std > 1e-12, (x - self.mean) / std.clamp_min(1e-12), torch.zeros_like(x))


@ATTACKS.register("knockoff-adaptive")
class KnockoffAdaptive(Attack):
    """KnockoffNets, adaptive policy: a gradient bandit chooses which transfer-set class to query.

    Orekondy et al., CVPR 2019. Each step draws a class ``z ~ softmax(H)`` over the transfer
    set's own classes (``transfer.labels``), queries ``batch_size`` of its images (never the same
    image twice in a run), scores the victim's answers ``y`` (N, K) with ``reward``, moves the
    preferences ``H`` by the gradient-bandit rule ``H_z += lr (r - r_bar)(1 - pi_z)``,
    ``H_j -= lr (r - r_bar) pi_j`` (``r_bar``: mean of the earlier rewards), and takes one SGD step
    on an online surrogate with the batch. Rewards (per batch, the mean over its images):

    - ``cert``: the margin between the two largest posteriors (the victim is sure of the class);
    - ``div``: ``sum_k max(0, y_k - y_bar_k)``, how far the answer exceeds the running mean of the
      answers per victim class (the paper's window is the whole run here), i.e. classes the
      thief has rarely seen;
    - ``loss``: the online surrogate's soft cross-entropy on the answer, computed before its SGD
      step (what it did not know yet);
    - ``all``: the sum of the three, each standardized by its running mean and standard deviation
      (ART's implementation; the three live on different scales).

    The online surrogate only scores rewards. Once the largest budget is spent, the surrogate of
    each budget is trained from scratch (``SurrogateTraining``) on the first ``budget`` stored
    queries, which are exactly what a run with that budget would have queried (same seed, same
    draws, truncated). From a label-only box the answers are one-hot for the rewards (``cert`` is
    then constant, and ``all`` reduces to ``div`` + ``loss``) and labels for training.

    Arguments:
        reward (str): ``cert``, ``div``, ``loss`` or ``all``. (Default: ``all``, the paper's best.)
        batch_size (int): images queried per bandit step. (Default: 64.)
        lr (float): step size of the bandit's preference update; constant, as in the gradient
            bandit of Sutton & Barto (ART decays it as 1 / pulls of the class). (Default: 0.1.)

    ``Stolen.info`` records ``pulls`` (bandit steps per transfer class), ``queried_per_class``
    (images per transfer class) and ``policy`` (the final class probabilities).

    Example::
        >>> stolen = KnockoffAdaptive(reward="all").steal(box, [1000, 10000], SurrogateTraining(), transfer=ts)
        >>> stolen[-1].info["pulls"]        # {transfer class: bandit steps}
    """

    name = "knockoff-adaptive"
    uses_transfer_set = True

    def __init__(self, reward: str = "all", batch_size: int = 64, lr: float = 0.1) -> None:
        self.reward = check_choice("knockoff-adaptive", "reward", reward, REWARDS)
        self.batch_size = check_int("knockoff-adaptive", "batch_size", batch_size, low=1)
        self.lr = check_number("knockoff-adaptive", "lr", lr, low=0, low_open=True)

    @property
    def queries_transfer_set_only(self) -> bool:
        return True  # the bandit picks a class; the query is an image of it from the transfer set

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              transfer: TransferSet | None = None, **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets, transfer)
        start = time.perf_counter()
        cache, record = self._collect(box, budgets[-1], training, transfer)
        info = {"transfer_set": transfer.name, "transfer_images": len(transfer), "reward": self.reward,
                **record}
        if len(cache) < budgets[-1]:
            info["note"] = f"the transfer set has only {len(transfer)} images; larger budgets used all of them"
        # The thief's collection cost includes the online surrogate, not only the victim's time.
        return train_per_budget(cache, budgets, training, box, transfer.stats,
                                time.perf_counter() - start, self.name, info)

    def _collect(self, box: QueryBoundary, target: int, training: SurrogateTraining,
                 transfer: TransferSet) -> tuple[QueryCache, dict]:
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(training.seed)
        classes, class_of = torch.unique(transfer.labels, return_inverse=True)
        # One shuffled pool per class, consumed front to back: sampling without replacement.
        pools = [torch.nonzero(class_of == c).flatten() for c in range(len(classes))]
        pools = [p[torch.randperm(len(p), generator=generator)] for p in pools]
        taken = [0] * len(pools)
        pulls = [0] * len(pools)
        prefs = torch.zeros(len(pools), dtype=torch.float64)
        device = torch.device(training.device)
        online = build_surrogate(training.arch, box.input_shape, box.num_classes, transfer.stats,
                                 training.seed).to(device)
        optimizer = torch.optim.SGD(online.parameters(), lr=training.lr, momentum=0.9, nesterov=True,
                                    weight_decay=training.weight_decay)
        mean_answer = torch.zeros(box.num_classes, dtype=torch.float64)
        answered = 0
        reward_stats = _RunningStats(3)
        baseline, steps = 0.0, 0
        cache = QueryCache()
        bar = tqdm(total=target, desc="knockoff-adaptive", leave=False,
                   disable=None if training.progress else True, dynamic_ncols=True)
        while len(cache) < target:
            left = torch.tensor([len(p) - t for p, t in zip(pools, taken, strict=True)])
            if not (left > 0).any():
                break
            # Exhausted classes leave the policy; the others keep their relative preferences.
            policy = torch.softmax(prefs.masked_fill(left == 0, float("-inf")), dim=0)
            arm = int(torch.multinomial(policy.float(), 1, generator=generator))
            n = min(self.batch_size, target - len(cache), int(left[arm]))
            chunk = transfer.images[pools[arm][taken[arm]:taken[arm] + n]]
            taken[arm] += n
            pulls[arm] += 1
            images = to_float(chunk)
            answers = cache.query(box, images, stored=chunk)
            bar.update(n)
            probs = (F.one_hot(answers, box.num_classes).float() if box.label_only
                     else answers.float())

            online.train()
            logits = online(images.to(device))
            # Per-image loss: its mean is the SGD objective, and before the step it is the reward.
            losses = -(probs.to(device) * F.log_softmax(logits / training.temperature, dim=1)).sum(dim=1)
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()

            answered += n
            mean_answer += (probs.double().sum(dim=0) - n * mean_answer) / answered
            reward = self._reward(probs.double(), mean_answer, losses.detach().double().cpu(),
                                  reward_stats)
            steps += 1
            if steps == 1:
                baseline = reward  # r_bar starts at the first reward: no move without a reference
            advantage = reward - baseline
            one_hot = F.one_hot(torch.tensor(arm), len(pools)).double()
            prefs += self.lr * advantage * (one_hot - policy)
            baseline += (reward - baseline) / steps
        bar.close()
        names = [int(c) for c in classes]
        record = {"pulls": dict(zip(names, pulls, strict=True)),
                  "queried_per_class": dict(zip(names, taken, strict=True)),
                  # The preferences as a distribution over every class (exhausted ones included).
                  "policy": {c: round(float(p), 6) for c, p in zip(names, torch.softmax(prefs, dim=0),
                                                                    strict=True)}}
        return cache, record

    def _reward(self, probs: Tensor, mean_answer: Tensor, losses: Tensor, stats: _RunningStats) -> float:
        """The batch's reward from the answers (N, K) as probabilities, the running mean answer
        (K,) including this batch, and the online surrogate's per-image losses (N,)."""
        if probs.shape[1] >= 2:
            top2 = probs.topk(2, dim=1).values
            cert = float((top2[:, 0] - top2[:, 1]).mean())
        else:
            cert = 1.0
        div = float((probs - mean_answer).clamp_min(0).sum(dim=1).mean())
        loss = float(losses.mean())
        if self.reward == "cert":
            return cert
        if self.reward == "div":
            return div
        if self.reward == "loss":
            return loss
        raw = torch.tensor([cert, div, loss], dtype=torch.float64)
        stats.update(raw)
        return float(stats.standardize(raw).sum())
