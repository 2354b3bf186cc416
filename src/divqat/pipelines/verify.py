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
verified key with the smallest p-value. ``max_queries`` bounds the images asked (marks and
controls shared evenly between keys, the first ones of each); the record states the cost.

    >>> record = verify_suspect(VerifyRequest("runs/stolen.pt", "runs/attack"), RunContext())
    >>> record["verified_key"], record["queries"]
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
from divqat.pipelines.context import RunContext
from divqat.pipelines.suspect import Suspect, open_suspect


@dataclass(frozen=True)
class VerifyRequest:
    """What ``divqat verify`` is asked.

    Arguments:
        suspect: the suspect (``open_suspect``: a victim folder, a ``.pte``, a model file, a
            ``.pt2`` or TorchScript file, or a service URL).
        marks: a marks file (``.npz``), a service's key database, or a folder of either.
        significance: the verdict's level. (Default: 1e-6.)
        max_queries: most images asked of the suspect, all keys together. (Default: None, every
            mark and control.)
        api_key: for a suspect URL, a key of that service. (Default: None.)
        input_shape: (C, H, W) of a TorchScript suspect. (Default: None, the marks'.)
    """

    suspect: str | Path
    marks: str | Path
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
    if suspect.input_shape is not None and tuple(suspect.input_shape) != tuple(shape):
        raise ConfigError(f"the suspect takes {_shape(suspect.input_shape)} images, the marks are "
                          f"{_shape(shape)}: it is not a copy of this victim as it stands (nothing was asked)")
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


def verify_suspect(request: VerifyRequest, context: RunContext | None = None) -> dict[str, Any]:
    """Open the suspect, load the marks, and ``verify_marks``; the record adds what the suspect
    is and the whole time taken."""
    context = context or RunContext()
    start = time.perf_counter()
    marks = load_marks(request.marks)
    # Marks first: a bad marks path is found before a suspect is loaded (or a service queried).
    with open_suspect(request.suspect, api_key=request.api_key, device=context.device,
                      input_shape=request.input_shape) as suspect:
        context.say(f"asking {suspect.name} about the marks of {len(marks)} key(s)")
        record = verify_marks(suspect, marks, request.significance, request.max_queries)
        record["suspect"] = str(request.suspect)
        record["suspect_kind"] = suspect.name
    record["marks_from"] = str(request.marks)
    record["seconds"] = time.perf_counter() - start
    return record


def _shape(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)


def p_text(p: float) -> str:
    """A p-value for a table: 3 significant digits, and "< 1e-300" where it underflows."""
    return "< 1e-300" if p == 0 else f"{p:.3g}" if p >= 1e-4 or math.isnan(p) else f"{p:.2e}"


__all__ = ["VerifyRequest", "p_text", "plan_probes", "verify_marks", "verify_suspect"]
