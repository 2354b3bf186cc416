"""Add an attack: a thief who queries uniform noise.

One file, one class on ``divqat.attacks.Attack``, registered by name. The attack holds only the
query boundary (``box``): it sends images, gets answers, and trains one surrogate per budget with
the shared recipe (``SurrogateTraining``). A baseline any real attack should beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    Stolen,
    SurrogateTraining,
    train_per_budget,
)
from divqat.boundary import QueryBoundary
from divqat.checks import check_int


@ATTACKS.register("noise")
class NoiseQueries(Attack):
    """Noise queries: send uniform random images, train on the answers.

    Data-free (no transfer set) and soft or label-only alike.

    Arguments:
        batch_size (int): images per query. (Default: 256.)
    """

    name = "noise"

    def __init__(self, batch_size: int = 256) -> None:
        self.batch_size = check_int(self.name, "batch_size", batch_size, low=1)

    def steal(self, box: QueryBoundary, budgets: Sequence[int], training: SurrogateTraining,
              **kwargs) -> list[Stolen]:
        box, budgets = self._start(box, budgets)  # checks the box and the budgets
        generator = torch.Generator().manual_seed(training.seed)
        cache = QueryCache()
        sent = 0
        while sent < budgets[-1]:
            n = min(self.batch_size, budgets[-1] - sent)
            cache.query(box, torch.rand(n, *box.input_shape, generator=generator))
            sent += n
        return train_per_budget(cache, budgets, training, box, None, cache.seconds, self.name)


def demo() -> list[Stolen]:
    """Steal a tiny victim with the new attack, built by its registered name."""
    from divqat.attacks import create_attack
    from divqat.blackbox import BlackBox

    torch.manual_seed(0)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    box = BlackBox(victim, budget=96, input_shape=(1, 8, 8), num_classes=4)
    training = SurrogateTraining(epochs=1, batch_size=32, progress=False)
    stolen = create_attack("noise", batch_size=32).steal(box, [32, 96], training)
    assert [s.queries_used for s in stolen] == [32, 96] and box.queries_used == 96
    assert stolen[-1].surrogate(torch.rand(5, 1, 8, 8)).shape == (5, 4)
    return stolen


if __name__ == "__main__":
    print([(s.budget, s.queries_used) for s in demo()])
