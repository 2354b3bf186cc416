from __future__ import annotations

from collections.abc import Callable

from torch import nn

from divqat.errors import ConfigError
from divqat.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def create_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Build a registered architecture for a dataset's channel count and class count."""
    if name not in MODELS:
        raise ConfigError(f"unknown arch {name!r}; choose one of: {', '.join(MODELS.names())}")
    return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes)


def model_names() -> list[str]:
    return MODELS.names()
