"""The names an experiment gives its victims, defenses and thieves: the same in stage labels,
result rows, the report and the plots."""

from __future__ import annotations

from typing import Any

from divqat.registry import params_text


def victim_label(mode: str, alpha: float | None = None, cap: Any = False, name: str | None = None) -> str:
    """"qat", "divqat a=2", a variant's "<name> a=2" ("divqat-out a=2"); with ``cap`` given (a
    grid over caps), "divqat a=2 cap=0.15"."""
    if mode != "divqat":
        return mode
    return (f"{name or 'divqat'} a={alpha:g}"
            + ("" if cap is False else f" cap={'none' if cap is None else f'{cap:g}'}"))


def victim_name(spec: dict[str, Any], with_cap: bool = False) -> str:
    """The label of the victim a victim stage's ``spec`` trains."""
    if spec["mode"] == "fp32":
        return "fp32 teacher"
    div = spec.get("divqat") or {}
    return victim_label(spec["mode"], div.get("alpha"), div.get("cap") if with_cap else False,
                        spec.get("name"))


def victim_kind(spec: dict[str, Any]) -> str:
    """What a defense's ``victims:`` names a victim stage's victim by: "qat", "divqat" (the
    divqat section's own, every alpha and cap) or a variant's name ("divqat-out")."""
    if spec["mode"] == "divqat":
        return spec.get("name") or "divqat"
    return spec["mode"]


def defense_label(name: str, params: dict[str, Any]) -> str:
    return f"{name} {params_text(params)}".strip()


def thief_label(labels_only: bool) -> str:
    return "label-only" if labels_only else "soft"


def attack_label(name: str, params: dict[str, Any], transfer: str | None, labels_only: bool) -> str:
    parts = [name, params_text(params), thief_label(labels_only), transfer or "data-free"]
    return " ".join(p for p in parts if p)


__all__ = ["attack_label", "defense_label", "thief_label", "victim_kind", "victim_label", "victim_name"]
