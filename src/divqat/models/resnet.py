"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

3x3 stem with no max-pool, three stages at strides 1, 2, 2; depth 6n + 2 (resnet8/20/32/56 with
16-32-64 widths), plus ``resnet18``: the CIFAR variant of the ImageNet ResNet-18 (64-128-256-512,
four stages of two blocks). Shortcuts that change shape use a 1x1 conv + BN (option B) rather
than zero-padding slices, so every residual add is a plain add of two conv outputs that the PT2E
X86 quantizer annotates and the int8 lowering fuses. Adaptive average pooling makes any input
size work (28x28 Fashion-MNIST as well as 32x32 CIFAR).

Input (N, C, H, W) float, already normalized; output logits (N, num_classes). The last layer is
``self.fc`` (an ``nn.Linear``) and ``features(x)`` returns its input, which defenses such as MAD use.
"""

from __future__ import annotations

import torch
from torch import nn

from divqat.models.registry import MODELS


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A stem, ``len(widths)`` stages of ``blocks_per_stage`` BasicBlocks, global pooling, a linear head."""

    def __init__(self, blocks_per_stage: int, widths: tuple[int, ...], in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # No zero-init of the blocks' last BN gamma (a common trick for fp32): QAT's conv-BN
        # folding divides by gamma / sqrt(var), so a zero gamma turns the fake-quant graph into NaN.

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.pool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _register(name: str, blocks: int, widths: tuple[int, ...]) -> None:
    def build(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
        return CifarResNet(blocks, widths, in_channels, num_classes)

    build.__doc__ = f"{name}: {len(widths)} stages x {blocks} BasicBlocks, widths {widths}."
    MODELS.register(name)(build)


for _depth in (8, 20, 32, 56):
    _register(f"resnet{_depth}", (_depth - 2) // 6, (16, 32, 64))
_register("resnet18", 2, (64, 128, 256, 512))
