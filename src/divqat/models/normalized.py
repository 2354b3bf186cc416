"""The deployed model: the input normalization followed by a registered architecture.

Victims, the models defenses build from a victim (the misinformation model, MAD's surrogate) and
the thieves' surrogates are all this module, so each takes images float32 (N, C, H, W) in [0, 1]
and does its own normalization.
"""

from __future__ import annotations

import torch
from torch import nn

from divqat.data import Normalize
from divqat.models.registry import create_model


class VictimNet(nn.Module):
    """Normalization followed by a registered architecture: the whole deployed model."""

    def __init__(self, arch: str, in_channels: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = create_model(arch, in_channels=in_channels, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_net(meta: dict) -> VictimNet:
    """The untrained network of a victim's metadata (arch, input shape, classes, mean, std)."""
    c = meta["input_shape"][0]
    return VictimNet(meta["arch"], c, len(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"]))
