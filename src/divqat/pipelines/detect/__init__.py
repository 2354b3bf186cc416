"""Extraction detectors on a saved victim: build them, calibrate them, and measure them against
the thieves (``divqat calibrate``, ``divqat detect``, and the detector of ``divqat serve``).

What a detector needs from the victim is kept with it, in ``VICTIM/detectors/``:

- ``features.pt``: the defender's own fp32 model (the victim's teacher, or the victim itself if
  it is fp32), for detectors that work in its feature space (mmd);
- ``<name>.pt``: the detector's benign reference data (mmd: features of benign images and the
  kernel bandwidth);
- ``<name>.json``: the calibration: the threshold for a target false-alarm rate on benign
  streams, the settings it holds for, and the benign streams' scores it came from.

Benign streams are the honest clients of the defender's world: in-distribution images sent in
random order. Calibration uses the images the victim was trained on (what a defender holds);
``detect`` measures the false-alarm rate on images the calibration never saw: the victim's test
split and its unseen holdout, each stream drawn by an independent client.

    >>> calibrate_detector(CalibrateRequest("runs/qat", "mmd", target_far=0.05))  # once per victim
    >>> record = detect_attack(DetectRequest("runs/qat", "prada", "jbda", 5000, transfer="holdout"))
    >>> record["detectors"]["prada"]["first_alarm"], record["detectors"]["prada"]["false_alarm_rate"]

The package, one module per concern:

- ``features``: the defender's fp32 model as the feature detectors' feature space;
- ``factory``: a detector built from what is kept with the victim, and ``divqat detectors``;
- ``honest``: benign streams, and the false-alarm rate over them;
- ``calibration``: ``calibrate_detector`` (``divqat calibrate``);
- ``watch``: several detectors on one thief's stream (or on each key of a Sybil thief, with the
  service-wide view over their union);
- ``run``: ``detect_attack`` (``divqat detect``).
"""

from divqat.pipelines.detect.calibration import (
    CalibrateRequest,
    calibrate_detector,
    calibrate_loaded,
)
from divqat.pipelines.detect.factory import (
    build_detector,
    calibration_path,
    detector_factory,
    list_detectors,
    load_calibration,
)
from divqat.pipelines.detect.features import (
    DETECTORS_DIR,
    FEATURES,
    FeatureExtractor,
    detectors_dir,
    load_features,
    save_features,
)
from divqat.pipelines.detect.honest import false_alarm_rate
from divqat.pipelines.detect.run import DetectRequest, detect_attack
from divqat.pipelines.detect.watch import alarm_record, keys_alarm_record, watching, watching_keys

__all__ = ["DETECTORS_DIR", "FEATURES", "CalibrateRequest", "DetectRequest", "FeatureExtractor",
           "alarm_record", "keys_alarm_record", "build_detector", "calibrate_detector", "calibrate_loaded",
           "calibration_path", "detect_attack", "detector_factory", "detectors_dir",
           "false_alarm_rate", "list_detectors", "load_calibration", "load_features", "save_features",
           "watching", "watching_keys"]
