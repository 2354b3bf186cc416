"""The numerics a stage is computed under, and whether a cached stage's match this run's.

CPU training in torch is reproducible only at a fixed thread count (the reductions are split
across threads, and float addition is not associative): the same stage trained with 1 and with 2
torch threads gives different surrogates. So the threads are part of a stage's definition: the
config sets them (``numerics: {threads: 1}``), every executor runs every stage with exactly that
many (the serial one in this process, each Ray worker in its own), and ``done.json`` records them
with the torch version and whether the CPU had native bf16 (without it, a stage that asks for
bf16 autocast trains in fp32: ``divqat.train.trainer.training_precision``).

The stage keys do not hold the numerics (the keys of existing run folders stay valid); a cached
stage is checked when it is reused instead: one computed under other numerics is recomputed,
with one line saying why (``mismatch``). A stage finished before numerics were recorded is
judged by the threads its worker recorded, and accepted when they match (its torch version was
not recorded: ``NOT_RECORDED``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from divqat.train.trainer import bf16_supported

NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class Numerics:
    """What a stage's numbers depend on besides its settings and seed.

    threads: torch threads for the stage's training and evaluation (default 1: one stage per
        core under Ray, and the same numbers under the serial executor).
    """

    threads: int = 1

    def record(self) -> dict[str, Any]:
        """What ``done.json`` keeps: the threads, the torch version, native bf16, and whether
        torch's deterministic algorithms were on."""
        return {"threads": self.threads, "torch": torch.__version__, "bf16_native": bf16_supported(),
                "deterministic": torch.are_deterministic_algorithms_enabled()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with these numerics (torch's threads), and put back what was set."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def recorded(record: dict[str, Any]) -> dict[str, Any]:
    """The numerics a finished stage's ``done.json`` says it ran under; for a stage finished
    before they were recorded, the threads its worker recorded."""
    if isinstance(record.get("numerics"), dict):
        return record["numerics"]
    worker = record.get("worker") or {}
    return {"threads": worker.get("threads"), "torch": NOT_RECORDED}


def mismatch(record: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why a cached stage cannot stand for one computed under ``wanted`` (``Numerics.record()``),
    in words; None when it can. The torch version counts only where it was recorded; native bf16
    only for a stage that asked for bf16 (elsewhere it changes nothing)."""
    have = recorded(record)
    if have.get("threads") != wanted["threads"]:
        return (f"computed with {have.get('threads') or 'unknown'} torch threads, this run computes "
                f"with {wanted['threads']} (numerics.threads)")
    if have.get("torch") not in (NOT_RECORDED, wanted["torch"]):
        return f"computed under torch {have['torch']}, this run has {wanted['torch']}"
    if _asks_bf16(record.get("spec") or {}) and have.get("bf16_native", wanted["bf16_native"]) != wanted["bf16_native"]:
        where = "with" if have.get("bf16_native") else "without"
        return f"computed on a CPU {where} native bf16 (bf16 autocast {'used' if have.get('bf16_native') else 'fell back to fp32'})"
    return None


def _asks_bf16(spec: dict[str, Any]) -> bool:
    surrogate = spec.get("surrogate") or {}
    return "bf16" in (spec.get("precision"), surrogate.get("precision"), surrogate.get("eval_precision"))


def uses_bf16(record: dict[str, Any]) -> bool | None:
    """Whether a finished stage trained under bf16 autocast: True (asked, CPU had it), False
    (asked, fell back to fp32), None (did not ask, or not recorded)."""
    if not _asks_bf16(record.get("spec") or {}):
        return None
    return recorded(record).get("bf16_native")


def summary(records: list[dict[str, Any]], wanted: dict[str, Any]) -> dict[str, Any]:
    """What the finished stages of a run were computed under, for ``results.json``: this run's
    numerics, how many stages recorded them (the others finished before they were recorded and
    were judged by their worker's threads), which stages used bf16 autocast and which fell back
    to fp32, and every distinct set of numerics found (more than one: not comparable)."""
    seen: list[dict[str, Any]] = []
    for record in records:
        have = recorded(record)
        if have not in seen:
            seen.append(have)
    bf16: dict[str, dict[str, int]] = {"used": {}, "fell_back": {}}
    for record in records:
        used = uses_bf16(record)
        if used is not None:
            counts = bf16["used" if used else "fell_back"]
            counts[record.get("kind", "?")] = counts.get(record.get("kind", "?"), 0) + 1
    return {**wanted, "stages": len(records),
            "not_recorded": sum(recorded(r).get("torch") == NOT_RECORDED for r in records),
            "bf16_stages": sum(bf16["used"].values()), "bf16_fell_back": sum(bf16["fell_back"].values()),
            "bf16_by_kind": bf16, "distinct": seen}


def lines(numerics: dict[str, Any] | None) -> list[str]:
    """The report's account of the numerics (a paragraph, Markdown)."""
    if not numerics:
        return []
    out = [f"Every stage ran with {numerics['threads']} torch thread"
           f"{'s' if numerics['threads'] != 1 else ''} (`numerics.threads`) under torch "
           f"{numerics['torch']}, on a CPU {'with' if numerics['bf16_native'] else 'without'} native "
           "bf16; the serial and the Ray executor give the same numbers under the same numerics."]
    by_kind = numerics.get("bf16_by_kind") or {}

    def kinds(which: str) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in (by_kind.get(which) or {}).items())

    if numerics["bf16_stages"]:
        which = kinds("used")  # empty for results.json written before the kinds were recorded
        out.append(f"{numerics['bf16_stages']} stage(s) trained under bf16 autocast as configured "
                   f"({which + '; ' if which else ''}the rest in fp32).")
    if numerics["bf16_fell_back"]:
        out.append(f"{numerics['bf16_fell_back']} stage(s) ({kinds('fell_back')}) asked for bf16 but "
                   "the CPU had no native bf16: they trained in fp32, and their numbers are not "
                   "comparable with a bf16 run's.")
    if numerics["not_recorded"]:
        out.append(f"{numerics['not_recorded']} cached stage(s) finished before the numerics were "
                   "recorded: their threads are their worker's, their torch version is not known.")
    if len(numerics["distinct"]) > 1:
        out.append("**The stages were computed under different numerics** "
                   f"({'; '.join(map(str, numerics['distinct']))}): numbers across them do not compare.")
    return ["## Numerics", "", " ".join(out), ""]


__all__ = ["NOT_RECORDED", "Numerics", "lines", "mismatch", "recorded", "summary", "uses_bf16"]
