"""The one way to build an architecture from its name: ``create_model(spec, in_channels,
num_classes)``, where ``spec`` is a registered name (``resnet8``) or a user's own architecture
(``torchvision:NAME``, ``timm:NAME``, ``package.module:function``; ``divqat.models.external``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from divqat.errors import ConfigError
from divqat.models import external
from divqat.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# What a spec may be, for help texts and errors.
SPEC_FORMS = "torchvision:NAME, timm:NAME or package.module:function"


def _split(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"arch must be a name such as resnet8 or {SPEC_FORMS}; got {spec!r}")
    spec = spec.strip()
    if spec in MODELS:
        return "", spec
    prefix, colon, name = spec.partition(":")
    if not colon:
        raise ConfigError(f"unknown arch {spec!r}; choose one of: {', '.join(MODELS.names())}, "
                          f"or {SPEC_FORMS}")
    return prefix.strip(), name.strip()


def check_arch(spec: str) -> str:
    """Validate an architecture spec without building it, and return its canonical spelling: a
    registered name against the registry, ``torchvision:``/``timm:`` names against the package's
    list, a factory by importing it. Errors are one-line ``ConfigError``s."""
    prefix, name = _split(spec)
    if not prefix:
        return name
    if prefix == external.TORCHVISION:
        return external.check_torchvision(name)
    if prefix == external.TIMM:
        return external.check_timm(name)
    return external.check_factory(f"{prefix}:{name}")


def create_model(spec: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Build the architecture ``spec`` (see ``check_arch``) untrained, for a dataset's channel
    count and class count: its classifier head has ``num_classes`` outputs."""
    prefix, name = _split(spec)
    if not prefix:
        return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes)
    if prefix == external.TORCHVISION:
        return external.torchvision_model(name, in_channels, num_classes)
    if prefix == external.TIMM:
        return external.timm_model(name, in_channels, num_classes)
    return external.factory_model(f"{prefix}:{name}", in_channels, num_classes)


def model_names() -> list[str]:
    """The registered architectures (a spec may also name a user's own: ``describe_archs``)."""
    return MODELS.names()


def describe_archs() -> str:
    """One line for help texts: the registered names and the forms of a user's own."""
    return (f"{', '.join(MODELS.names())}; or {SPEC_FORMS} "
            "(e.g. torchvision:mobilenet_v3_small, timm:resnet18, mypkg.nets:build)")
