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

    >>> calibrate_detector("runs/qat", "mmd", target_far=0.05)       # once per victim and detector
    >>> record = detect_attack("runs/qat", "prada", "jbda", budget=5000, transfer="holdout")
    >>> record["detectors"]["prada"]["first_alarm"], record["detectors"]["prada"]["false_alarm_rate"]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divqat.attacks import SurrogateTraining, create_attack
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.boundary import QueryBoundary
from divqat.checks import check_int, check_number
from divqat.data import dataset_spec, load_dataset, to_float, to_victim_input, training_split
from divqat.detectors import (
    DETECTORS,
    Detector,
    Monitor,
    calibrated_threshold,
    check_detector,
    describe_detectors,
)
from divqat.errors import ArtifactError, ConfigError
from divqat.io import atomic_write, write_json
from divqat.pipelines.attack import load_transfer_set
from divqat.pipelines.defense_models import build_defense
from divqat.train.losses import frozen_forward
from divqat.victim import load_fp32_net, load_victim, victim_metadata

DETECTORS_DIR = "detectors"
FEATURES = "features.pt"
# Images per victim call and per observed batch of a benign stream (a client's request size).
BATCH = 256


# ---------------------------------------------------------------------- the defender's features

class _Penultimate(nn.Module):
    """The fp32 victim net's normalization and layers up to its last one, as one module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.net.features(self.net.normalize(x))


class FeatureExtractor:
    """The defender's fp32 model up to its last layer: images float32 (N, C, H, W) in [0, 1] ->
    features (N, F), computed without gradients in chunks. Inference only: its BatchNorms are
    folded into the convolutions before them (``frozen_forward``), and it runs channels_last
    (1.4-1.7x for these convolutions on this CPU, environment notes): a watched query pays
    for this forward pass and nearly nothing else (README, "Per-query cost")."""

    def __init__(self, net: nn.Module) -> None:
        if not hasattr(getattr(net, "net", None), "features"):
            raise ArtifactError(f"the fp32 model {type(getattr(net, 'net', net)).__name__} has no "
                                "features() to take its penultimate layer from")
        self.net = frozen_forward(_Penultimate(net.eval())).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        return torch.cat([self.net(images[i:i + 1024].contiguous(memory_format=torch.channels_last))
                          for i in range(0, len(images), 1024)]) if len(images) else torch.empty(0, 0)


def _teacher_dir(victim_dir: Path, meta: dict) -> Path:
    if meta.get("mode") == "fp32":
        return victim_dir
    teacher = meta.get("teacher")
    if not teacher:
        raise ArtifactError(f"{victim_dir} records no fp32 teacher; the feature detectors need the "
                            "defender's fp32 model")
    return Path(teacher)


def detectors_dir(victim_dir: str | Path, store: str | Path | None = None) -> Path:
    """Where a victim's detector files are: ``store`` when given (an experiment keeps each
    calibration in its own stage folder), else ``VICTIM/detectors/``."""
    return Path(store) if store is not None else Path(victim_dir) / DETECTORS_DIR


def save_features(victim_dir: str | Path, store: str | Path | None = None) -> FeatureExtractor:
    """Copy the defender's fp32 model (the victim's teacher) into ``VICTIM/detectors/`` so the
    victim directory carries everything its detectors need."""
    victim_dir = Path(victim_dir)
    meta = victim_metadata(victim_dir)
    net, teacher_meta = load_fp32_net(_teacher_dir(victim_dir, meta))
    payload = {"state_dict": net.state_dict(),
               "meta": {k: teacher_meta[k] for k in ("arch", "input_shape", "classes", "mean", "std")},
               "teacher": str(_teacher_dir(victim_dir, meta))}
    atomic_write(detectors_dir(victim_dir, store) / FEATURES, lambda tmp: torch.save(payload, tmp))
    return FeatureExtractor(net)


def load_features(victim_dir: str | Path, store: str | Path | None = None) -> FeatureExtractor:
    from divqat.models import build_net

    path = detectors_dir(victim_dir, store) / FEATURES
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run `divqat calibrate --victim {victim_dir} "
                            "--detector mmd` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = build_net(payload["meta"])
    net.load_state_dict(payload["state_dict"])
    return FeatureExtractor(net)


# ---------------------------------------------------------------------- building a detector

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
                     store: str | Path | None = None, log: Callable[[str], None] | None = None
                     ) -> tuple[Callable[[], Detector], dict[str, Any]]:
    """A function that builds fresh detectors ``name`` for the victim (one per client; they
    share the features model and the reference), and the settings they run with.

    The settings are the calibration's (threshold and the parameters it was calibrated for,
    ``VICTIM/detectors/NAME.json``) overridden by ``params``; without a calibration, the
    detector's defaults. ``calibrated=False`` ignores a saved calibration. ``store``: where the
    calibration is kept (default ``VICTIM/detectors/``)."""
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


# ---------------------------------------------------------------------- benign streams

class _Pool:
    """Benign images with the victim's answers (and, for feature detectors, their features),
    computed once; streams are orders of indices into it."""

    def __init__(self, name: str, images: Tensor, served: DefendedVictim,
                 features: FeatureExtractor | None) -> None:
        self.name, self.images = name, images
        answers = []
        for i in range(0, len(images), BATCH):
            answers.append(served(to_float(images[i:i + BATCH])).defended)
        self.answers = torch.cat(answers)
        self.features = None
        if features is not None:
            self.features = torch.cat([features(to_float(images[i:i + 1024]))
                                       for i in range(0, len(images), 1024)])


class _Lookup:
    """A feature function that returns the pool's precomputed features of the batch being fed
    (benign streams draw from a pool whose features are computed once)."""

    def __init__(self, features: Tensor) -> None:
        self.features, self.index = features, None

    def __call__(self, images: Tensor) -> Tensor:
        return self.features[self.index]


def run_stream(make: Callable[..., Detector], pool: _Pool, order: Tensor, uses_features: bool,
               model_param: str | None) -> Detector:
    """A fresh detector fed the pool's images in ``order``, in requests of ``BATCH``."""
    lookup = _Lookup(pool.features) if uses_features else None
    detector = make(**({model_param: lookup} if lookup is not None else {}))
    for start in range(0, len(order), BATCH):
        index = order[start:start + BATCH]
        if lookup is not None:
            lookup.index = index
        detector.observe(to_float(pool.images[index]), pool.answers[index])
    return detector


def _stream_orders(n_pool: int, streams: int, length: int, seed: int) -> list[Tensor]:
    """``streams`` independent clients, each sending ``length`` distinct images of the pool in
    a random order of its own."""
    return [torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed * 1_000_003 + s))[:length]
            for s in range(streams)]


def _creator(name: str, data_and_settings: dict[str, Any]) -> Callable[..., Detector]:
    def make(**override: Any) -> Detector:
        return DETECTORS.create(name, **{**data_and_settings, **override})
    return make


def _benign_pools(meta: dict, data_root, served: DefendedVictim, features, which: Sequence[str]
                  ) -> list[_Pool]:
    holdout = int(meta.get("holdout") or 0)
    shape = tuple(meta["input_shape"])
    pools = []
    for source in which:
        if source == "train":
            data = training_split(load_dataset(meta["dataset"], "train", data_root), holdout)[0]
            name = f"{dataset_spec(meta['dataset']).name}:train[:{len(data)}]"
        elif source == "holdout":
            if holdout <= 0:
                continue
            data = training_split(load_dataset(meta["dataset"], "train", data_root), holdout)[1]
            name = f"{dataset_spec(meta['dataset']).name}:train[-{holdout}:]"
        else:
            data = load_dataset(meta["dataset"], "test", data_root)
            name = f"{dataset_spec(meta['dataset']).name}:test"
        images = (to_victim_input(data.images, shape) * 255).round().to(torch.uint8)
        pools.append(_Pool(name, images, served, features))
    return pools


# ---------------------------------------------------------------------- calibration

def calibrate_detector(victim_dir: str | Path, name: str, params: dict[str, Any] | None = None, *,
                       target_far: float = 0.05, streams: int = 40, length: int = 5000,
                       reference_size: int = 1000, seed: int = 0,
                       data_root: str | Path | None = None, store: str | Path | None = None,
                       victim: Callable[[Tensor], Tensor] | None = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Calibrate detector ``name`` on the victim for a target false-alarm rate and keep it with
    the victim (``VICTIM/detectors/``, or ``store``).

    Benign streams: ``streams`` clients, each sending ``length`` of the images the victim was
    trained on in a random order of its own (undefended answers). The threshold is set so that
    at most ``floor(target_far * streams)`` of them raise the alarm within ``length`` queries.
    For mmd, first the defender's fp32 model is copied next to the victim and the features of
    ``reference_size`` other training images become the benign reference (bandwidth by the
    median heuristic). Returns what was written to ``VICTIM/detectors/NAME.json``."""
    say = log or (lambda _m: None)
    victim_dir = Path(victim_dir)
    meta = victim_metadata(victim_dir)
    params = dict(params or {})
    cls = check_detector(name, params)
    target_far = check_number("calibrate", "target_far", target_far, low=0.0, high=0.5)
    streams = check_int("calibrate", "streams", streams, low=1)
    length = check_int("calibrate", "length", length, low=1)
    reference_size = check_int("calibrate", "reference_size", reference_size, low=2)
    start = time.perf_counter()
    # ``victim``: the victim already loaded (an experiment's stage worker keeps it compiled).
    served = DefendedVictim(victim if victim is not None else load_victim(victim_dir))
    features = save_features(victim_dir, store) if cls.model_param == "features" else None
    pool = _benign_pools(meta, data_root, served, features, ["train"])[0]
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
        stream_pool = _Pool.__new__(_Pool)
        stream_pool.name, stream_pool.images = pool.name, pool.images[rest]
        stream_pool.answers, stream_pool.features = pool.answers[rest], pool.features[rest]
    if len(stream_pool.images) < length:
        raise ConfigError(f"{pool.name} has {len(stream_pool.images)} images for streams of {length}")
    settings = {k: v for k, v in params.items() if k != cls.threshold_param}
    make = _creator(name, {**({cls.model_param: None} if cls.model_param else {}), **data, **settings})
    say(f"calibrating {name} on {streams} benign streams of {length} queries ({pool.name})")
    worst = []
    for i, stream in enumerate(_stream_orders(len(stream_pool.images), streams, length, seed)):
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


# ---------------------------------------------------------------------- an attack, watched

class _StreamDone(Exception):
    """Raised once the thief has spent its budget: the stream is complete, and what the attack
    would do next (train its last surrogate) does not change what the detector saw."""


class _UntilBudget(QueryBoundary):
    """The thief's box, which ends the attack once the budget is spent."""

    __slots__ = ("_box",)

    def __init__(self, box: BlackBox) -> None:
        self._box = box

    def _after(self, answer: Tensor) -> Tensor:
        if self._box.queries_left == 0:
            raise _StreamDone
        return answer

    def query(self, images: Tensor) -> Tensor:
        return self._after(self._box.query(images))

    def query_labels(self, images: Tensor) -> Tensor:
        return self._after(self._box.query_labels(images))

    queries_used = property(lambda self: self._box.queries_used)
    budget = property(lambda self: self._box.budget)
    input_shape = property(lambda self: self._box.input_shape)
    num_classes = property(lambda self: self._box.num_classes)
    label_only = property(lambda self: self._box.label_only)


def false_alarm_rate(victim_dir: str | Path, make: Callable[..., Detector], cls: type[Detector],
                     served: DefendedVictim, meta: dict, *, streams: int, length: int, seed: int,
                     data_root=None, features: FeatureExtractor | None = None) -> dict[str, Any]:
    """The share of ``streams`` benign clients (half on the test split, half on the holdout, each
    its own random order of ``length`` distinct images) whose stream raised the alarm."""
    pools = [p for p in _benign_pools(meta, data_root, served, features, ["test", "holdout"])
             if len(p.images) >= length]
    if not pools:
        raise ConfigError(f"no benign set holds {length} images for the false-alarm streams")
    rows = []
    for i in range(streams):
        pool = pools[i % len(pools)]
        order = _stream_orders(len(pool.images), 1, length, seed * 7919 + i)[0]
        detector = run_stream(make, pool, order, features is not None, cls.model_param)
        v = detector.verdict()
        rows.append({"set": pool.name, "first_alarm": v.first_alarm, "worst": v.worst})
    alarms = sum(r["first_alarm"] is not None for r in rows)
    return {"false_alarm_rate": alarms / len(rows), "false_alarms": alarms, "benign_streams": len(rows),
            "benign_length": length, "benign_sets": sorted({r["set"] for r in rows}), "streams": rows}


class _Tee(Detector):
    """Several detectors watching one stream (one attack run measures them all); its own
    verdict is never used."""

    name = "tee"

    def __init__(self, detectors: Sequence[Detector]) -> None:
        super().__init__()
        self.detectors = list(detectors)
        self.threshold = None

    def _observe(self, images: Tensor, labels: Tensor, answers: Tensor) -> list[tuple[int, float]]:
        for detector in self.detectors:
            detector.observe(images, answers)
        return []

    def _reset(self) -> None:
        for detector in getattr(self, "detectors", []):
            detector.reset()

    def _state(self) -> dict[str, Any]:
        return {"detectors": [d.state_dict() for d in self.detectors]}

    def _load_state(self, state: dict[str, Any]) -> None:
        for detector, saved in zip(self.detectors, state["detectors"], strict=True):
            detector.load_state_dict(saved)

    def params(self) -> dict[str, Any]:
        return {"detectors": [d.name for d in self.detectors]}


def watching(factories: dict[str, Callable[[], Detector]]) -> tuple[Monitor, dict[str, Detector]]:
    """A monitor that only records (``flag``) and the fresh detectors it feeds, by name: several
    detectors watching one thief's stream without changing any answer."""
    detectors = {name: make() for name, make in factories.items()}
    return Monitor(_Tee(list(detectors.values())), on_alarm="flag"), detectors


def alarm_record(detector: Detector) -> dict[str, Any]:
    """What a watched stream ended with: ``detected``, ``first_alarm`` (queries until the alarm,
    None if not raised), the last and most suspicious scores, and how many tests ran."""
    v = detector.verdict()
    return {"detected": v.first_alarm is not None, "first_alarm": v.first_alarm,
            "final_score": v.score, "worst_score": v.worst, "tests": v.tests}


def detect_attack(victim_dir: str | Path, detectors: str | dict[str, dict[str, Any] | None],
                  attack: str, attack_params: dict[str, Any] | None = None, *, budget: int,
                  transfer: str | None = None, benign: str = "holdout",
                  defense: str = "none", defense_params: dict[str, Any] | None = None,
                  training: SurrogateTraining | None = None, labels_only: bool = False,
                  benign_streams: int = 20, seed: int = 0, data_root: str | Path | None = None,
                  device: str = "cpu", progress: bool = False,
                  log: Callable[[str], None] | None = None,
                  out: str | Path | None = None) -> dict[str, Any]:
    """Run an attack through a monitored black box and measure the detector(s).

    ``detectors``: a name, or ``{name: params}`` for several, all watching the same stream.
    The thief runs as ``divqat attack`` runs it (``training`` is its surrogate recipe; the
    stream of a data-free or Jacobian thief depends on it), behind ``defense``, until it has
    spent ``budget`` queries (its last surrogate is not trained: it would not change the
    stream). Per detector, ``first_alarm`` is the number of queries after which it first raised
    the alarm (None: not raised within ``budget``). A knockoff thief with ``mix`` > 0 (an attack
    parameter) mixes images of ``benign`` (default: the victim's holdout) into its stream. Then,
    over ``benign_streams`` honest clients of the same length (test split and holdout, in turn),
    each detector's false-alarm rate (0 streams: skipped).
    """
    say = log or (lambda _m: None)
    victim_dir = Path(victim_dir)
    meta = victim_metadata(victim_dir)
    budget = check_int("detect", "budget", budget, low=1)
    benign_streams = check_int("detect", "benign_streams", benign_streams, low=0)
    if isinstance(detectors, str):
        detectors = {detectors: None}
    if not detectors:
        raise ConfigError("name at least one detector")
    training = training if training is not None else SurrogateTraining(seed=seed, device=device,
                                                                       progress=progress)
    thief = create_attack(attack, **dict(attack_params or {}))
    built = {name: detector_factory(name, params, victim_dir, log=say)
             for name, params in detectors.items()}
    transfer_set = benign_set = None
    if thief.uses_transfer_set:
        if transfer is None:
            raise ConfigError(f"attack {attack!r} needs a transfer set: --transfer holdout or NAME[:SPLIT]")
        transfer_set = load_transfer_set(transfer, meta, data_root)
    if getattr(thief, "mix", 0) > 0:
        benign_set = load_transfer_set(benign, meta, data_root)
    built_defense = build_defense(defense, defense_params, victim_dir, seed=training.seed,
                                  data_root=data_root, device=device, progress=progress, log=log)
    served = DefendedVictim(load_victim(victim_dir, device=device), built_defense)
    monitor, watched = watching({name: make for name, (make, _) in built.items()})
    box = BlackBox(served, budget=budget, label_only=labels_only, monitor=monitor)
    say(f"{attack} against the {meta.get('mode')} victim behind {defense}, watched by "
        f"{', '.join(watched)}, budget {budget}"
        + (f", transfer set {transfer_set.name}" if transfer_set else ""))
    start = time.perf_counter()
    torch.manual_seed(training.seed)
    try:
        thief.steal(_UntilBudget(box), [budget], training, transfer=transfer_set,
                    **({"benign": benign_set} if benign_set is not None else {}))
    except _StreamDone:
        pass
    seconds = time.perf_counter() - start
    mix = getattr(thief, "mix", 0.0)
    record: dict[str, Any] = {
        "attack": attack, "attack_params": thief.params(), "labels_only": labels_only,
        "transfer_set": None if transfer_set is None else transfer_set.name,
        "benign_set": None if benign_set is None else benign_set.name,
        "defense": defense, "defense_params": built_defense.params(),
        "victim": str(victim_dir), "victim_mode": meta.get("mode"), "victim_dataset": meta.get("dataset"),
        "seed": training.seed, "budget": budget, "queries_used": box.queries_used,
        "attack_seconds": seconds, "detectors": {},
    }
    if mix:
        record["mix"] = mix
    for name, detector in watched.items():
        make, settings = built[name]
        row: dict[str, Any] = {
            "settings": settings["params"], "calibrated": settings["calibrated"],
            "calibration": settings["calibration"], **alarm_record(detector),
        }
        if mix:  # what the evasive thief got from its own transfer set before the alarm
            row["transfer_queries_before_alarm"] = (None if row["first_alarm"] is None
                                                    else math.floor((1 - mix) * row["first_alarm"]))
        if benign_streams:
            cls = DETECTORS.get(name)
            features = load_features(victim_dir) if cls.model_param == "features" else None
            say(f"{name}: false alarms over {benign_streams} benign streams of {budget} queries")
            row.update(false_alarm_rate(victim_dir, make, cls, served, meta, streams=benign_streams,
                                        length=budget, seed=seed, data_root=data_root,
                                        features=features))
        record["detectors"][name] = row
    if out is not None:
        write_json(Path(out) / "metrics.json", record)
    return record


__all__ = ["FeatureExtractor", "alarm_record", "build_detector", "calibrate_detector", "calibration_path",
           "detect_attack", "detector_factory", "detectors_dir", "false_alarm_rate", "list_detectors",
           "load_calibration", "load_features", "save_features", "watching"]
