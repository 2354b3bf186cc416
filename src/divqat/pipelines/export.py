"""To the device: a trained victim as one ExecuTorch ``.pte`` program, its defense inside.

``export_victim`` is the whole ``divqat export`` command. It takes a victim folder
(``divqat train``), re-exports its program with the normalization inside, lowers it to XNNPACK
and writes a ``.pte`` that ExecuTorch runs on a phone, a camera or a board with no Python, torch
or compiler. With a formula defense (``none``, ``top-k``, ``rounding``, ``reverse-sigmoid``,
``dcp``: the ``fusable`` ones) the program ends with the softmax and the defense
(``Defense.epilogue``), so the device answers defended posteriors by itself; DivQAT's own
protection is in the int8 weights. The victim's metadata goes inside the program (see
``divqat.edge``), and with a key file the whole file is sealed (AES-256-GCM, ``divqat.sealed``).

Beside the program goes its ownership fingerprint, ``NAME.fingerprint.safetensors``
(``divqat.ownership.fingerprint``: IPGuard points near the victim's boundaries, made from real
test images by the victim's torch network, labelled by the lowered program itself, with the
file's sha256), so that a copy of the file found later, as it is or fine-tuned, pruned or
requantized, can be matched against it.

- An int8 victim must have been trained for the device (``divqat train --target edge``): the x86
  scheme's uint8 activations do not lower to XNNPACK.
- An fp32 victim exports as an fp32 program (XNNPACK's fp32 kernels): the speed reference.
- Defenses that run a second model (adaptive misinformation, MAD) or draw random numbers per
  query (random noise) are refused: a device program is a fixed formula.

    >>> export_victim("runs/edge-qat", "qat.pte", defense="dcp", defense_params={"beta": 0.5})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from divqat.checks import check_int
from divqat.data import load_dataset, to_victim_input
from divqat.defenses.base import DEFENSES, Defense, create_defense
from divqat.edge import (
    METADATA_METHOD,
    PROGRAM_FORMAT,
    PROGRAM_FORMAT_VERSION,
    EdgeVictim,
    is_program_path,
)
from divqat.errors import ArtifactError, ConfigError, DatasetError, UnsupportedModel
from divqat.io import atomic_write
from divqat.ownership.fingerprint import (
    POINTS,
    NoFingerprintPoints,
    calibrate,
    fingerprint_path,
    generate_fingerprint,
)
from divqat.quant import quiet_torchao, straight_through
from divqat.quant.edge import (
    EDGE_FIXED_BATCH,
    EDGE_MAX_BATCH,
    lower_to_pte,
    quiet_stderr,
    require_executorch,
    run_failure,
    runtime,
)
from divqat.sealed import new_key, read_key, seal
from divqat.victim import INT8_MODES, PROGRAM, load_victim, provenance, victim_metadata


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


# Real images the fingerprint's points start from, per point asked for: generation draws about
# 1.25x the points in its first round, so this leaves room for a second and a third.
_CANDIDATES_PER_POINT = 3


def fingerprint_images(meta: dict, data_root: str | Path | None, points: int, seed: int = 0) -> Tensor:
    """Up to ``points * 3`` images of the victim's test split, drawn at random (``seed``), as its
    input (float32 (M, *input_shape) in [0, 1]): where the fingerprint's points start. The test
    split: the owner's own images, never trained on, and outside any thief's transfer set that
    divqat builds (those come from the training split's tail or other datasets)."""
    try:
        test = load_dataset(meta["dataset"], "test", data_root)
    except DatasetError as e:
        raise DatasetError(f"the fingerprint starts from {meta['dataset']} test images: {e} "
                           "(or export with --no-fingerprint)") from None
    rng = np.random.default_rng(seed)
    take = np.sort(rng.permutation(len(test))[:points * _CANDIDATES_PER_POINT])
    return to_victim_input(test.images[take], meta["input_shape"])


def _reference(path: str | Path, meta: dict) -> Callable[[Tensor], Tensor]:
    """An independent reference model for the fingerprint's calibration, refused in one line
    when it does not take the victim's input or answer its classes."""
    reference = load_victim(path, compile=False)
    if (tuple(reference.input_shape), reference.num_classes) != (tuple(meta["input_shape"]),
                                                               len(meta["classes"])):
        raise ConfigError(f"fingerprint reference {path} takes {tuple(reference.input_shape)} and "
                          f"answers {reference.num_classes} classes; the victim takes "
                          f"{tuple(meta['input_shape'])} and answers {len(meta['classes'])}")
    return reference


def export_victim(victim_dir: str | Path, out: str | Path, *, defense: str | None = None,
                  defense_params: dict[str, Any] | None = None,
                  encrypt_key_file: str | Path | None = None, max_batch: int = EDGE_MAX_BATCH,
                  fingerprint: bool = True, fingerprint_points: int = POINTS,
                  fingerprint_references: Sequence[str | Path] = (),
                  data_root: str | Path | None = None,
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
        fingerprint: write the victim's ownership fingerprint beside the program
            (``fingerprint_path(out)``, ``divqat.ownership.fingerprint``), made from
            ``fingerprint_points`` test images of the victim's dataset (``data_root`` for the
            datasets that need one). (Default: True, 100 points.) It adds about 15 s of one
            CPU core for a ResNet-8 on 28x28 images, as much again as the lowering (measured in
            docs/guides/fingerprints.md).
        fingerprint_references: victims (folders or programs) known to be independent of this
            one (same data, other seeds or architectures): their agreement with the fingerprint
            is recorded (``calibrate``), and no suspect is then granted a lower chance rate.
            (Default: none; the chance rate is then measured on the suspect alone.)

    Returns a dict: ``out``, ``bytes``, ``sha256`` (of the file as written), ``seconds``
    (everything, fingerprint included), ``mode``, ``precision``, ``outputs``, ``defense``,
    ``defense_params``, ``encrypted``, ``new_key`` (a key file was created), ``fingerprint``
    (its path, or None), ``fingerprint_points``, ``fingerprint_seconds``, ``fingerprint_skipped``
    (why no fingerprint was written although one was asked for: no candidate crossed the
    victim's boundary, warned about in one line, and the program is written all the same; else
    None).
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
    fingerprint_points = check_int("export", "fingerprint_points", fingerprint_points, low=1)
    # The fingerprint's start images and references before minutes of lowering, so that missing
    # data or a mismatched reference fails first.
    starts = fingerprint_images(meta, data_root, fingerprint_points) if fingerprint else None
    references = [_reference(r, meta) for r in fingerprint_references] if fingerprint else []
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
    plain = data
    if key is not None:
        data = seal(data, key)
    digests = tuple(dict.fromkeys(hashlib.sha256(d).hexdigest() for d in (data, plain)))
    recorded, fingerprint_seconds, skipped = None, 0.0, None
    if starts is not None:
        began = time.perf_counter()
        # Labelled by the lowered program itself, not the torch network: XNNPACK rounds
        # differently, and near a boundary that decides the label.
        with quiet_stderr():
            program = EdgeVictim(runtime().load_program(plain), {**meta, "program": section}, out)
        try:
            recorded = generate_fingerprint(straight_through(model.net), starts, points=fingerprint_points,
                                           labels_of=program, program_sha256=digests, log=say)
        except NoFingerprintPoints as e:
            # A victim with too few points near its boundaries (a briefly trained one, a tiny
            # test split) still gets its program: the fingerprint is evidence, not the product.
            skipped = str(e)
            say(f"warning: {skipped}: {out.name} is written without a fingerprint")
        if recorded is not None and references:
            recorded = calibrate(recorded, references)
            worst = max(recorded.reference_agreement)
            if worst >= 0.5:
                say(f"warning: an independent reference model agrees with {worst:.0%} of the "
                    "fingerprint: the victim's boundary is not its own on this data, and a "
                    "fingerprint verdict says little")
        if recorded is not None:
            recorded = dataclasses.replace(recorded, params={**recorded.params, "dataset": meta["dataset"],
                                                           "split": "test", "program": out.name})
        fingerprint_seconds = time.perf_counter() - began
    # The program first, then its fingerprint: both or, on an error before here, neither.
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    if recorded is not None:
        recorded.save(fingerprint_path(out))
    else:  # a fingerprint left by an earlier export of this path would describe another program
        fingerprint_path(out).unlink(missing_ok=True)
    return {"out": str(out), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": time.perf_counter() - start, "victim": str(victim_dir), "mode": mode,
            "arch": meta.get("arch"), "precision": section["precision"], "outputs": section["outputs"],
            "defense": section["defense"], "defense_params": section["defense_params"],
            "encrypted": key is not None, "new_key": new, "max_batch": section["max_batch"],
            "fixed_batch": section.get("fixed_batch", False),
            "fingerprint": None if recorded is None else str(fingerprint_path(out)),
            "fingerprint_points": 0 if recorded is None else len(recorded),
            "fingerprint_seconds": fingerprint_seconds, "fingerprint_skipped": skipped}


__all__ = ["DeviceModel", "device_defense", "export_victim", "fingerprint_images"]
