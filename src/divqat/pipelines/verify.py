"""Was this model taken from ours, and through which API key? The whole ``divqat verify`` command.

For every key's watermark marks (``divqat.ownership.marks``: the inputs the black box answered
with a wrong label, and the control inputs it answered truly) the suspect is asked the labels of
both (DAWN, Szyller et al., ACM MM 2021, sec. 4.3):

- ``agreed`` of ``marks``: how often the suspect gives a marked input its mark label;
- ``chance``: how often it gives a control input the label the mark *would* have given it,
  measured on the suspect itself, with add-one smoothing ((agreed + 1) / (controls + 2): never 0,
  and cautious on few controls);
- ``p_value``: P[X >= agreed], X ~ Binomial(marks, chance) (``ownership.stats``); ``verified``
  when it is below the significance (default 1e-6).

A model trained on a key's answers repeats its marks far above its chance; an independent model
gives a marked input a wrong label no more often than any other input. The key named is the
verified key with the smallest p-value.

For every recorded fingerprint of a program (``divqat export``: IPGuard points near the victim's
boundaries, ``divqat.ownership.fingerprint``) the suspect is asked the labels of its points and
matched with ``fingerprint.match`` (its agreement against the chance measured on its answers to
the points' sources, the same binomial test), and a suspect that is a file is compared by its
sha256 with the programs the fingerprint recorded (``match_file``: "identical file", no query).
The copy of the file (fine-tuned, pruned, requantized) is the fingerprint's business; the
surrogate distilled from the answers, the watermark's.

``max_queries`` bounds the images asked: each fingerprint is asked whole (its points), and what
is left goes to the marks (marks and controls shared evenly between keys, the first ones of
each); the record states the cost.

    >>> record = verify_suspect(VerifyRequest("runs/stolen.pt", "runs/attack"), RunContext())
    >>> record["verified_key"], record["queries"]
    >>> record = verify_suspect(VerifyRequest("found.pte", fingerprints=("fp32.fingerprint.safetensors",)))
    >>> record["verified_fingerprint"]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from divqat.checks import check_int, check_number
from divqat.data import to_float
from divqat.errors import ConfigError
from divqat.ownership import SIGNIFICANCE, KeyMarks, load_marks, verdict
from divqat.ownership.fingerprint import (
    Fingerprint,
    file_sha256,
    load_fingerprints,
    match,
    match_file,
)
from divqat.pipelines.context import RunContext
from divqat.pipelines.suspect import Suspect, open_suspect


@dataclass(frozen=True)
class VerifyRequest:
    """What ``divqat verify`` is asked.

    Arguments:
        suspect: the suspect (``open_suspect``: a victim folder, a ``.pte``, a model file, a
            ``.pt2`` or TorchScript file, or a service URL).
        marks: a marks file (``.npz``), a service's key database, or a folder of either.
            (Default: None, no watermark tested.)
        fingerprints: fingerprint files of ``divqat export`` (``NAME.fingerprint.safetensors``)
            or folders holding them. (Default: none.) One of ``marks`` and ``fingerprints`` is
            required.
        significance: the verdict's level. (Default: 1e-6.)
        max_queries: most images asked of the suspect, fingerprint points and marks together.
            (Default: None, every point, mark and control.)
        api_key: for a suspect URL, a key of that service. (Default: None.)
        input_shape: (C, H, W) of a TorchScript suspect. (Default: None, the evidence's.)
    """

    suspect: str | Path
    marks: str | Path | None = None
    fingerprints: tuple[str | Path, ...] = ()
    significance: float = SIGNIFICANCE
    max_queries: int | None = None
    api_key: str | None = field(default=None, repr=False)
    input_shape: tuple[int, int, int] | None = None


def plan_probes(marks: list[KeyMarks], max_queries: int | None) -> list[tuple[int, int]]:
    """(marks, controls) asked per key: all of them, or within ``max_queries`` an even share per
    key, split evenly between marks and controls (one side's unused share going to the other)."""
    if max_queries is None:
        return [(m.marks, m.controls) for m in marks]
    share = max_queries // len(marks)
    if share < 2:
        raise ConfigError(f"--max-queries {max_queries} leaves fewer than 2 images for each of "
                          f"{len(marks)} keys")
    plan = []
    for m in marks:
        n_marks = min(m.marks, share // 2)
        n_controls = min(m.controls, share - n_marks)
        plan.append((min(m.marks, share - n_controls), n_controls))
    return plan


def verify_marks(suspect: Suspect, marks: list[KeyMarks], significance: float = SIGNIFICANCE,
                 max_queries: int | None = None) -> dict[str, Any]:
    """Test ``suspect`` against each key's marks; returns ``rows`` (one per key), the verified
    keys, the key named, and the queries it took. Refuses (``ConfigError``, nothing asked) marks of
    another input shape than the suspect's."""
    check_number("verify", "significance", significance, low=0, low_open=True, high=0.5)
    check_int("verify", "max_queries", max_queries, low=1, optional=True)
    if not marks:
        raise ConfigError("no marks to verify against")
    shapes = {m.input_shape for m in marks}
    if len(shapes) > 1:
        raise ConfigError(f"the marks are of several input shapes ({', '.join(map(_shape, shapes))}); "
                          "verify against one victim's marks at a time")
    shape = shapes.pop()
    check_suspect_shape(suspect, shape, "the marks are")
    plan = plan_probes(marks, max_queries)
    pieces = [(m.mark_images[:a], m.control_images[:b]) for m, (a, b) in zip(marks, plan, strict=True)]
    stream = np.concatenate([x for pair in pieces for x in pair]) if pieces else np.zeros((0, *shape), np.uint8)
    before = suspect.queries
    start = time.perf_counter()
    labels = suspect.labels(to_float(torch.from_numpy(np.ascontiguousarray(stream)))).numpy()
    seconds = time.perf_counter() - start
    rows, at = [], 0
    for m, (a, b) in zip(marks, plan, strict=True):
        said_marks, said_controls = labels[at:at + a], labels[at + a:at + a + b]
        at += a + b
        agreed = int((said_marks == m.mark_labels[:a]).sum())
        control_agreed = int((said_controls == m.control_labels[:b]).sum())
        chance = (control_agreed + 1) / (b + 2)
        v = verdict(f"marks of key {m.key!r}", agreed, a, chance, significance)
        rows.append({"key": m.key, "marks": a, "agreed": agreed, "agreement": v.agreement,
                     "controls": b, "control_agreed": control_agreed,
                     "control_agreement": control_agreed / b if b else None, "chance": chance,
                     "p_value": v.p_value, "significance": significance, "verified": v.verified,
                     "marks_kept": m.marks, "controls_kept": m.controls, "rate": m.rate,
                     "answered": m.answered, "marked": m.marked, "source": m.source})
    verified = sorted((r for r in rows if r["verified"]), key=lambda r: (r["p_value"], -r["agreement"]))
    return {"rows": rows, "verified_keys": [r["key"] for r in verified],
            "verified_key": verified[0]["key"] if verified else None,
            "queries": suspect.queries - before, "query_seconds": seconds,
            "input_shape": list(shape), "significance": significance}


def check_suspect_shape(suspect: Suspect, shape: Any, evidence: str) -> None:
    """``ConfigError`` in one line, before anything is asked, when the suspect takes images of
    another shape than ``shape``, the evidence's (``evidence``: "the marks are", ...)."""
    if suspect.input_shape is not None and tuple(suspect.input_shape) != tuple(shape):
        raise ConfigError(f"the suspect takes {_shape(suspect.input_shape)} images, {evidence} "
                          f"{_shape(shape)}: it is not a copy of this victim as it stands (nothing was asked)")


def verify_fingerprints(suspect: Suspect, fingerprints: list[tuple[str | Path, Fingerprint]],
                        significance: float = SIGNIFICANCE,
                        suspect_file: str | Path | None = None) -> dict[str, Any]:
    """Match ``suspect`` against each (path, fingerprint): ``fingerprint.match`` on its points
    (one batch of ``len(fingerprint)`` queries) and, where the suspect is a file
    (``suspect_file``), ``match_file`` by its sha256. Returns ``fingerprints`` (one row each:
    agreement on the points, the chance granted, the p-value, ``identical_file``, ``verified``:
    either test), the path of the verified fingerprint with the strongest evidence (an identical
    file first, then the smallest p-value), and the queries it took. Refuses (``ConfigError``,
    nothing asked) fingerprints of another input shape than the suspect's."""
    check_number("verify", "significance", significance, low=0, low_open=True, high=0.5)
    if not fingerprints:
        raise ConfigError("no fingerprint to match")
    for path, fp in fingerprints:
        check_suspect_shape(suspect, fp.input_shape, f"fingerprint {Path(path).name} is of")
    before, start, rows = suspect.queries, time.perf_counter(), []
    for path, fp in fingerprints:
        v = match(fp, suspect.labels, significance=significance)
        same = None if suspect_file is None else match_file(fp, suspect_file, significance=significance).verified
        rows.append({"fingerprint": str(path), "method": fp.params.get("method"), "points": v.probes,
                     "agreed": v.agreed, "agreement": v.agreement, "chance": v.chance,
                     "p_value": v.p_value, "significance": significance,
                     "identical_file": same, "verified": v.verified or bool(same),
                     "references": len(fp.reference_agreement), "evidence": v.evidence,
                     "program": fp.params.get("program"), "num_classes": fp.num_classes,
                     "input_shape": list(fp.input_shape)})
    verified = sorted((r for r in rows if r["verified"]),
                      key=lambda r: (not r["identical_file"], r["p_value"], -r["agreement"]))
    return {"fingerprints": rows, "verified_fingerprint": verified[0]["fingerprint"] if verified else None,
            "queries": suspect.queries - before, "query_seconds": time.perf_counter() - start}


def _evidence_shape(marks: list[KeyMarks], fingerprints: list[tuple[Path, Fingerprint]]) -> Any:
    shapes = {tuple(m.input_shape) for m in marks} | {fp.input_shape for _, fp in fingerprints}
    if len(shapes) > 1:
        raise ConfigError(f"the marks and fingerprints are of several input shapes "
                          f"({', '.join(sorted(map(_shape, shapes)))}); verify against one victim's at a time")
    return shapes.pop()


def verify_suspect(request: VerifyRequest, context: RunContext | None = None) -> dict[str, Any]:
    """Open the suspect, load the marks and the fingerprints, and test it against each
    (``verify_marks``, ``verify_fingerprints``); the record adds what the suspect is, its sha256
    where it is a file, and the whole time taken. ``verified``: any key or fingerprint verified."""
    context = context or RunContext()
    start = time.perf_counter()
    if request.marks is None and not request.fingerprints:
        raise ConfigError("verify needs the evidence to test the suspect against: --marks (the "
                          "watermark of the answers), --fingerprint (of the program file), or both")
    check_number("verify", "significance", request.significance, low=0, low_open=True, high=0.5)
    check_int("verify", "max_queries", request.max_queries, low=1, optional=True)
    # The evidence first: a bad marks or fingerprint path is found before a suspect is loaded
    # (or a service queried), and so is evidence of several shapes.
    marks = load_marks(request.marks) if request.marks is not None else []
    fingerprints = [found for spec in request.fingerprints for found in load_fingerprints(spec)]
    shape = _evidence_shape(marks, fingerprints)
    points = sum(len(fp) for _, fp in fingerprints)
    marks_queries = request.max_queries
    if request.max_queries is not None and fingerprints:
        marks_queries = request.max_queries - points
        if marks_queries < (2 * len(marks) if marks else 0):
            raise ConfigError(f"--max-queries {request.max_queries} leaves too few images: the "
                              f"fingerprints are asked whole ({points} points)"
                              + (f", and each of {len(marks)} keys needs 2 more" if marks else ""))
    suspect_file = Path(request.suspect) if Path(str(request.suspect)).is_file() else None
    record: dict[str, Any] = {"rows": [], "verified_keys": [], "verified_key": None}
    with open_suspect(request.suspect, api_key=request.api_key, device=context.device,
                      input_shape=request.input_shape) as suspect:
        evidence = " and ".join(w for w, given in (("the marks", marks), ("the fingerprints", fingerprints))
                                if given)
        check_suspect_shape(suspect, shape, f"{evidence} are")
        queries = seconds = 0.0
        if marks:
            context.say(f"asking {suspect.name} about the marks of {len(marks)} key(s)")
            record = verify_marks(suspect, marks, request.significance, marks_queries)
            queries, seconds = record["queries"], record["query_seconds"]
        if fingerprints:
            context.say(f"asking {suspect.name} the labels of {len(fingerprints)} fingerprint(s), "
                        f"{points} points")
            found = verify_fingerprints(suspect, fingerprints, request.significance, suspect_file)
            record.update(fingerprints=found["fingerprints"],
                          verified_fingerprint=found["verified_fingerprint"])
            queries, seconds = queries + found["queries"], seconds + found["query_seconds"]
        record.update(queries=int(queries), query_seconds=seconds, input_shape=list(shape),
                      significance=request.significance, suspect=str(request.suspect),
                      suspect_kind=suspect.name)
    record["suspect_sha256"] = file_sha256(suspect_file) if suspect_file is not None else None
    record["marks_from"] = None if request.marks is None else str(request.marks)
    record["fingerprints_from"] = [str(f) for f in request.fingerprints]
    record.setdefault("fingerprints", [])
    record.setdefault("verified_fingerprint", None)
    record["verified"] = record["verified_key"] is not None or record["verified_fingerprint"] is not None
    record["seconds"] = time.perf_counter() - start
    return record


def _shape(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)


def p_text(p: float) -> str:
    """A p-value for a table: 3 significant digits, and "< 1e-300" where it underflows."""
    return "< 1e-300" if p == 0 else f"{p:.3g}" if p >= 1e-4 or math.isnan(p) else f"{p:.2e}"


__all__ = ["VerifyRequest", "check_suspect_shape", "p_text", "plan_probes", "verify_fingerprints",
           "verify_marks", "verify_suspect"]
