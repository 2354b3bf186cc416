"""The victim as a device runs it: a ``.pte`` program executed by the ExecuTorch runtime.

``divqat export`` writes the int8 (or fp32) victim lowered to XNNPACK as one ``.pte`` file, with
the normalization inside and, when a formula defense is exported with it, the softmax and the
defense after the last layer. The victim's metadata travels inside the program as a constant
method (``divqat_metadata``, a JSON string), so the file alone describes itself, as it would on
a device. ``load_edge_victim`` (and ``divqat.load_victim``, which dispatches here for a file or a
folder holding one ``.pte``) returns an ``EdgeVictim`` with the interface of ``divqat.victim.Victim``.

What an ``EdgeVictim`` returns. ``victim(images)`` returns *logits* like every victim, (N, K)
float32, so the black box, the defenses and the attacks treat it like any other. What the program
itself answers is ``victim.outputs``:

- ``"logits"``: exported without a defense; ``victim(images)`` is the program's output.
- ``"posteriors"``: exported with a fused defense (``--defense``); the program answers defended
  posteriors, which is what the device's app hands out. ``victim(images)`` returns their log
  (``-inf`` where a defense answered an exact 0), so that ``softmax(victim(images))`` is the
  program's answer to float rounding: served behind ``--defense none`` the thief gets exactly what
  the device answers. ``victim.program_outputs(images)`` gives the raw answer.

The program's batch dimension is dynamic up to ``max_batch`` (256); larger queries run in chunks
of it, so any N works. A program lowered at a fixed batch (``metadata["program"]["fixed_batch"]``,
for graphs whose dynamic batch does not run) gets short chunks zero-padded up to it. The runtime runs on the CPU only. Programs sealed with a key (``divqat
export --encrypt-key-file``) are decrypted in memory, never on disk: pass ``key_file=`` or set
``DIVQAT_KEY_FILE``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch

from divqat.data import check_victim_input
from divqat.errors import ArtifactError, ConfigError
from divqat.quant.edge import quiet_stderr, runtime, set_runtime_threads
from divqat.sealed import is_sealed, read_key, unseal

PROGRAM_SUFFIX = ".pte"
METADATA_METHOD = "divqat_metadata"
PROGRAM_FORMAT, PROGRAM_FORMAT_VERSION = "divqat-edge-program", 1
KEY_ENV = "DIVQAT_KEY_FILE"
OUTPUTS = ("logits", "posteriors")


def is_program_path(path: str | Path) -> bool:
    """A device program: a file (victims trained by divqat are folders), or a folder that holds
    ``.pte`` files and no ``victim.json``."""
    path = Path(path)
    if path.is_file():
        return True
    return (path.is_dir() and not (path / "victim.json").exists()
            and any(path.glob(f"*{PROGRAM_SUFFIX}")))


def program_file(path: str | Path) -> Path:
    """The program file of ``path``: the file itself, or the one ``.pte`` in a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ArtifactError(f"no device program at {path} (write one with `divqat export --victim DIR "
                            f"--out {path}`)")
    found = sorted(path.glob(f"*{PROGRAM_SUFFIX}"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ArtifactError(f"{path} holds {what} {PROGRAM_SUFFIX} files; name the program file itself")
    return found[0]


def read_program(path: str | Path, key_file: str | Path | None | bool = None) -> bytes:
    """The program's bytes, decrypted in memory when the file is sealed (key from ``key_file``,
    else the file named by ``DIVQAT_KEY_FILE``; ``key_file=False``: no key at all, the bytes as
    they are, which is what someone without the key can run)."""
    path = program_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path} ({e.strerror or e})") from None
    if not is_sealed(data) or key_file is False:
        return data
    key_file = key_file if key_file is not None else os.environ.get(KEY_ENV)
    if not key_file:
        raise ArtifactError(f"{path} is encrypted: give its key file (key_file=, or the environment "
                            f"variable {KEY_ENV})")
    return unseal(data, read_key(key_file), name=str(path))


def _load(data: bytes, name: str):
    """(program, metadata) from a program's bytes; ``ArtifactError`` for anything else."""
    rt = runtime()
    try:
        with quiet_stderr():  # the runtime logs its own parse errors before raising
            program = rt.load_program(data)
    except Exception as e:  # the runtime raises RuntimeError (and others) for a damaged buffer
        raise ArtifactError(f"{name} is not a loadable ExecuTorch program ({type(e).__name__}): a "
                            "device program comes from `divqat export` (a trained victim is its "
                            "folder)") from None
    if METADATA_METHOD not in program.method_names or "forward" not in program.method_names:
        raise ArtifactError(f"{name} is an ExecuTorch program but not one divqat exported (it has no "
                            f"{METADATA_METHOD} method)")
    try:
        meta = json.loads(program.load_method(METADATA_METHOD).execute([])[0])
    except (ValueError, IndexError, TypeError) as e:
        raise ArtifactError(f"{name}: its divqat metadata is unreadable ({e})") from None
    section = meta.get("program") if isinstance(meta, dict) else None
    if not isinstance(section, dict) or section.get("format") != PROGRAM_FORMAT:
        raise ArtifactError(f"{name}: its metadata is not a divqat program's")
    if section.get("format_version") != PROGRAM_FORMAT_VERSION:
        raise ArtifactError(f"{name} has program format version {section.get('format_version')}; "
                            f"this divqat reads version {PROGRAM_FORMAT_VERSION}")
    return program, meta


def read_edge_metadata(path: str | Path, key_file: str | Path | None = None) -> dict:
    """The metadata inside a device program: the victim's (dataset, arch, mode, classes, ...) and
    ``program`` (outputs, defense, precision, backend, max_batch, versions)."""
    file = program_file(path)
    return _load(read_program(file, key_file), str(file))[1]


class EdgeVictim:
    """A device program as a victim: ``victim(images) -> logits`` (see the module docstring for
    what a program with a fused defense returns).

    images: float32 in [0, 1], shape (N, C, H, W) = (N, *input_shape), any N; returns (N, K)
    float32 on the CPU. ``outputs`` ("logits" or "posteriors"), ``defense`` (the fused defense's
    name, or None), ``input_shape``, ``num_classes``, ``classes``, ``mode``, ``int8``, ``metadata``
    and ``path`` describe it.
    """

    writes_input = False

    def __init__(self, program: Any, metadata: dict, path: Path, threads: int | None = None) -> None:
        self.metadata = metadata
        self.path = path
        self.device = torch.device("cpu")
        section = metadata["program"]
        self.outputs: str = section["outputs"]
        self.defense: str | None = section.get("defense")
        # The rows the runtime planned its input for (the export's max_batch).
        self.max_batch = int(program.metadata("forward").input_tensor_meta(0).sizes()[0])
        # A program lowered at a fixed batch (divqat.pipelines.export) takes exactly that many rows.
        self.fixed_batch = bool(section.get("fixed_batch", False))
        self.mode: str = metadata["mode"]
        self.int8 = section.get("precision") == "int8"
        self.input_shape: tuple[int, int, int] = tuple(metadata["input_shape"])
        self.classes: tuple[str, ...] = tuple(metadata["classes"])
        self.num_classes = len(self.classes)
        with quiet_stderr():
            set_runtime_threads(threads or torch.get_num_threads())
        self._program = program
        self._forward = program.load_method("forward")
        # One method instance owns its buffers: concurrent callers (a server's threads) take turns.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        fused = f", defense={self.defense}" if self.defense else ""
        return (f"EdgeVictim({self.path.name}, {self.metadata.get('arch')}, mode={self.mode}, "
                f"outputs={self.outputs}{fused}, input_shape={self.input_shape}, "
                f"classes={self.num_classes})")

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        return check_victim_input(images, self.input_shape).detach().cpu()

    @torch.no_grad()
    def program_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the program answers for ``images``: logits, or a fused defense's posteriors."""
        images = self._check(images)
        if images.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        out = []
        with self._lock:
            for start in range(0, images.shape[0], self.max_batch):
                chunk = images[start:start + self.max_batch].contiguous()
                rows = chunk.shape[0]
                if self.fixed_batch and rows < self.max_batch:
                    chunk = torch.cat([chunk, chunk.new_zeros((self.max_batch - rows, *chunk.shape[1:]))])
                out.append(self._forward.execute([chunk])[0][:rows].float())
        return torch.cat(out) if len(out) > 1 else out[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.program_outputs(images)
        # log(0) = -inf is what it should be: softmax gives the exact 0 back.
        return out.log() if self.outputs == "posteriors" else out


def load_edge_victim(path: str | Path, device: str = "cpu", key_file: str | Path | None = None,
                     threads: int | None = None) -> EdgeVictim:
    """Load a device program (a ``.pte`` file, or a folder holding one) as a victim.

    key_file: for a sealed program (default: the file named by ``DIVQAT_KEY_FILE``). threads: the
    runtime's XNNPACK threads (default: ``torch.get_num_threads()``). Raises ``ArtifactError`` in
    one line for a missing, foreign or damaged program, a wrong key or a tampered file, and
    ``MissingExtra`` without ExecuTorch.
    """
    if torch.device(device).type != "cpu":
        raise ConfigError(f"a device program runs on the ExecuTorch CPU runtime; got device {device!r}")
    file = program_file(path)
    program, meta = _load(read_program(file, key_file), str(file))
    return EdgeVictim(program, meta, file, threads=threads)


__all__ = ["KEY_ENV", "METADATA_METHOD", "OUTPUTS", "PROGRAM_FORMAT", "PROGRAM_FORMAT_VERSION",
           "PROGRAM_SUFFIX", "EdgeVictim", "is_program_path", "load_edge_victim", "program_file",
           "read_edge_metadata", "read_program"]
