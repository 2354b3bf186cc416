"""Add a defense: smooth each posterior toward the uniform distribution.

One file, one class on ``divqat.defenses.Defense``, registered by the name the command line and
the configs use. ``forward`` gets float64 rows that sum to 1 and returns scores; the base class
clips them at 0, renormalizes and checks them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from divqat.checks import check_number
from divqat.defenses import DEFENSES, Defense


@DEFENSES.register("smooth")
class Smooth(Defense):
    """Smoothing: mix each posterior with the uniform distribution, ``y' = (1 - eps) y + eps / K``.

    Keeps every argmax and flattens the rest of the posterior, which is what a soft-label thief
    learns from.

    Arguments:
        eps (float): weight of the uniform distribution, in [0, 1). (Default: 0.3.)

    Shape:
        posteriors (N, K) -> (N, K).
    """

    name = "smooth"
    # A deterministic formula of y alone: the served path may compile it into an int8 victim.
    fusable = True

    def __init__(self, eps: float = 0.3) -> None:
        self.eps = check_number(self.name, "eps", eps, low=0.0, high=0.999)

    def forward(self, y: Tensor, logits: Tensor | None, images: Tensor | None) -> Tensor:
        return (1 - self.eps) * y + self.eps / y.shape[1]


def demo() -> Tensor:
    """Serve a tiny victim behind the new defense, by its registered name."""
    from divqat.blackbox import BlackBox
    from divqat.defenses import create_defense

    torch.manual_seed(0)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    images = torch.rand(32, 1, 8, 8)
    box = BlackBox(victim, create_defense("smooth", eps=0.5), budget=64,
                   input_shape=(1, 8, 8), num_classes=10)
    answers = box.query(images)  # what the thief receives
    clean = torch.softmax(victim(images), dim=1)
    assert torch.equal(answers.argmax(dim=1), clean.argmax(dim=1))  # every label kept
    assert answers.max() <= 0.5 + 0.05 + 1e-6  # no answer above (1 - eps) + eps / K
    return answers


if __name__ == "__main__":
    print(demo()[:2])
