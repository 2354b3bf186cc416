"""Users' own architectures, named by a spec string beside the registered ones:

- ``torchvision:NAME``: a torchvision classification builder, ``get_model(NAME, weights=None,
  num_classes=K)`` (names: ``torchvision.models.list_models(module=torchvision.models)``);
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=K, in_chans=C)``
  (names: ``timm.list_models("*mobilenet*")``);
- ``package.module:function``: a factory of the user's, called as ``function(num_classes=K,
  in_channels=C)``, that returns an ``nn.Module`` images (N, C, H, W) -> logits (N, K).

All are built untrained and offline: a user's weights arrive as a file, never as a download.
torchvision's builders take three input channels; for another count the stem's first conv is
replaced by a fresh one of the same shape and ``C`` inputs (the weights are untrained anyway, so
there is nothing to carry over from RGB). timm takes the count itself (``in_chans``).

torchvision and timm are the ``vision`` extra. ``import_torchvision`` also works around a build
mismatch these machines have (environment.md, "Users' own models"): the registry's torchvision
is CUDA-linked, torch here is the CPU build, and ``import torchvision`` then dies registering
fake kernels for two detection ops whose C++ schemas failed to load. Defining the two schemas
first lets the pure-Python model zoo import; the detection ops stay unusable, and divqat needs none.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from types import ModuleType

from torch import nn

from divqat.errors import ConfigError

TORCHVISION, TIMM = "torchvision", "timm"
VISION_HINT = "pip install 'divqat[vision]'"
# The detection ops whose fake kernels torchvision registers at import (the C++ schemas, as its
# _C.so defines them).
_TORCHVISION_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARIES: list = []  # the schema library must live as long as the process


def import_torchvision() -> ModuleType:
    """``import torchvision``, defining its two detection op schemas first when a CPU torch beside
    a CUDA-linked torchvision left them undefined; a missing package is a ``ConfigError``."""
    try:
        import torchvision
        return torchvision
    except ImportError:
        raise ConfigError(f"torchvision is not installed: {VISION_HINT}") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch

    # The failed import left half-initialized modules behind; the retry must start clean.
    for name in [m for m in sys.modules if m == TORCHVISION or m.startswith("torchvision.")]:
        del sys.modules[name]
    missing = [s for s in _TORCHVISION_OPS if not _op_defined(f"torchvision::{s.split('(')[0]}")]
    if missing:
        lib = torch.library.Library(TORCHVISION, "DEF")
        for schema in missing:
            lib.define(schema)
        _LIBRARIES.append(lib)
    import torchvision
    return torchvision


def _op_defined(qualified: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualified, "")
        return True
    except RuntimeError:
        return False


def import_timm() -> ModuleType:
    """``import timm`` (after ``import_torchvision``: timm imports torchvision)."""
    import_torchvision()
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm is not installed: {VISION_HINT}") from None
    return timm


def torchvision_names() -> list[str]:
    """torchvision's classification models (detection, segmentation and video live in
    submodules and are left out)."""
    tv = import_torchvision()
    return tv.models.list_models(module=tv.models)


def check_torchvision(name: str) -> str:
    if name not in torchvision_names():
        raise ConfigError(f"torchvision has no classification model {name!r}; its names: "
                          "torchvision.models.list_models(module=torchvision.models), e.g. "
                          "mobilenet_v3_small, resnet18, efficientnet_b0")
    return f"{TORCHVISION}:{name}"


def torchvision_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    check_torchvision(name)
    tv = import_torchvision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. googlenet's "init_weights will change" notice
        net = tv.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_stem(net, in_channels, name)
    return net


def _replace_stem(net: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first RGB conv (the stem, first in module order in every torchvision CNN) for a
    fresh one taking ``in_channels``, every other hyperparameter kept."""
    for qualified, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            parent_name, _, attr = qualified.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))
            return
    raise ConfigError(f"torchvision:{name} has no 3-channel conv to adapt to {in_channels} "
                      "input channels; use a timm: or package.module:function arch instead")


def check_timm(name: str) -> str:
    if not import_timm().is_model(name):
        raise ConfigError(f"timm has no model {name!r}; its names: timm.list_models('*PATTERN*'), "
                          "e.g. timm.list_models('*mobilenet*')")
    return f"{TIMM}:{name}"


def timm_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    check_timm(name)
    return import_timm().create_model(name, pretrained=False, num_classes=num_classes,
                                      in_chans=in_channels)


def _factory(path: str):
    module_name, _, function = path.partition(":")
    if not module_name or not function.isidentifier():
        raise ConfigError(f"bad arch {path!r}: a factory is package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"arch {path!r}: cannot import {module_name!r} ({exc}); is it on "
                          "PYTHONPATH or installed?") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ConfigError(f"arch {path!r}: module {module_name!r} has no function {function!r}")
    try:
        inspect.signature(factory).bind(num_classes=10, in_channels=3)
    except TypeError:
        raise ConfigError(f"arch {path!r}: the factory must accept num_classes= and "
                          "in_channels= keywords") from None
    except ValueError:  # no signature to read (a builtin): let the call decide
        pass
    return factory


def check_factory(path: str) -> str:
    _factory(path)
    return path


def factory_model(path: str, in_channels: int, num_classes: int) -> nn.Module:
    net = _factory(path)(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"arch {path!r} returned a {type(net).__name__}, not an nn.Module")
    return net
