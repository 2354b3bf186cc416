"""To the device: a trained victim as one ExecuTorch ``.pte`` program, its defense inside.

``export_victim`` is the whole ``divqat export`` command. It takes a victim folder
(``divqat train``), re-exports its program with the normalization inside, lowers it to XNNPACK
and writes a ``.pte`` that ExecuTorch runs on a phone, a camera or a board with no Python, torch
or compiler. With a formula defense (``none``, ``top-k``, ``rounding``, ``reverse-sigmoid``,
``dcp``: the ``fusable`` ones) the program ends with the softmax and the defense
(``Defense.epilogue``), so the device answers defended posteriors by itself; DivQAT's own
protection is in the int8 weights. The victim's metadata goes inside the program (see
``divqat.edge``), and with a key file the whole file is sealed (AES-256-GCM, ``divqat.sealed``).

- An int8 victim must have been trained for the device (``divqat train --target edge``): the x86
  scheme's uint8 activations do not lower to XNNPACK.
- An fp32 victim exports as an fp32 program (XNNPACK's fp32 kernels): the speed reference.
- Defenses that run a second model (adaptive misinformation, MAD) or draw random numbers per
  query (random noise) are refused: a device program is a fixed formula.

    >>> export_victim("runs/edge-qat", "qat.pte", defense="dcp", defense_params={"beta": 0.5})
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divqat.defenses.base import DEFENSES, Defense, create_defense
from divqat.edge import METADATA_METHOD, PROGRAM_FORMAT, PROGRAM_FORMAT_VERSION, is_program_path
from divqat.errors import ArtifactError, ConfigError, UnsupportedModel
from divqat.io import atomic_write
from divqat.quant import quiet_torchao
from divqat.quant.edge import (
    EDGE_FIXED_BATCH,
    EDGE_MAX_BATCH,
    lower_to_pte,
    require_executorch,
    run_failure,
)
from divqat.sealed import new_key, read_key, seal
from divqat.victim import INT8_MODES, PROGRAM, provenance, victim_metadata


class DeviceModel(nn.Module):
    """What the device runs: the victim's network (normalization inside), then, with a defense,
    ``Defense.epilogue``'s defended posteriors (softmax, the defense, renormalization)."""

    def __init__(self, net: nn.Module, defense: Defense | None = None) -> None:
        super().__init__()
        self.net = net
        self.defense = defense

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        if self.defense is None:
            return logits
        return self.defense.epilogue(logits)[1]


def device_defense(name: str | None, params: dict[str, Any] | None = None) -> Defense | None:
    """The defense to fuse into a program, or ``ConfigError`` with the one-line reason why not."""
    if name is None:
        if params:
            raise ConfigError("--param needs --defense NAME")
        return None
    cls = DEFENSES.get(name)  # an unknown name: the registry's error lists the names
    if not cls.fusable:
        reason = cls.not_fusable_because
        fusable = ", ".join(n for n in DEFENSES.names() if DEFENSES.get(n).fusable)
        raise ConfigError(f"defense {name!r} cannot go inside a device program: {reason}; "
                          f"fusable: {fusable}")
    return create_defense(name, **dict(params or {}))


def _load_network(victim_dir: Path) -> nn.Module:
    quiet_torchao()  # registers the quantized ops the int8 program refers to
    program = victim_dir / PROGRAM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(program).module()
    except FileNotFoundError:
        raise ArtifactError(f"{program} is missing; the victim directory is incomplete, retrain it") from None
    except Exception as e:  # torch raises many types for a damaged archive
        raise ArtifactError(f"{program} is truncated or not a torch.export program "
                            f"({type(e).__name__}); retrain the victim") from None


def export_victim(victim_dir: str | Path, out: str | Path, *, defense: str | None = None,
                  defense_params: dict[str, Any] | None = None,
                  encrypt_key_file: str | Path | None = None, max_batch: int = EDGE_MAX_BATCH,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``victim_dir``'s victim as a ``.pte`` device program at ``out``.

    Arguments:
        victim_dir: a victim folder from ``divqat train`` (int8 ones trained with ``--target edge``).
        out: the program file (``.pte`` by convention), written atomically.
        defense, defense_params: a fusable defense to run inside the program after the last
            layer; the program then answers its defended posteriors instead of logits.
            (Default: None, logits.)
        encrypt_key_file: seal the file with this key (64 hex characters); a missing key file is
            created with a fresh random key (owner-only permissions). (Default: None, plain.)
        max_batch: the largest batch the program takes in one call. (Default: 256.) A program
            that lowers but does not run with a dynamic batch is lowered again at a fixed batch
            of 32 (``fixed_batch`` in the result and the metadata); one that does not run at all
            is an ``UnsupportedModel``, here rather than at its first query.

    Returns a dict: ``out``, ``bytes``, ``sha256`` (of the file as written), ``seconds``,
    ``mode``, ``precision``, ``outputs``, ``defense``, ``defense_params``, ``encrypted``,
    ``new_key`` (a key file was created).
    """
    say = log or (lambda _msg: None)
    victim_dir, out = Path(victim_dir), Path(out)
    if is_program_path(victim_dir):
        raise ConfigError(f"{victim_dir} is already a device program; export takes the victim folder "
                          "that `divqat train` wrote")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
        raise ConfigError(f"max_batch must be an integer >= 2, got {max_batch!r}")
    require_executorch()
    meta = victim_metadata(victim_dir)
    mode = meta.get("mode")
    int8 = mode in INT8_MODES
    if int8 and meta.get("target", "x86") != "edge":
        raise ConfigError(f"{victim_dir} is an int8 victim for the {meta.get('target', 'x86')} target "
                          "(uint8 activations, which XNNPACK does not run); train one for the device "
                          f"with `divqat train --mode {mode} --target edge --teacher FP32_DIR`")
    fused = device_defense(defense, defense_params)
    key = None
    new = False
    if encrypt_key_file is not None:
        # Read (or make) the key before minutes of work, so a bad key file fails first.
        new = not Path(encrypt_key_file).exists()
        key = new_key(encrypt_key_file) if new else read_key(encrypt_key_file)
        if new:
            say(f"wrote a new 256-bit key to {encrypt_key_file}: keep it off the device's storage")

    start = time.perf_counter()
    model = DeviceModel(_load_network(victim_dir), fused)
    section = {
        "format": PROGRAM_FORMAT, "format_version": PROGRAM_FORMAT_VERSION,
        "outputs": "logits" if fused is None else "posteriors",
        "defense": None if fused is None else fused.name,
        "defense_params": None if fused is None else fused.params(),
        "precision": "int8" if int8 else "fp32", "backend": "xnnpack", "max_batch": max_batch,
        "source": str(victim_dir),
        "versions": provenance("executorch"),
    }
    # An example at the upper bound: with a small one (2) this ExecuTorch planned the input for
    # 15 rows instead of max_batch.
    shape = tuple(meta["input_shape"])
    data = lower_to_pte(model, torch.rand(max_batch, *shape), max_batch=max_batch,
                        constant_methods={METADATA_METHOD: json.dumps({**meta, "program": section})})
    failure = run_failure(data, shape, (1, 2, max_batch))
    if failure is not None:
        # Some graphs lower with a dynamic batch and then fail every call: int8 torchvision
        # shufflenet, whose channel shuffle (view, split) stays outside the delegates, whose
        # outputs this ExecuTorch plans at the upper bound as static tensors ("Attempted to
        # resize a static tensor"). Such a program is lowered again at a fixed batch, and the
        # runtime pads short queries up to it (divqat.edge.EdgeVictim).
        fixed = min(EDGE_FIXED_BATCH, max_batch)
        say(f"the program does not run with a dynamic batch ({failure}); lowering it at a fixed "
            f"batch of {fixed}")
        section.update(max_batch=fixed, fixed_batch=True)
        data = lower_to_pte(model, torch.rand(fixed, *shape), max_batch=fixed, dynamic=False,
                            constant_methods={METADATA_METHOD: json.dumps({**meta, "program": section})})
        failure = run_failure(data, shape, (fixed,))
        if failure is not None:
            raise UnsupportedModel(f"{victim_dir}: the lowered program fails in the ExecuTorch runtime "
                                   f"({failure.splitlines()[0]})")
    if key is not None:
        data = seal(data, key)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return {"out": str(out), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": time.perf_counter() - start, "victim": str(victim_dir), "mode": mode,
            "arch": meta.get("arch"), "precision": section["precision"], "outputs": section["outputs"],
            "defense": section["defense"], "defense_params": section["defense_params"],
            "encrypted": key is not None, "new_key": new, "max_batch": section["max_batch"],
            "fixed_batch": section.get("fixed_batch", False)}


__all__ = ["DeviceModel", "device_defense", "export_victim"]
