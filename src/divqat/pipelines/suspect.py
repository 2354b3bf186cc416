"""A suspect: a model found in the wild that may have been taken from a divqat victim.

Whatever form it takes, a suspect is asked one thing, the labels of a batch of images, and every
image asked is counted (the query cost ``divqat verify`` states). ``open_suspect`` takes:

- a divqat victim folder (``divqat train``), or a device program (``.pte``, ``divqat export``);
- a model file written by ``divqat attack --save-surrogate`` (``divqat.models.saved``);
- a ``torch.export`` program (``.pt2``) or a TorchScript file (``torch.jit.save``) of a module
  mapping float32 (N, C, H, W) in [0, 1] to logits (N, K). A pickled ``torch.save(module)`` is
  refused: unpickling runs whatever code the file holds, and a suspect is a stranger's file;
- the URL of a ``divqat serve`` API, with an API key (``divqat.remote``).

    >>> with open_suspect("runs/stolen.pt") as suspect:
    ...     labels = suspect.labels(images)     # (N,) int64; suspect.queries == N
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divqat.edge import PROGRAM_SUFFIX
from divqat.errors import ArtifactError, ConfigError

# Images per call of a local suspect (and per request to a remote one).
BATCH = 256


class Suspect(abc.ABC):
    """The labels of a suspect model, counted.

    ``labels(images)``: images float32 (N, C, H, W) in [0, 1] -> labels (N,) int64 (the argmax
    of its outputs). ``input_shape``: (C, H, W), or None where the suspect does not say (a
    TorchScript module: its first batch tells). ``queries``: images asked so far. ``name``: what
    it is, in words. A suspect is a context manager (``close`` releases a connection).
    """

    def __init__(self, name: str, input_shape: tuple[int, int, int] | None) -> None:
        self.name = name
        self.input_shape = input_shape
        self.queries = 0

    def labels(self, images: Tensor) -> Tensor:
        if self.input_shape is not None and tuple(images.shape[1:]) != self.input_shape:
            raise ConfigError(f"the suspect takes {_shape(self.input_shape)} images, not {_shape(images.shape[1:])}")
        out = [self._labels(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
        self.queries += len(images)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    @abc.abstractmethod
    def _labels(self, images: Tensor) -> Tensor:
        """Labels (N,) of at most ``BATCH`` images."""

    def close(self) -> None:  # noqa: B027  (local suspects hold nothing to release)
        pass

    def __enter__(self) -> Suspect:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, input_shape={self.input_shape})"


def _shape(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)


class ModelSuspect(Suspect):
    """A model in this process: ``model(images) -> logits (N, K)``, run without gradients on
    ``device``; ``fixed_batch``: a program exported for one batch size, asked in batches of that
    size (the last one zero-padded, its extra rows dropped)."""

    def __init__(self, model: Callable[[Tensor], Tensor], name: str,
                 input_shape: tuple[int, int, int] | None, device: str = "cpu",
                 fixed_batch: int | None = None) -> None:
        super().__init__(name, input_shape)
        self.model, self.device, self.fixed_batch = model, device, fixed_batch

    def _labels(self, images: Tensor) -> Tensor:
        if self.fixed_batch is None:
            return self._call(images)
        step, out = self.fixed_batch, []
        for i in range(0, len(images), step):
            chunk = images[i:i + step]
            n = len(chunk)
            if n < step:
                chunk = torch.cat([chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))])
            out.append(self._call(chunk)[:n])
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def _call(self, images: Tensor) -> Tensor:
        try:
            logits = self.model(images.to(self.device))
        except Exception as e:  # a foreign module's own error: the suspect cannot take these images
            if self.input_shape is None:
                raise ConfigError(f"the suspect fails on {_shape(images.shape[1:])} images "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:300]) from None
            raise
        if not isinstance(logits, Tensor) or logits.ndim != 2 or len(logits) != len(images):
            raise ArtifactError(f"the suspect answered {getattr(logits, 'shape', type(logits))} for "
                                f"{len(images)} images; expected (N, K) outputs")
        return logits.argmax(dim=1).cpu()


class RemoteSuspect(Suspect):
    """A ``divqat serve`` API (any service speaking its protocol), asked through
    ``RemoteBlackBox``: every image counts against the key's budget there too."""

    def __init__(self, url: str, api_key: str) -> None:
        from divqat.remote import RemoteBlackBox

        self.box = RemoteBlackBox(url, api_key)
        super().__init__(f"the prediction API at {url}", tuple(self.box.input_shape))

    def _labels(self, images: Tensor) -> Tensor:
        return self.box.query_labels(images.contiguous())

    def close(self) -> None:
        self.box.close()


def _exported_shape(program: Any) -> tuple[tuple[int, int, int] | None, int | None]:
    """(C, H, W) of a ``torch.export`` program's first user input where its sizes are fixed, and
    its batch size where that is fixed too (None: dynamic)."""
    try:
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
                dims = tuple(node.meta["val"].shape)
                if len(dims) != 4:
                    return None, None
                batch = dims[0] if isinstance(dims[0], int) else None
                return tuple(int(d) for d in dims[1:]), batch
    except (AttributeError, KeyError, TypeError):
        pass
    return None, None


def open_suspect(spec: str | Path, *, api_key: str | None = None, device: str = "cpu",
                 input_shape: tuple[int, int, int] | None = None) -> Suspect:
    """The suspect ``spec`` names (see the module docstring). ``api_key``: for a URL.
    ``input_shape``: for a TorchScript module, which does not say (default: its first batch's)."""
    from divqat.models.saved import is_model_file, load_model
    from divqat.victim import load_victim

    text = str(spec)
    if text.startswith(("http://", "https://")):
        if not api_key:
            raise ConfigError("a suspect URL needs an API key of that service (--api-key-file FILE)")
        return RemoteSuspect(text, api_key)
    if api_key:
        raise ConfigError("--api-key-file goes with a suspect URL (http://HOST:PORT)")
    path = Path(spec)
    if not path.exists():
        raise ArtifactError(f"no suspect at {path}")
    if path.is_dir():
        if (path / "victim.json").is_file() or any(path.glob(f"*{PROGRAM_SUFFIX}")):
            victim = load_victim(path, device=device)
            kind = "divqat victim" if (path / "victim.json").is_file() else "device program"
            return ModelSuspect(victim, f"{kind} {path}", tuple(victim.input_shape), device)
        raise ArtifactError(f"{path} is a folder without a divqat victim (victim.json) or a device "
                            f"program ({PROGRAM_SUFFIX})")
    if path.suffix == PROGRAM_SUFFIX:
        victim = load_victim(path, device=device)
        return ModelSuspect(victim, f"device program {path}", tuple(victim.input_shape), device)
    if is_model_file(path):
        net, meta = load_model(path)
        return ModelSuspect(net.to(device), f"model file {path} ({meta['arch']})",
                            tuple(meta["input_shape"]), device)
    if path.suffix == ".pt2":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.load(path)
        except Exception as e:  # torch raises many types for a damaged archive
            raise ArtifactError(f"{path} is not a torch.export program ({type(e).__name__})") from None
        shape, batch = _exported_shape(program)
        return ModelSuspect(program.module(), f"torch.export program {path}", shape or input_shape,
                            device, fixed_batch=batch)
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except Exception:  # not TorchScript: the file is of no kind this reads
        raise ArtifactError(f"{path} is none of: a divqat victim folder, a {PROGRAM_SUFFIX} device program, "
                            "a model file of `divqat attack --save-surrogate`, a torch.export .pt2 "
                            "program, a TorchScript file (pickled modules are not loaded: convert "
                            "it with torch.jit.script or torch.export where you trust it)") from None
    return ModelSuspect(module, f"TorchScript module {path}", input_shape, device)


__all__ = ["BATCH", "ModelSuspect", "RemoteSuspect", "Suspect", "open_suspect"]
