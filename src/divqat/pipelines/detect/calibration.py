"""Calibrating a detector on a victim: a threshold for a target false-alarm rate on benign
streams of the images the victim was trained on (what a defender holds), kept with the victim
(``divqat calibrate``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divqat.blackbox import DefendedVictim
from divqat.checks import check_int, check_number
from divqat.detectors import calibrated_threshold, check_detector
from divqat.errors import ConfigError
from divqat.io import atomic_write, write_json
from divqat.pipelines.context import RunContext
from divqat.pipelines.detect.factory import calibration_path
from divqat.pipelines.detect.features import FEATURES, detectors_dir, save_features
from divqat.pipelines.detect.honest import benign_pools, detector_creator, run_stream, stream_orders
from divqat.victim import load_victim, victim_metadata


@dataclass(frozen=True)
class CalibrateRequest:
    """What ``divqat calibrate`` is asked: a threshold for one detector on one victim.

    Arguments:
        victim: the victim directory (``divqat train``).
        detector, params: the registered detector and its parameters (``divqat detectors``);
            its threshold parameter is what calibration sets. (Default params: its defaults.)
        target_far: the false-alarm rate to hold on benign streams, in [0, 0.5].
            (Default: 0.05.)
        streams, length: benign streams, each of ``length`` queries. (Defaults: 40, 5000.)
        reference_size: benign images in a feature detector's reference (mmd). (Default: 1000.)
        seed: the streams' orders and the reference's images. (Default: 0.)
        store: where the calibration is kept. (Default: None, ``VICTIM/detectors/``; an
            experiment keeps each calibration in its own stage folder.)
    """

    victim: str | Path
    detector: str
    params: dict[str, Any] = field(default_factory=dict)
    target_far: float = 0.05
    streams: int = 40
    length: int = 5000
    reference_size: int = 1000
    seed: int = 0
    store: str | Path | None = None


def calibrate_detector(request: CalibrateRequest, context: RunContext | None = None) -> dict[str, Any]:
    """Calibrate detector ``request.detector`` on the victim for a target false-alarm rate and
    keep it with the victim (``VICTIM/detectors/``, or ``request.store``); ``context``: where
    the data are, the device the victim runs on, the log (default ``RunContext()``).
    ``calibrate_loaded`` does the same with the victim already loaded.

    Benign streams: ``streams`` clients, each sending ``length`` of the images the victim was
    trained on in a random order of its own (undefended answers). The threshold is set so that
    at most ``floor(target_far * streams)`` of them raise the alarm within ``length`` queries.
    For mmd, first the defender's fp32 model is copied next to the victim and the features of
    ``reference_size`` other training images become the benign reference (bandwidth by the
    median heuristic). Returns what was written to ``VICTIM/detectors/NAME.json``."""
    return _calibrate(request, context or RunContext(), None)


def calibrate_loaded(request: CalibrateRequest, victim: Callable[[Tensor], Tensor],
                     context: RunContext | None = None) -> dict[str, Any]:
    """``calibrate_detector`` with the victim already loaded (an experiment's stage worker
    keeps it compiled between stages): images float32 (N, C, H, W) -> logits (N, K)."""
    return _calibrate(request, context or RunContext(), victim)


def _calibrate(request: CalibrateRequest, context: RunContext,
               victim: Callable[[Tensor], Tensor] | None) -> dict[str, Any]:
    say, data_root, store, seed = context.say, context.data_root, request.store, request.seed
    victim_dir, name = Path(request.victim), request.detector
    meta = victim_metadata(victim_dir)
    params = dict(request.params or {})
    cls = check_detector(name, params)
    target_far = check_number("calibrate", "target_far", request.target_far, low=0.0, high=0.5)
    streams = check_int("calibrate", "streams", request.streams, low=1)
    length = check_int("calibrate", "length", request.length, low=1)
    reference_size = check_int("calibrate", "reference_size", request.reference_size, low=2)
    start = time.perf_counter()
    if victim is None:
        victim = load_victim(victim_dir, device=context.device)
    served = DefendedVictim(victim)
    features = save_features(victim_dir, store) if cls.model_param == "features" else None
    pool = benign_pools(meta, data_root, served, features, ["train"])[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool.images), generator=generator)
    data: dict[str, Any] = {}
    stream_pool = pool
    if features is not None:
        if len(pool.images) < reference_size + length:
            raise ConfigError(f"{pool.name} has {len(pool.images)} images; the reference takes "
                              f"{reference_size} and a stream {length}")
        from divqat.detectors.mmd import median_bandwidth

        reference = pool.features[order[:reference_size]].double()
        data = {"reference": reference, "bandwidth": median_bandwidth(reference)}
        atomic_write(detectors_dir(victim_dir, store) / f"{name}.pt", lambda tmp: torch.save(data, tmp))
        # The streams never contain a reference image.
        rest = order[reference_size:]
        stream_pool = pool.subset(rest)
    if len(stream_pool.images) < length:
        raise ConfigError(f"{pool.name} has {len(stream_pool.images)} images for streams of {length}")
    settings = {k: v for k, v in params.items() if k != cls.threshold_param}
    make = detector_creator(name, {**({cls.model_param: None} if cls.model_param else {}), **data, **settings})
    say(f"calibrating {name} on {streams} benign streams of {length} queries ({pool.name})")
    worst = []
    for i, stream in enumerate(stream_orders(len(stream_pool.images), streams, length, seed)):
        detector = run_stream(make, stream_pool, stream, features is not None, cls.model_param)
        worst.append(detector.verdict().worst)
        say(f"  stream {i + 1}/{streams}: most suspicious score {worst[-1]}")
    tested = [w for w in worst if w is not None]
    if not tested:
        raise ConfigError(f"no benign stream of {length} queries reached a test of {name}; use longer "
                          "streams")
    threshold = calibrated_threshold(tested, target_far, cls.alarm_when)
    probe = make(**{cls.threshold_param: threshold})
    recorded = {k: v for k, v in probe.params().items()
                if k not in (cls.model_param, *cls.data_params, cls.threshold_param)}
    alarms = sum(probe._more_suspicious(w, threshold) for w in tested)
    record = {
        "detector": name, "threshold_param": cls.threshold_param, "threshold": threshold,
        "alarm_when": cls.alarm_when, "params": recorded, "target_far": target_far,
        "streams": streams, "length": length, "benign": pool.name, "seed": seed,
        "in_sample_false_alarms": alarms, "worst_scores": worst,
        **({"reference_size": reference_size, "bandwidth": data["bandwidth"],
            "features": str(detectors_dir(victim_dir, store) / FEATURES)} if data else {}),
        "seconds": time.perf_counter() - start, "created": time.time(),
    }
    write_json(calibration_path(victim_dir, name, store), record)
    return record


__all__ = ["CalibrateRequest", "calibrate_detector", "calibrate_loaded"]
