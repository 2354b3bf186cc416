"""What a defense costs the defender and changes for the attacker, measured on a saved victim.

``evaluate_defense`` runs a victim behind a defense (``DefendedVictim``) over the victim's test
split and over a query set, and reports:

- ``defender_accuracy``: accuracy of the argmax of the defended posteriors on the test split
  (``victim_accuracy``: the same for the clean posteriors);
- ``l1_distance``: mean over the queries of ``sum_k |y'_k - y_k|`` (y clean, y' defended);
- ``kl_divergence``: mean over the queries of ``KL(y || y') = sum_k y_k log(y_k / max(y'_k, 1e-12))``;
- ``argmax_changed``: fraction of the queries whose defended argmax differs from the clean one;
- ``ms_per_query_clean`` / ``ms_per_query_defended``: milliseconds per image of the victim alone,
  and of the whole served query (input check, victim, softmax, defense), over the query set.
  Their ratio compares two timings taken back to back; timings of different calls (another
  victim, another moment, another load on the machine) do not compare: ``time_side_by_side``
  serves several victims and defenses in turns in one measurement for that.

``defend_victim`` is the whole ``divqat defend`` command: load the victim, build the defense,
load the sets, evaluate, write ``OUT/metrics.json``::

    >>> metrics = defend_victim(DefendRequest("runs/qat", "dcp", {"beta": 0.5}, queries="mnist:test",
    ...                                       out="runs/dcp"), RunContext(data_root="data"))
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divqat.blackbox import DefendedBatch, DefendedVictim
from divqat.checks import check_int
from divqat.data import ImageDataset, dataset_spec, load_dataset, to_float, to_victim_input
from divqat.defenses.base import Defense
from divqat.errors import ConfigError
from divqat.io import write_json
from divqat.pipelines.context import RunContext
from divqat.pipelines.defense_models import build_defense, misinformation_model_dir
from divqat.stopwatch import phase, timed
from divqat.victim import load_victim, victim_metadata

# Defended posteriors can hold exact zeros (top-k, rounding, MAD's vertices) where the clean one
# does not, which makes KL(clean || defended) infinite. Clamping y' at 1e-12 caps each such class's
# term at y_k * log(y_k / 1e-12) <= 27.6 nats: large, finite, and comparable between defenses.
KL_CLAMP = 1e-12


def posterior_distances(clean: Tensor, defended: Tensor) -> dict[str, Tensor]:
    """Per-query ``l1``, ``kl`` = KL(clean || defended) with defended clamped at ``KL_CLAMP``,
    and ``argmax_changed`` (bool), each (N,), for posteriors (N, K); computed in float64."""
    y, d = clean.double(), defended.double()
    # KL >= 0; a defense that leaves y alone up to float rounding would otherwise show -0.0000.
    kl = (torch.xlogy(y, y) - torch.xlogy(y, d.clamp_min(KL_CLAMP))).sum(dim=1).clamp_min(0.0)
    return {"l1": (d - y).abs().sum(dim=1), "kl": kl,
            "argmax_changed": d.argmax(dim=1) != y.argmax(dim=1)}


def _warm_up(victim: Callable[[Tensor], Tensor], served: DefendedVictim, images: Tensor,
             batch_size: int) -> None:
    """One untimed call of the victim alone and of the served path at the batch size the timed
    pass will use (``_batches``: one): an int8 victim, and a defense fused into it, compile on
    the first call of each size (seconds), and a model-backed defense has first-call costs."""
    batch = images[:min(images.shape[0], batch_size)]
    with torch.no_grad():
        victim(batch)
        served(batch)


def _batches(n: int, batch_size: int):
    """(low, start, stop) per batch of ``n`` images: the batch is ``[low:stop]`` and its new
    images are ``[start:stop]``. A short last batch is topped up with the images before it, so
    that every batch has one size: a compiled victim (and a defense fused into it) compiles
    once per batch size, for seconds, in every process that serves it."""
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield max(0, stop - batch_size), start, stop


def _new_rows(batch: DefendedBatch, clean_s: float, served_s: float, keep: int):
    """The last ``keep`` rows of a topped-up batch, with its times scaled to them."""
    n = batch.clean.shape[0]
    if keep == n:
        return batch, clean_s, served_s
    share = keep / n
    return (dataclasses.replace(batch, logits=batch.logits[-keep:], clean=batch.clean[-keep:],
                                defended=batch.defended[-keep:],
                                victim_seconds=batch.victim_seconds * share,
                                defense_seconds=batch.defense_seconds * share),
            clean_s * share, served_s * share)


@dataclass(frozen=True)
class DefenseEvaluation:
    """``evaluate_served``'s answer: the metrics of ``evaluate_defense`` and the argmax labels
    (N,) of the clean and the defended victim on the test split (what an attack's surrogates
    are compared with)."""

    metrics: dict[str, Any]
    clean_labels: Tensor
    defended_labels: Tensor


def evaluate_defense(victim: Callable[[Tensor], Tensor], defense: Defense,
                     test_set: ImageDataset, query_images: Tensor | None = None,
                     batch_size: int = 256, served: DefendedVictim | None = None) -> dict[str, Any]:
    """Defender accuracy, posterior distances and latency of ``victim`` behind ``defense``.

    Arguments:
        victim (callable): images float32 (N, C, H, W) in [0, 1] -> logits (N, K), with
            ``input_shape`` and ``num_classes`` (a loaded ``Victim``).
        defense (Defense): the output perturbation.
        test_set (ImageDataset): the victim's test split (labels give the accuracies); its
            images are adapted to the victim's input with ``divqat.data.adapt``.
        query_images (Tensor, optional): the query set, uint8 or float in [0, 1], (N, C, H, W)
            at the victim's input shape. (Default: None, the test images themselves, measured in
            the same pass.)
        batch_size (int): images per query. (Default: 256.)

    Returns a dict: ``defense``, ``params``, ``defender_accuracy``, ``victim_accuracy``,
    ``test_images``, ``l1_distance``, ``kl_divergence`` (KL(clean || defended), nats, defended
    clamped at ``KL_CLAMP``), ``argmax_changed`` (fraction), ``queries``,
    ``ms_per_query_clean`` (the victim alone, per image), ``ms_per_query_defended`` (the served
    query: input check, victim, softmax and defense, fused into an int8 victim's program where
    the defense allows it; per image) and ``latency_ratio`` (defended / clean). Timings are over
    the query set, each batch timed through the victim alone and then served, after one untimed
    warm-up call per batch size.

    ``served``: the ``DefendedVictim(victim, defense)`` to use, when the caller keeps one (its
    fused program compiles on first use; a new one would compile again).
    """
    return evaluate_served(victim, defense, test_set, query_images, batch_size, served).metrics


@timed("evaluate")
def evaluate_served(victim: Callable[[Tensor], Tensor], defense: Defense, test_set: ImageDataset,
                    query_images: Tensor | None = None, batch_size: int = 256,
                    served: DefendedVictim | None = None) -> DefenseEvaluation:
    """``evaluate_defense`` that also returns the test split's clean and defended labels, so an
    attack does not serve the test split a second time."""
    check_int("", "batch size", batch_size, low=1)
    if served is None:
        served = DefendedVictim(victim, defense)
    elif served.defense is not defense:
        raise ConfigError("served must be the victim behind this defense")
    shape, k = served.input_shape, served.num_classes
    if len(test_set) == 0:
        raise ConfigError("the test set is empty")
    if test_set.num_classes != k:
        raise ConfigError(f"the test set {test_set.name} has {test_set.num_classes} classes, the "
                          f"victim {k}")
    if query_images is not None:
        query_images = torch.as_tensor(query_images)
        if query_images.dtype == torch.uint8:
            query_images = to_float(query_images)
        if len(query_images) == 0:
            raise ConfigError("the query set is empty")

    test_images = to_victim_input(test_set.images, shape)
    labels = torch.as_tensor(test_set.labels)
    timed = query_images is None  # the test pass is the query pass
    if timed:
        _warm_up(victim, served, test_images, batch_size)
    defended_hits = clean_hits = 0
    stats = _Accumulator()
    clean_labels, defended_labels = [], []
    for low, start, stop in _batches(len(test_images), batch_size):
        images = test_images[low:stop]
        batch, clean_s, served_s = _timed(victim, served, images) if timed else (served(images), 0.0, 0.0)
        batch, clean_s, served_s = _new_rows(batch, clean_s, served_s, stop - start)
        y = labels[start:stop]
        clean_labels.append(batch.clean.argmax(dim=1))
        defended_labels.append(batch.defended.argmax(dim=1))
        defended_hits += int((defended_labels[-1] == y).sum())
        clean_hits += int((clean_labels[-1] == y).sum())
        if timed:
            stats.add(batch, clean_s, served_s)
    if not timed:
        _warm_up(victim, served, query_images, batch_size)
        for low, start, stop in _batches(len(query_images), batch_size):
            timed_batch = _timed(victim, served, query_images[low:stop])
            stats.add(*_new_rows(*timed_batch, stop - start))

    n = len(test_set)
    metrics = {"defense": defense.name, "params": defense.params(),
               "defender_accuracy": defended_hits / n, "victim_accuracy": clean_hits / n,
               "test_images": n, **stats.summary()}
    return DefenseEvaluation(metrics, torch.cat(clean_labels), torch.cat(defended_labels))


def _timed(victim: Callable[[Tensor], Tensor], served: DefendedVictim, images: Tensor):
    """One batch through the victim alone and then served: (DefendedBatch, seconds alone,
    seconds served). The two calls run back to back, so load on the machine hits both alike."""
    with torch.no_grad():
        start = time.perf_counter()
        victim(images)
        middle = time.perf_counter()
        batch = served(images)
        return batch, middle - start, time.perf_counter() - middle


def time_side_by_side(served: dict[Any, DefendedVictim], images: Tensor, *,
                      batch_size: int = 256, rounds: int = 10, seed: int = 0) -> dict[Any, dict[str, float]]:
    """Latency of several victims behind several defenses, measured in turns in one process, so
    that what the machine does meanwhile (other jobs, other stages) falls on all of them alike.

    ``served`` maps a name to a ``DefendedVictim``; ``images`` (float32 in [0, 1], at least one
    batch) are cut into batches of ``batch_size`` (the remainder is dropped: one batch size, one
    compiled program each). After one untimed call per served victim (compilation), each of
    ``rounds`` rounds visits every entry in a fresh random order (``seed``) and times each batch
    through the victim alone and then served, back to back. Returns per name the median over the
    rounds of ``ms_per_query_clean``, ``ms_per_query_defended`` and ``latency_ratio``, with
    ``rounds`` and ``batches``.
    """
    check_int("", "batch size", batch_size, low=1)
    check_int("", "rounds", rounds, low=1)
    n = len(images) // batch_size * batch_size
    if n == 0:
        raise ConfigError(f"time_side_by_side needs at least {batch_size} images, got {len(images)}")
    batches = [images[start:start + batch_size] for start in range(0, n, batch_size)]
    with torch.no_grad():
        for box in served.values():  # compile outside the timed rounds
            box.victim(batches[0])
            box(batches[0])
    per_round: dict[Any, list[tuple[float, float]]] = {name: [] for name in served}
    order = list(served)
    rng = random.Random(seed)
    with phase("timing"):
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                box = served[name]
                clean = defended = 0.0
                for batch in batches:
                    _, clean_s, served_s = _timed(box.victim, box, batch)
                    clean, defended = clean + clean_s, defended + served_s
                per_round[name].append((1000 * clean / n, 1000 * defended / n))
    out = {}
    for name, times in per_round.items():
        clean = statistics.median(t[0] for t in times)
        defended = statistics.median(t[1] for t in times)
        out[name] = {"ms_per_query_clean": clean, "ms_per_query_defended": defended,
                     "latency_ratio": statistics.median(t[1] / t[0] for t in times),
                     "rounds": rounds, "batches": len(batches)}
    return out


class _Accumulator:
    """Sums of the per-query distances and of the stage timings over the query batches."""

    def __init__(self) -> None:
        self.n = 0
        self.l1 = self.kl = 0.0
        self.changed = 0
        self.clean_seconds = self.served_seconds = 0.0

    def add(self, batch, clean_seconds: float, served_seconds: float) -> None:
        d = posterior_distances(batch.clean, batch.defended)
        self.n += len(batch.clean)
        self.l1 += float(d["l1"].sum())
        self.kl += float(d["kl"].sum())
        self.changed += int(d["argmax_changed"].sum())
        self.clean_seconds += clean_seconds
        self.served_seconds += served_seconds

    def summary(self) -> dict[str, float | int]:
        clean = 1000 * self.clean_seconds / self.n
        defended = 1000 * self.served_seconds / self.n
        return {"l1_distance": self.l1 / self.n, "kl_divergence": self.kl / self.n,
                "argmax_changed": self.changed / self.n, "queries": self.n,
                "ms_per_query_clean": clean, "ms_per_query_defended": defended,
                "latency_ratio": defended / clean if clean > 0 else float("nan")}


# ---------------------------------------------------------------- query sets

def parse_query_set(text: str) -> tuple[str, str]:
    """``"NAME[:SPLIT]"`` -> (registered dataset name, split); the split defaults to "test".
    Unknown names are a ``DatasetError`` listing the registered ones; bad syntax a ``ConfigError``."""
    name, sep, split = str(text).strip().partition(":")
    name, split = name.strip(), split.strip()
    if not name or (sep and not split) or ":" in split:
        raise ConfigError(f"bad query set {text!r}: expected NAME or NAME:SPLIT, e.g. mnist:test")
    split = split or "test"
    spec = dataset_spec(name)
    if split not in spec.splits:  # val only where the set has one (an image folder with val/)
        raise ConfigError(f"bad query set {text!r}: split must be one of {', '.join(spec.splits)}")
    return spec.name, split


def load_queries(query_set: str, input_shape: tuple[int, int, int], *, limit: int | None = None,
                 data_root: str | Path | None = None) -> tuple[str, Tensor]:
    """The images of ``query_set`` ("NAME[:SPLIT]", any registered dataset) as float32 in [0, 1]
    adapted to ``input_shape`` (C, H, W), the first ``limit`` only if given. Returns the set's
    canonical "name:split" and the images (N, C, H, W)."""
    check_int("", "the query limit", limit, low=1, optional=True)
    name, split = parse_query_set(query_set)
    data = load_dataset(name, split, data_root)
    images = data.images[:limit] if limit is not None else data.images
    if len(images) == 0:
        raise ConfigError(f"the query set {name}:{split} is empty")
    return f"{name}:{split}", to_victim_input(images, input_shape)


# ---------------------------------------------------------------- the `divqat defend` command

@dataclass(frozen=True)
class DefendRequest:
    """What ``divqat defend`` is asked: evaluate one defense on a saved victim.

    Arguments:
        victim: the victim directory (``divqat train``).
        defense, params: the registered defense and its parameters (``divqat defenses``).
            (Default params: the defense's defaults.)
        queries: the query set, "NAME[:SPLIT]" of any registered dataset, adapted to the
            victim's input. (Default: None, the victim's own test split.)
        limit: keep the query set's first N images. (Default: None, all.)
        batch_size: images per query. (Default: 256.)
        seed, misinformation_epochs, retrain_misinformation: for a defense that builds a model
            (``build_defense``). (Defaults: 0, 5, False.)
        out: the folder of ``metrics.json``. (Default: None, nothing written.)
    """

    victim: str | Path
    defense: str
    params: dict[str, Any] = field(default_factory=dict)
    queries: str | None = None
    limit: int | None = None
    batch_size: int = 256
    seed: int = 0
    misinformation_epochs: int = 5
    retrain_misinformation: bool = False
    out: str | Path | None = None


def defend_victim(request: DefendRequest, context: RunContext | None = None) -> dict[str, Any]:
    """Evaluate one defense on a saved victim (``DefendRequest``); write ``OUT/metrics.json``
    when ``request.out`` is given.

    ``context``: where the data are, the device, progress bars and the log that hears about a
    misinformation model (default ``RunContext()``). The defense is built with
    ``build_defense``; the data are loaded and the parameters checked before any model is
    trained. Returns the metrics of ``evaluate_defense`` plus ``victim``, ``victim_mode``,
    ``victim_dataset``, ``victim_arch``, ``test_set``, ``query_set``, ``batch_size`` and, for
    model-backed defenses, ``seed``.
    """
    context = context or RunContext()
    victim_dir, queries, limit = Path(request.victim), request.queries, request.limit
    batch_size, seed, data_root = request.batch_size, request.seed, context.data_root
    meta = victim_metadata(victim_dir)
    query_set = queries if queries is not None else f"{meta['dataset']}:test"
    check_int("", "batch size", batch_size, low=1)
    check_int("", "the query limit", limit, low=1, optional=True)
    # The data first: a missing dataset must not be found after minutes of training.
    test = load_dataset(meta["dataset"], "test", data_root)
    if queries is None and limit is None:
        query_name, query_images = f"{dataset_spec(meta['dataset']).name}:test", None
    else:
        query_name, query_images = load_queries(query_set, tuple(meta["input_shape"]), limit=limit,
                                                data_root=data_root)
    built = build_defense(request.defense, request.params, victim_dir, seed=seed,
                          misinformation_epochs=request.misinformation_epochs,
                          retrain_misinformation=request.retrain_misinformation, data_root=data_root,
                          device=context.device, progress=context.progress, log=context.log)
    victim = load_victim(victim_dir, device=context.device)
    start = time.perf_counter()
    metrics = evaluate_defense(victim, built, test, query_images, batch_size)
    record: dict[str, Any] = {
        **metrics,
        "victim": str(victim_dir),
        "victim_mode": meta.get("mode"),
        "victim_dataset": meta.get("dataset"),
        "victim_arch": meta.get("arch"),
        "test_set": f"{dataset_spec(meta['dataset']).name}:test",
        "query_set": query_name,
        "batch_size": batch_size,
        "evaluation_seconds": time.perf_counter() - start,
    }
    if built.model_param is not None:
        record["seed"] = seed
    if built.trains_model:
        record["misinformation_model"] = str(misinformation_model_dir(victim_dir))
    if request.out is not None:
        write_json(Path(request.out) / "metrics.json", record)
    return record


__all__ = ["KL_CLAMP", "DefendRequest", "DefenseEvaluation", "defend_victim", "evaluate_defense", "evaluate_served",
           "load_queries", "parse_query_set", "posterior_distances", "time_side_by_side"]
