"""The on-device thief: whoever holds the device holds the program file, and copies it.

No queries, no surrogate, no transfer set: the thief takes the ``.pte`` (from the app's package
or the device's storage) and runs it with the same ExecuTorch runtime. What a query-based thief
works towards (agreement with the victim, the victim's accuracy) the copy has from the start, which
is the point of putting it beside the query attacks: output perturbation and DivQAT act on the
answers, and a copied file does not need to ask.

``copy_attack`` measures it the way ``attack_victim`` measures a surrogate, on the victim's test
split: ``adversary_accuracy``, ``agreement`` with the victim's (defended) argmax,
``max_posterior_difference`` between the copy's and the victim's answers, ``queries_used`` 0, and
whether the copy is byte-identical. Where ``divqat export`` wrote the program's ownership
fingerprint beside it (``divqat.ownership.fingerprint``, the default), the copy is also tested
as ``divqat verify --fingerprint`` tests a suspect: its file's sha256 against the programs the
fingerprint recorded, and, when it loads, its labels of the fingerprint's points (``fingerprint``
in the record: the owner finding the stolen file). An encrypted program (``divqat export --encrypt-key-file``)
copied by a thief without its key does not load: the copy is then recorded as worth nothing
(``adversary_accuracy`` None) with the reason. ``thief_has_key=True`` (the default) is the
common case the device guide warns about: the key ships inside the same app, so the thief has it too.

    >>> record = copy_attack("qat.pte", out="runs/copy")
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from divqat.blackbox import DefendedVictim
from divqat.checks import check_bool
from divqat.data import dataset_spec, load_dataset, to_victim_input
from divqat.edge import is_program_path, program_file
from divqat.errors import ArtifactError, ConfigError
from divqat.io import write_json
from divqat.ownership.fingerprint import fingerprint_path, load_fingerprint, match, match_file
from divqat.sealed import is_sealed

ATTACK = "copy"


def _answers(victim: Callable, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The posteriors the program hands out (the device's answers), float32 (N, K)."""
    served = DefendedVictim(victim)
    return torch.cat([served(images[i:i + batch]).defended for i in range(0, len(images), batch)])


def copy_attack(program: str | Path, *, thief_has_key: bool = True,
                key_file: str | Path | None = None, data_root: str | Path | None = None,
                out: str | Path | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Copy a device program as a thief holding the device would, and measure the copy.

    Arguments:
        program: the ``.pte`` file (or a folder holding one) the device carries.
        thief_has_key: for an encrypted program, whether the thief also has its key (it ships
            inside the same app, or a rooted device gives it up). (Default: True.)
        key_file: the defender's key for an encrypted program (default: ``$DIVQAT_KEY_FILE``).
        out: directory for ``metrics.json``.

    Returns a dict shaped like ``attack_victim``'s: ``attack`` "copy", ``params``, the victim's
    description and accuracy, ``program`` (outputs, fused defense, encrypted, bytes, sha256) and
    ``results`` with one row (``budget`` 0, ``queries_used`` 0, ``adversary_accuracy``,
    ``adversary_error``, ``agreement``, ``agreement_clean``, ``max_posterior_difference``,
    ``identical_copy``, ``seconds``), its figures repeated at the top level.
    """
    from divqat.victim import load_victim

    say = log or (lambda _msg: None)
    thief_has_key = check_bool("copy", "thief_has_key", thief_has_key)
    if not is_program_path(program):
        raise ConfigError(f"the copy attack takes a device program (`divqat export`), not {program}: "
                          "a thief who holds the device holds its .pte file")
    source = program_file(program)
    victim = load_victim(source, key_file=key_file)
    meta = victim.metadata
    test = load_dataset(meta["dataset"], "test", data_root)
    images = to_victim_input(test.images, tuple(meta["input_shape"]))
    labels = torch.as_tensor(test.labels).long()
    answers = _answers(victim, images)
    victim_pred = answers.argmax(1)
    victim_accuracy = float((victim_pred == labels).float().mean())
    encrypted = is_sealed(source.read_bytes()[:64])

    start = time.perf_counter()
    row: dict[str, Any] = {"budget": 0, "queries_used": 0}
    with tempfile.TemporaryDirectory(prefix="divqat-thief-") as stash:
        copy = Path(stash) / source.name
        shutil.copyfile(source, copy)  # all the thief needs to do
        identical = _sha256(copy) == _sha256(source)
        note = None
        try:
            # The thief runs the copy with the same runtime; with the key only if it has one.
            stolen = load_victim(copy, key_file=key_file if thief_has_key else False)
        except ArtifactError:
            if not (encrypted and not thief_has_key):
                raise
            stolen, note = None, "encrypted, and the thief has no key: the copy does not load"
        if stolen is not None:
            copied = _answers(stolen, images)
            pred = copied.argmax(1)
            acc = float((pred == labels).float().mean())
            agreement = float((pred == victim_pred).float().mean())
            row.update(adversary_accuracy=acc, adversary_error=1.0 - acc, agreement=agreement,
                       agreement_clean=agreement,
                       max_posterior_difference=float((copied - answers).abs().max()))
        else:
            row.update(adversary_accuracy=None, adversary_error=None, agreement=None,
                       agreement_clean=None, max_posterior_difference=None)
        seconds = time.perf_counter() - start
        # The owner's side, timed apart from the theft: the copy against the program's fingerprint.
        fingerprint = _owner_test(source, copy, stolen)
    row.update(identical_copy=identical, seconds=seconds, fingerprint=fingerprint)
    section = meta["program"]
    say(f"copy of {source}: " + (note or f"adversary accuracy {row['adversary_accuracy']:.2%}, agreement "
                                          f"{row['agreement']:.2%}, 0 queries"))
    record: dict[str, Any] = {
        "attack": ATTACK, "params": {"thief_has_key": thief_has_key}, "labels_only": False,
        "defense": "none", "defense_params": {},
        "victim": str(source), "victim_mode": meta.get("mode"), "victim_dataset": meta.get("dataset"),
        "victim_arch": meta.get("arch"), "victim_accuracy": victim_accuracy,
        "defender_accuracy": victim_accuracy,
        "test_set": f"{dataset_spec(meta['dataset']).name}:test",
        "program": {"outputs": section.get("outputs"), "defense": section.get("defense"),
                    "defense_params": section.get("defense_params"),
                    "precision": section.get("precision"), "encrypted": encrypted,
                    "bytes": source.stat().st_size, "sha256": _sha256(source)},
        "transfer_set": None, "budget": 0, "queries_used": 0, "note": note,
        **{k: row[k] for k in ("adversary_accuracy", "adversary_error", "agreement",
                               "agreement_clean", "max_posterior_difference")},
        "attack_seconds": row["seconds"], "fingerprint": fingerprint, "results": [row],
    }
    if out is not None:
        write_json(Path(out) / "metrics.json", record)
    return record


def _owner_test(source: Path, copy: Path, stolen: Callable | None) -> dict[str, Any] | None:
    """The copy tested against the fingerprint written beside ``source``, or None without one:
    ``identical_file`` (its sha256 is a program the fingerprint recorded), ``points``, ``agreed``
    and ``p_value`` of the boundary test (None when the copy does not load), ``verified``."""
    path = fingerprint_path(source)
    if not path.is_file():
        return None
    fingerprint = load_fingerprint(path)
    by_file = match_file(fingerprint, copy)
    by_points = match(fingerprint, stolen) if stolen is not None else None
    return {"identical_file": by_file.verified, "points": len(fingerprint),
            "agreed": None if by_points is None else by_points.agreed,
            "p_value": min(by_file.p_value, 1.0 if by_points is None else by_points.p_value),
            "significance": by_file.significance,
            "verified": by_file.verified or (by_points is not None and by_points.verified)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


__all__ = ["ATTACK", "copy_attack"]
