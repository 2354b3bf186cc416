"""A model as one loadable file: what a thief walks away with (``divqat attack --save-surrogate``).

The file is a ``torch.save`` of plain data, loaded with ``weights_only=True`` (no pickled code):

    {"format": "divqat-model", "format_version": 1, "arch": "resnet8",
     "input_shape": [C, H, W], "num_classes": K, "mean": [...], "std": [...],
     "classes": [...] or None, "info": {...}, "state_dict": {...}}

``arch`` is a spec ``create_model`` builds (a built-in, ``torchvision:NAME``, ``timm:NAME`` or
``package.module:function``); ``mean``/``std`` the normalization in front of it (``VictimNet``),
so the loaded model takes float32 (N, C, H, W) in [0, 1] like a victim. ``info`` says where it
came from (attack, budget, queries, victim).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from divqat.errors import ArtifactError, ConfigError
from divqat.io import atomic_write
from divqat.models.normalized import VictimNet

FORMAT = "divqat-model"
FORMAT_VERSION = 1


def save_model(path: str | Path, net: VictimNet, input_shape: tuple[int, int, int], num_classes: int,
               *, classes: list[str] | None = None, info: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (a ``VictimNet`` built from an architecture spec) as one file; returns the path."""
    if not isinstance(net, VictimNet) or net.arch is None:
        raise ConfigError("only a VictimNet built from an architecture spec can be saved as a model file "
                          "(a module passed in as an object has no spec to rebuild it from)")
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": net.arch,
        "input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes),
        "mean": net.normalize.mean.flatten().tolist(), "std": net.normalize.std.flatten().tolist(),
        "classes": None if classes is None else [str(c) for c in classes], "info": info or {},
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(record, tmp))
    return path


def is_model_file(path: str | Path) -> bool:
    """Whether ``path`` is a file ``save_model`` wrote (read with ``weights_only=True``)."""
    try:
        with warnings.catch_warnings():  # a TorchScript archive: torch.load says it dispatches
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT


def load_model(path: str | Path) -> tuple[VictimNet, dict[str, Any]]:
    """The model in a ``save_model`` file, in eval mode, and its record (without the weights)."""
    path = Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"no model file at {path}") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ArtifactError(f"{path} is not a divqat model file ({type(e).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a divqat model file (no \"format\": \"{FORMAT}\")")
    if record.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has model format version {record.get('format_version')}; this "
                            f"divqat reads {FORMAT_VERSION}")
    shape = tuple(record["input_shape"])
    try:
        net = VictimNet(record["arch"], shape[0], record["num_classes"], tuple(record["mean"]),
                        tuple(record["std"]))
        net.load_state_dict(record["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise ArtifactError(f"{path}: the weights do not fit arch {record.get('arch')!r} ({e})"[:400]) from None
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    return net.eval(), meta


__all__ = ["FORMAT", "is_model_file", "load_model", "save_model"]
