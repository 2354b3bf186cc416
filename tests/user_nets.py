"""A user's own architectures, importable as ``user_nets:NAME`` (pytest puts tests/ on sys.path):
what ``--arch package.module:function`` builds in tests/test_models_external.py."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-bn-relu, pooled, then a linear head; its ReLU module runs twice, as torchvision's
    BasicBlock's does, which the quantizers' partitioning must cope with."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.head(x.mean((2, 3)))


def tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return TinyCNN(in_channels, num_classes)


def not_a_module(num_classes: int, in_channels: int) -> str:
    return "a string"


def no_keywords(width: int) -> nn.Module:
    return nn.Linear(width, width)


class ItemBranch(TinyCNN):
    """Branches in Python on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if x.mean().item() > 0.5:
            x = x * 2
        return self.head(x.mean((2, 3)))


def item_branch(num_classes: int, in_channels: int) -> nn.Module:
    return ItemBranch(in_channels, num_classes)
