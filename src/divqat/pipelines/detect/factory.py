"""A detector for a victim, built from what is kept with it: its calibration
(``VICTIM/detectors/NAME.json``), its benign reference (``NAME.pt``) and the defender's features;
and the list of detectors ``divqat detectors`` prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from divqat.detectors import DETECTORS, Detector, check_detector, describe_detectors
from divqat.errors import ArtifactError, ConfigError
from divqat.pipelines.detect.features import detectors_dir, load_features


def calibration_path(victim_dir: str | Path, name: str, store: str | Path | None = None) -> Path:
    return detectors_dir(victim_dir, store) / f"{name}.json"


def load_calibration(victim_dir: str | Path | None, name: str, store: str | Path | None = None) -> dict | None:
    if victim_dir is None:
        return None
    path = calibration_path(victim_dir, name, store)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e}); run `divqat calibrate` again") from e


def _reference(victim_dir: Path, name: str, store: str | Path | None = None) -> dict[str, Any]:
    path = detectors_dir(victim_dir, store) / f"{name}.pt"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run `divqat calibrate --victim {victim_dir} "
                            f"--detector {name}` first")
    return torch.load(path, map_location="cpu", weights_only=True)


def detector_factory(name: str, params: dict[str, Any] | None = None,
                     victim_dir: str | Path | None = None, *, calibrated: bool = True,
                     store: str | Path | None = None, service: bool = False,
                     log: Callable[[str], None] | None = None
                     ) -> tuple[Callable[[], Detector], dict[str, Any]]:
    """A function that builds fresh detectors ``name`` for the victim (one per client; they
    share the features model and the reference), and the settings they run with.

    The settings are the calibration's (threshold and the parameters it was calibrated for,
    ``VICTIM/detectors/NAME.json``) overridden by ``params``; without a calibration, the
    detector's defaults. ``calibrated=False`` ignores a saved calibration. ``store``: where the
    calibration is kept (default ``VICTIM/detectors/``). ``service``: for a long-running service,
    whose detectors live as long as their clients' keys: a parameter of the detector's
    ``service_params`` that neither ``params`` nor the calibration moved from its default takes
    the service's value (PRADA: ``max_set`` 512), so that each client's state stays bounded."""
    say = log or (lambda _m: None)
    params = dict(params or {})
    cls = check_detector(name, params)
    calibration = load_calibration(victim_dir, name, store) if calibrated else None
    settings: dict[str, Any] = {}
    if calibration is not None:
        settings = {**calibration["params"], cls.threshold_param: calibration["threshold"]}
        changed = sorted(k for k in params if k != cls.threshold_param
                         and params[k] != calibration["params"].get(k))
        if changed:
            was = ", ".join(f"{k}={calibration['params'].get(k)}" for k in changed)
            say(f"warning: {name} was calibrated with {was}; "
                f"its threshold may not hold the calibrated false-alarm rate with other settings")
    settings.update(params)
    if service:
        defaults = next(d for n, _, d in describe_detectors() if n == name)
        for key, value in cls.service_params.items():
            if key not in params and settings.get(key, defaults.get(key)) == defaults.get(key):
                settings[key] = value
    data: dict[str, Any] = {}
    if cls.model_param is not None or cls.data_params:
        if victim_dir is None:
            raise ConfigError(f"detector {name!r} is built from a victim: give the victim directory")
        reference = _reference(Path(victim_dir), name, store)
        data = ({cls.model_param: load_features(victim_dir, store), **reference} if cls.model_param
                else reference)
    elif cls.calibrated and calibration is None:
        raise ConfigError(f"detector {name!r} needs `divqat calibrate --detector {name}` first")

    def make(**override: Any) -> Detector:
        return DETECTORS.create(name, **{**data, **settings, **override})

    shown = make().params()
    for key in (cls.model_param, *cls.data_params):
        shown.pop(key, None)
    return make, {"detector": name, "params": shown, "calibrated": calibration is not None,
                  "calibration": None if calibration is None else
                  {k: calibration[k] for k in ("target_far", "streams", "length", "benign", "created")}}


def build_detector(name: str, params: dict[str, Any] | None = None,
                   victim_dir: str | Path | None = None, **kwargs: Any) -> Detector:
    """One detector for the victim (see ``detector_factory``)."""
    return detector_factory(name, params, victim_dir, **kwargs)[0]()


def list_detectors() -> list[dict[str, Any]]:
    """What ``divqat detectors`` prints: name, summary, parameters with their defaults, and
    what divqat builds from the victim."""
    rows = []
    for name, summary, defaults in describe_detectors():
        cls = DETECTORS.get(name)
        built = [p for p in (cls.model_param, *cls.data_params) if p]
        rows.append({"name": name, "summary": summary,
                     "params": {k: v for k, v in defaults.items() if k not in built},
                     "model": cls.model_help, "alarm": f"score {cls.alarm_when} {cls.threshold_param}",
                     "needs_calibration": cls.calibrated})
    return rows


__all__ = ["build_detector", "calibration_path", "detector_factory", "list_detectors",
           "load_calibration"]
