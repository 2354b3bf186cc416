"""What the thieves that know need from a driver, built here where the drivers may import what
the attacks may not:

- the recovery thief's ``KnownDefense``: the defense family and public parameters it assumes, as
  a function it can run on its own posteriors (``known_defense``). Defenses are public math, so
  the thief may run them; but ``attacks/`` imports no defense (the import contract), so the
  driver builds the defense and hands it over as an opaque callable. Where a defense runs a
  model, the thief runs one of its own: a misinformation model it trains on its own labeled
  queries, a randomly initialized surrogate of its own architecture (MAD's is one in the
  reference too); where it draws random numbers, from a seed of the thief's.
- the Sybil thief's boxes: one per key, each with its own budget and monitor (``key_budget``,
  ``stream_monitors``).

    >>> kwargs = known_defense(thief, "dcp", {"beta": 0.5}, training, transfer_set, (1, 28, 28), 10)
    >>> thief.steal(box, budgets, training, transfer=transfer_set, **kwargs)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from divqat.attacks import Attack, KnownDefense, Recovery, SurrogateTraining, Sybil, TransferSet
from divqat.attacks import build_surrogate as build_thief_model
from divqat.defenses import DEFENSES, check_defense, create_defense
from divqat.detectors import Monitor
from divqat.errors import ConfigError
from divqat.pipelines.defense_models import MisinformationObjective
from divqat.train.trainer import fit


def _knowing(thief: Attack) -> Recovery | None:
    """The recovery thief in ``thief`` (itself, or the attack a Sybil thief spreads)."""
    inner = thief.inner if isinstance(thief, Sybil) else thief
    return inner if isinstance(inner, Recovery) else None


def _defense_of(thief: Attack, served: str | None, served_params: dict[str, Any] | None
                ) -> tuple[str, dict[str, Any], Any]:
    """(name, parameters, class) of the defense a recovery thief inverts, checked."""
    recovery = _knowing(thief)
    assert recovery is not None
    if recovery.defense is not None:
        name, params = recovery.defense, dict(recovery.defense_params or {})
    elif served is None:
        raise ConfigError("the recovery thief needs the defense it inverts and the service does not "
                          "publish it: --attack-param defense=NAME [--attack-param "
                          "defense_params=key=value,...]")
    else:
        name, params = served, dict(served_params or {})
    try:
        cls = check_defense(name, {k: v for k, v in params.items() if k != "seed"})
    except ConfigError as e:
        raise ConfigError(f"recovery.defense: {e}") from None
    return name, params, cls


def check_known_defense(thief: Attack, served: str | None, served_params: dict[str, Any] | None) -> None:
    """Refuse, before anything is queried or trained, a recovery thief that names no defense where
    the victim's is not known (over HTTP) or names one that does not exist or has bad parameters;
    nothing for other thieves."""
    if _knowing(thief) is not None:
        _defense_of(thief, served, served_params)


def known_defense(thief: Attack, served: str | None, served_params: dict[str, Any] | None,
                  training: SurrogateTraining, transfer: TransferSet | None,
                  input_shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    """The keyword arguments of ``thief.steal`` that hand a recovery thief the defense it knows
    (``{"known": KnownDefense}``); empty for any other thief.

    The thief's own ``defense`` / ``defense_params`` when it names one; else the defense the
    victim is served with (``served``, ``served_params``: in process the driver knows it; over
    HTTP ``served`` is None and the thief must name it). A ``seed`` parameter is replaced by
    one of the thief's (the defender's is not public).
    """
    if _knowing(thief) is None:
        return {}
    name, params, cls = _defense_of(thief, served, served_params)
    params.pop(cls.model_param, None)
    if "seed" in DEFENSES.defaults(cls):
        params["seed"] = training.seed + 7919
    stats = transfer.stats if transfer is not None else None

    def simulator(images: Tensor, labels: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        model = {}
        if cls.model_param is not None:
            net = build_thief_model(training.arch, input_shape, num_classes, stats, training.seed + 2)
            if cls.trains_model:  # the thief's own misinformation model, on its own queries
                fit(net, images, labels, MisinformationObjective(),
                    training.fit_config("thief's misinformation model", len(images)))
            model = {cls.model_param: net.eval().to(training.device)}
        defense = create_defense(name, **model, **params)

        def perturb(posteriors: Tensor, inputs: Tensor) -> Tensor:
            return defense(posteriors, images=inputs.to(training.device) if model else inputs)
        return perturb

    return {"known": KnownDefense(name, {k: v for k, v in params.items()}, simulator)}


def key_budget(thief: Attack, budget: int) -> int:
    """Each key's budget in process: the largest budget spread over the thief's keys."""
    return math.ceil(budget / thief.streams)


def stream_monitors(thief: Attack, monitor: Monitor | None,
                    monitors: Sequence[Monitor | None] | None) -> list[Monitor | None]:
    """One monitor (or None) per stream of the thief: ``monitor`` for a one-stream thief,
    ``monitors`` (one per key) for a Sybil thief."""
    k = thief.streams
    if k == 1:
        if monitors is not None:
            raise ConfigError("monitors=[...] are for a Sybil thief's keys; this thief has one stream")
        return [monitor]
    if monitor is not None:
        raise ConfigError(f"a Sybil thief's {k} streams each need their own monitor: pass monitors=[...] "
                          "(one per key; divqat.pipelines.detect.watching_keys builds them)")
    if monitors is None:
        return [None] * k
    if len(monitors) != k:
        raise ConfigError(f"the Sybil thief holds {k} keys; got {len(monitors)} monitors")
    return list(monitors)


__all__ = ["check_known_defense", "key_budget", "known_defense", "stream_monitors"]
