"""Benign streams: the honest clients of the defender's world, who send in-distribution images
in random orders of their own. Calibration sets a threshold on them; ``false_alarm_rate``
counts how many of them a calibrated detector flags."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divqat.blackbox import DefendedVictim
from divqat.data import dataset_spec, load_dataset, to_float, to_victim_input, training_split
from divqat.detectors import DETECTORS, Detector
from divqat.errors import ConfigError
from divqat.pipelines.detect.features import FeatureExtractor

# Images per victim call and per observed batch of a benign stream (a client's request size).
BATCH = 256


class BenignPool:
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

    def subset(self, index: Tensor) -> BenignPool:
        """The pool's images at ``index`` with their answers and features, nothing recomputed."""
        out = BenignPool.__new__(BenignPool)
        out.name, out.images, out.answers = self.name, self.images[index], self.answers[index]
        out.features = None if self.features is None else self.features[index]
        return out


class _Lookup:
    """A feature function that returns the pool's precomputed features of the batch being fed
    (benign streams draw from a pool whose features are computed once)."""

    def __init__(self, features: Tensor) -> None:
        self.features, self.index = features, None

    def __call__(self, images: Tensor) -> Tensor:
        return self.features[self.index]


def run_stream(make: Callable[..., Detector], pool: BenignPool, order: Tensor, uses_features: bool,
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


def stream_orders(n_pool: int, streams: int, length: int, seed: int) -> list[Tensor]:
    """``streams`` independent clients, each sending ``length`` distinct images of the pool in
    a random order of its own."""
    return [torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed * 1_000_003 + s))[:length]
            for s in range(streams)]


def detector_creator(name: str, data_and_settings: dict[str, Any]) -> Callable[..., Detector]:
    """Fresh detectors ``name`` with these data and settings; keywords override them."""
    def make(**override: Any) -> Detector:
        return DETECTORS.create(name, **{**data_and_settings, **override})
    return make


def benign_pools(meta: dict, data_root: str | Path | None, served: DefendedVictim,
                 features: FeatureExtractor | None, which: Sequence[str]) -> list[BenignPool]:
    """One pool per source in ``which``: "train" (the images the victim was trained on),
    "holdout" (its unseen holdout; none without one) or "test" (its test split), as uint8 at
    the victim's input shape."""
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
        pools.append(BenignPool(name, images, served, features))
    return pools



def false_alarm_rate(victim_dir: str | Path, make: Callable[..., Detector], cls: type[Detector],
                     served: DefendedVictim, meta: dict, *, streams: int, length: int, seed: int,
                     data_root=None, features: FeatureExtractor | None = None) -> dict[str, Any]:
    """The share of ``streams`` benign clients (half on the test split, half on the holdout, each
    its own random order of ``length`` distinct images) whose stream raised the alarm."""
    pools = [p for p in benign_pools(meta, data_root, served, features, ["test", "holdout"])
             if len(p.images) >= length]
    if not pools:
        raise ConfigError(f"no benign set holds {length} images for the false-alarm streams")
    rows = []
    for i in range(streams):
        pool = pools[i % len(pools)]
        order = stream_orders(len(pool.images), 1, length, seed * 7919 + i)[0]
        detector = run_stream(make, pool, order, features is not None, cls.model_param)
        v = detector.verdict()
        rows.append({"set": pool.name, "first_alarm": v.first_alarm, "worst": v.worst})
    alarms = sum(r["first_alarm"] is not None for r in rows)
    return {"false_alarm_rate": alarms / len(rows), "false_alarms": alarms, "benign_streams": len(rows),
            "benign_length": length, "benign_sets": sorted({r["set"] for r in rows}), "streams": rows}



__all__ = ["BATCH", "BenignPool", "benign_pools", "detector_creator", "false_alarm_rate", "run_stream",
           "stream_orders"]
