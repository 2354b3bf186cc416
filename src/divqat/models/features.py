"""Penultimate features of any architecture: the input (N, D) of its final classifier layer.

The feature detectors (mmd) compare query distributions in this space, and MAD differentiates
through the layer after it. Three ways to find it, in this order:

- the net's own ``features(x)`` *method* (divqat's ResNets): traceable, so the caller can fold
  BatchNorm with torch.fx. A ``features`` *submodule* does not count: torchvision names its conv
  trunk that (a 4-D map, not the penultimate vector);
- timm's interface: ``forward_head(forward_features(x), pre_logits=True)``;
- any other net (torchvision's resnets, mobilenets, efficientnets, shufflenets, regnets; a user's
  factory): the input of the last ``nn.Linear`` that runs, captured by forward hooks, checked to
  produce the net's output (a net whose last layer is no ``nn.Linear``, e.g. squeezenet's
  1x1-conv head, is a ``ConfigError``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from divqat.errors import ConfigError


class _Method(nn.Module):
    """``net.features(x)`` as a module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


class _TimmPreLogits(nn.Module):
    """timm's pooled, pre-classifier features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


class _LastLinearInput(nn.Module):
    """The input of the last ``nn.Linear`` to run in ``net``'s forward pass."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not self.linears:
            raise ConfigError(f"{type(net).__name__} has no nn.Linear layer to take penultimate "
                              "features from; give it a features(x) method")

    def forward(self, x: Tensor) -> Tensor:
        calls: list[tuple[Tensor, Tensor]] = []

        def grab(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            calls.append((args[0], output))

        handles = [m.register_forward_hook(grab) for m in self.linears]
        try:
            logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        if not calls or calls[-1][1] is not logits or calls[-1][0].ndim != 2:
            raise ConfigError(f"{type(self.net).__name__}'s output is not the output of an "
                              "nn.Linear on (N, D) features; give it a features(x) method")
        return calls[-1][0]


def _own_method(net: nn.Module, name: str) -> bool:
    return callable(getattr(net, name, None)) and not isinstance(getattr(net, name), nn.Module)


def penultimate(net: nn.Module) -> nn.Module:
    """A module sharing ``net``'s parameters that maps its input (N, ...) to the penultimate
    features (N, D): what ``net``'s final classifier layer receives."""
    if _own_method(net, "features"):
        return _Method(net)
    if _own_method(net, "forward_features") and _own_method(net, "forward_head"):
        return _TimmPreLogits(net)
    return _LastLinearInput(net)


def features(net: nn.Module, x: Tensor) -> Tensor:
    """The penultimate features (N, D) of ``x`` under ``net``, without gradients."""
    with torch.no_grad():
        return penultimate(net)(x)
