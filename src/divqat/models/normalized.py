"""The deployed model: the input normalization followed by an architecture.

Victims, the models defenses build from a victim (the misinformation model, MAD's surrogate) and
the thieves' surrogates are all this module, so each takes images float32 (N, C, H, W) in [0, 1]
and does its own normalization.
"""

from __future__ import annotations

import torch
from torch import nn

from divqat.data import Normalize
from divqat.models.registry import check_arch, create_model


class VictimNet(nn.Module):
    """Normalization followed by an architecture: the whole deployed model.

    ``arch`` is a spec for ``create_model`` (``"resnet8"``, ``"torchvision:mobilenet_v3_small"``,
    ...) or an ``nn.Module`` already built for ``in_channels`` and ``num_classes`` (a user's own,
    in Python). ``self.arch`` keeps the canonical spec, or None for a module passed in.
    """

    def __init__(self, arch: str | nn.Module, in_channels: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        if isinstance(arch, nn.Module):
            self.arch, self.net = None, arch
        else:
            self.arch = check_arch(arch)
            self.net = create_model(self.arch, in_channels=in_channels, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_net(meta: dict) -> VictimNet:
    """The untrained network of a victim's metadata (arch, input shape, classes, mean, std)."""
    c = meta["input_shape"][0]
    return VictimNet(meta["arch"], c, len(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"]))
