"""Extraction detectors: stateful watchers of one client's query stream, one file per detector,
each registered by its CLI name.

    >>> from divqat.detectors import Monitor, create_detector
    >>> prada = create_detector("prada", delta=0.9)
    >>> verdict = prada.observe(images, posteriors)     # score, alarm, first_alarm, ...
    >>> state = prada.state_dict(); prada.reset(); prada.load_state_dict(state)

A ``Monitor`` (a detector plus what to do on alarm: flag, block, labels-only) goes into the black
box (``BlackBox(..., monitor=...)``) and the service (``divqat serve --detector``). ``ServiceWide``
is the defender's view over several keys: each key's stream alone and their union, side by side
(the counter to a Sybil thief). Detectors
built from a victim (the mmd detector's features and reference, calibrated thresholds) are
built by the driver ``divqat.pipelines.detect``. This package is methods only: it imports no
black box, attack or command line (checked by ``lint-imports``).
"""

# Importing each detector module registers it (the timm pattern).
from divqat.detectors.base import (
    DETECTORS,
    PENDING_MODEL,
    Detector,
    Verdict,
    calibrated_threshold,
    check_detector,
    create_detector,
    describe_detectors,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
)
from divqat.detectors.mmd import MMD
from divqat.detectors.monitor import ON_ALARM, Monitor
from divqat.detectors.prada import PRADA
from divqat.detectors.service_wide import ServiceWide, groups_by_creation

__all__ = [
    "DETECTORS",
    "MMD",
    "ON_ALARM",
    "PENDING_MODEL",
    "PRADA",
    "ServiceWide",
    "Detector",
    "Monitor",
    "Verdict",
    "calibrated_threshold",
    "check_detector",
    "create_detector",
    "describe_detectors",
    "groups_by_creation",
    "state_from_bytes",
    "state_nbytes",
    "state_to_bytes",
]
