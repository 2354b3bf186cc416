"""A user's weights file into a network: the model they trained elsewhere becomes a divqat teacher.

Reads a ``.pt`` / ``.pth`` state dict (``torch.save(model.state_dict(), FILE)``, also the usual
checkpoint wrappings ``{"state_dict": ...}``, ``{"model": ...}``, and the ``module.`` prefix that
``DataParallel`` adds) or a ``.safetensors`` file, and loads it into a network with one clear line
for every way it can fail to fit: the keys a file lacks, the keys it has that the network does not,
and tensors whose shapes differ (most often a classifier head for another number of classes).

Loading is strict for ``divqat import`` (a teacher must be exactly the user's model) and partial
for ``divqat train --init`` (a backbone: every tensor whose name and shape fit is loaded, the rest
such as a 1000-class head keep their fresh initialization, and the caller reports what was skipped).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from divqat.errors import ArtifactError, ConfigError

# Where checkpoints commonly keep the state dict when they hold more than the weights.
WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "weights")
# How many names an error message lists before "and N more".
SHOWN = 4


def file_digest(path: str | Path) -> str:
    """sha256 of a file, hex: which weights a victim was imported from, recorded in its metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, by name. ``ArtifactError`` names what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - a core dependency
            raise ArtifactError("reading .safetensors needs the safetensors package "
                                "(pip install safetensors)") from None
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise ArtifactError(f"{path} is not a readable .safetensors file "
                                f"({type(e).__name__}: {_first_line(e)})") from None
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (a legacy pickle before torch 1.6, starting with 0x80).
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise ArtifactError(f"{path} is not a readable PyTorch weights file (neither a torch.save "
                            "archive nor .safetensors); save the model with "
                            "torch.save(model.state_dict(), FILE) or as .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: "
                            f"{_first_line(e)}); save the model with torch.save(model.state_dict(), "
                            "FILE) or as .safetensors") from None
    except Exception as e:  # weights_only refuses pickled modules with an UnpicklingError
        raise ArtifactError(f"{path} holds pickled objects, not a state dict ({type(e).__name__}); "
                            "save torch.save(model.state_dict(), FILE) instead of the whole model") from None
    return _unwrap(obj, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _unwrap(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict) and _is_state_dict(obj[k])),
                     None)
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise ArtifactError(f"{path} is a dict without tensors at its top level or under "
                                f"{'/'.join(WRAPPERS)} (its keys: {keys}); give the model's state_dict()")
        obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise ArtifactError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors; "
                            "save torch.save(model.state_dict(), FILE)")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and any(isinstance(v, Tensor)
                                                                     for v in obj.values())


def _strip(state: dict[str, Tensor], wanted: set[str]) -> dict[str, Tensor]:
    """Remove a prefix every key carries when that makes the names fit better (``module.`` from
    DataParallel, ``net.`` from a divqat VictimNet, ``_orig_mod.`` from torch.compile)."""
    for prefix in ("module.", "_orig_mod.", "net.", "model."):
        if all(k.startswith(prefix) or k.startswith("normalize.") for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if len(wanted & stripped.keys()) > len(wanted & state.keys()):
                state = stripped
    return state


@dataclass
class LoadReport:
    """What a weights file gave a network: tensors loaded, and what did not fit."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # in the network, not in the file
    unexpected: list[str] = field(default_factory=list)   # in the file, not in the network
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, file, network

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """The mismatches as one line: ``2 missing (fc.weight, fc.bias); 1 of another shape ...``."""
        parts = []
        if self.mismatched:
            shown = ", ".join(f"{name} {list(a)} in the file vs {list(b)} in the model"
                              for name, a, b in self.mismatched[:SHOWN])
            parts.append(f"{len(self.mismatched)} of another shape ({shown}{_more(self.mismatched)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the file ({', '.join(self.missing[:SHOWN])}"
                         f"{_more(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} not in the model ({', '.join(self.unexpected[:SHOWN])}"
                         f"{_more(self.unexpected)})")
        return "; ".join(parts)


def _more(items: list) -> str:
    return f", and {len(items) - SHOWN} more" if len(items) > SHOWN else ""


def load_weights(net: nn.Module, state: dict[str, Tensor], *, strict: bool = True,
                 what: str = "the weights") -> LoadReport:
    """Load ``state`` into ``net`` (a bare architecture, without divqat's input normalization).

    strict: every tensor of the network must come from the file with its shape, and the file may
    hold nothing else; otherwise ``ConfigError`` with one line saying what differs (``what``
    names the file and architecture in it). Not strict: the tensors whose name and shape fit are
    loaded, the rest keep their values; the report says which.
    """
    own = net.state_dict()
    state = _strip({k: v for k, v in state.items()
                    if not k.startswith("normalize.")}, set(own))
    report = LoadReport()
    fitting = {}
    for name, value in state.items():
        if name not in own:
            # BatchNorm's num_batches_tracked is bookkeeping some exporters drop or add.
            if not name.endswith("num_batches_tracked"):
                report.unexpected.append(name)
        elif tuple(value.shape) != tuple(own[name].shape):
            report.mismatched.append((name, tuple(value.shape), tuple(own[name].shape)))
        else:
            fitting[name] = value
    report.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if strict and not report.fits:
        raise ConfigError(f"{what} do not fit: {report.problems()}")
    if not fitting:
        raise ConfigError(f"{what} share no tensor with the model ({report.problems()}); is the "
                          "architecture the right one?")
    net.load_state_dict(fitting, strict=False)
    report.loaded = list(fitting)
    return report


__all__ = ["LoadReport", "file_digest", "load_weights", "read_state_dict"]
