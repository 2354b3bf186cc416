"""An extraction attack on a saved victim, measured: the whole ``divqat attack`` command.

``attack_victim`` loads the victim, puts the defense and a budgeted ``BlackBox`` around it, hands
the box (and the thief's transfer set, if the attack uses one) to the attack, and measures every
surrogate on the victim's test split:

- ``adversary_accuracy`` / ``adversary_error``: the surrogate against the true labels;
- ``agreement``: fraction of test images where the surrogate's argmax equals the defended
  victim's (what the thief was shown); ``agreement_clean``: the same against the clean victim;
- ``queries_used``, ``seconds``; and the defense's own metrics (``defender_accuracy``,
  ``l1_distance``, ... over the thief's queries, see ``divqat.pipelines.defend``).

With ``watermark`` (DAWN's rate, ``divqat.ownership``) the thief's answers are watermarked after
the defense: the record's ``watermark`` says how many were marked and what an honest user of the
test split would lose, and ``OUT/marks.npz`` keeps the marks for ``divqat verify``. With
``save_surrogate`` each stolen surrogate is written as a model file ``divqat verify`` loads.

A label-only thief behind a defense that leaves every label of its transfer set as it was (DCP
keeps the argmax of confident answers, and usually of all) is shown exactly what it is shown
behind no defense, so it sends the same queries and trains the same surrogates: given the same
attack's folder behind no defense (``twin``), ``attack_victim`` checks that on every image of
the transfer set and then measures the twin's surrogates against this defense instead of
training them again (``surrogates_from`` in the record). The surrogates' test-split labels are
kept for that in ``predictions.pt``.

    >>> request = AttackRequest("runs/qat", "knockoff", [5000], transfer="mnist", defense="dcp",
    ...                         defense_params={"beta": 0.5}, out="runs/attack")
    >>> record = attack_victim(request, RunContext(data_root="data"))
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divqat.attacks import Stolen, SurrogateTraining, TransferSet, create_attack
from divqat.blackbox import BlackBox, DefendedVictim
from divqat.checks import check_bool, check_int
from divqat.data import (
    ImageDataset,
    dataset_spec,
    load_dataset,
    to_float,
    to_victim_input,
    training_split,
)
from divqat.detectors import Monitor
from divqat.errors import ConfigError
from divqat.io import atomic_write, write_json
from divqat.models.saved import save_model
from divqat.ownership import Watermark, save_marks
from divqat.pipelines.context import RunContext
from divqat.pipelines.defend import evaluate_served, parse_query_set
from divqat.pipelines.defense_models import build_defense
from divqat.pipelines.thieves import check_known_defense, key_budget, known_defense, stream_monitors
from divqat.stopwatch import phase, timed
from divqat.train.losses import frozen_forward
from divqat.train.trainer import resolve_precision
from divqat.victim import load_victim, victim_metadata

# The thief's unseen in-distribution transfer set: the victim's held-out training images.
HOLDOUT = "holdout"
# The surrogates' labels on the test split, per budget, in an attack's folder (``twin``).
PREDICTIONS = "predictions.pt"
# The watermark's marks of the thief's queries, in an attack's folder (``divqat verify --marks``).
MARKS = "marks.npz"
# The name of the thief's session in its watermark (one key: the thief's).
THIEF_KEY = "thief"


def parse_transfer(spec: str) -> str:
    """A transfer-set spec in canonical form: ``"holdout"``, or ``"NAME:SPLIT"`` of a registered
    dataset (the split defaults to train: a thief's own images are not the victim's test set)."""
    if spec == HOLDOUT:
        return HOLDOUT
    text = spec if ":" in str(spec) else f"{spec}:train"
    name, split = parse_query_set(text)
    return f"{name}:{split}"


def load_transfer_set(spec: str, meta: dict, data_root: str | Path | None = None,
                      limit: int | None = None) -> TransferSet:
    """The thief's transfer set at the victim's input shape.

    ``spec`` is ``"holdout"`` (the images of the victim's training split it was trained without,
    ``divqat train --holdout N``: in-distribution and unseen) or ``"NAME[:SPLIT]"`` of any
    registered dataset (split default: train).
    """
    spec = parse_transfer(spec)
    if spec == HOLDOUT:
        n = int(meta.get("holdout") or 0)
        if n <= 0:
            raise ConfigError(f"transfer set {HOLDOUT!r} needs a victim trained with --holdout N; "
                              f"this {meta.get('mode')} victim held no images out of its training")
        data = training_split(load_dataset(meta["dataset"], "train", data_root), n)[1]
        name = f"{dataset_spec(meta['dataset']).name}:train[-{n}:]"
    else:
        name, split = spec.split(":")
        data = load_dataset(name, split, data_root)
        name = spec
    images, labels = data.images, data.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = to_victim_input(images, tuple(meta["input_shape"]))
    # Stored as uint8 (a CIFAR-sized transfer set in float32 is 600 MB); the queries are these
    # exact uint8 values / 255, so the thief trains on what it sent.
    stored = x.mul_(255).round_().to(torch.uint8)
    return TransferSet(name, stored, torch.as_tensor(labels).long())


@timed("evaluate")
@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 512,
            device: str = "cpu") -> Tensor:
    """argmax labels (N,) of a model on float images (N, C, H, W), in chunks."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(model(images[start:start + batch_size].to(device)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def surrogate_predictions(surrogate: nn.Module, test_images: Tensor, device: str = "cpu",
                          precision: str = "fp32") -> Tensor:
    """The surrogate's argmax labels (N,) on the test split. ``precision`` "bf16"
    (``SurrogateTraining.eval_precision``; fp32 where the CPU lacks native bf16): the forward
    passes under bf16 autocast, as a bf16-trained surrogate ran in training, with every BatchNorm
    folded into the convolution before it (``frozen_forward``): 2.35x less CPU time than fp32
    for resnet8 on 5,000 Fashion-MNIST images (docs/results.md, "Where the time goes")."""
    # channels_last: about 1.2x faster convolutions on CPU, and this runs per budget per attack.
    surrogate.eval().to(memory_format=torch.channels_last)
    images = test_images.contiguous(memory_format=torch.channels_last)
    if resolve_precision(precision, device) == "fp32":
        return predict(surrogate, images, device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        return predict(frozen_forward(surrogate), images, device=device)


def prediction_metrics(pred: Tensor, labels: Tensor, defended_pred: Tensor,
                       clean_pred: Tensor) -> dict[str, float]:
    """A surrogate's accuracy, error and agreement (with the defended and the clean victim) on the
    test split, from its labels there ``pred`` (N,)."""
    acc = float((pred == labels).float().mean())
    return {"adversary_accuracy": acc, "adversary_error": 1.0 - acc,
            "agreement": float((pred == defended_pred).float().mean()),
            "agreement_clean": float((pred == clean_pred).float().mean())}


@timed("evaluate")
@torch.no_grad()
def labels_changed(served: DefendedVictim, images: Tensor, batch_size: int = 1024) -> int:
    """How many of ``images`` (uint8 or float (N, C, H, W)) get a defended label other than the
    clean victim's."""
    changed = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        answer = served(to_float(batch) if batch.dtype == torch.uint8 else batch)
        changed += int((answer.defended.argmax(dim=1) != answer.clean.argmax(dim=1)).sum())
    return changed


# What must match between an attack and its twin for the twin's surrogates to be this one's.
_TWIN_FIELDS = ("attack", "params", "labels_only", "victim", "transfer_set", "surrogate", "epochs",
                "min_steps", "seed")


def _twin_results(twin: Path, expected: dict[str, Any], budgets: list[int], labels: Tensor,
                  defended_pred: Tensor, clean_pred: Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The twin's record and its per-budget results measured against this defense (agreement
    with this defended victim; the rest is the surrogates' own)."""
    record = json.loads((twin / "metrics.json").read_text())
    # A run folder may be copied or moved (the thieves preset starts from a copy of the default
    # run), so the victim is matched by its folder's name (the victim stage's key), not its path.
    record = {**record, "victim": Path(str(record.get("victim"))).name}
    differ = [k for k in _TWIN_FIELDS if record.get(k) != expected[k]]
    if differ or [r["budget"] for r in record["results"]] != budgets or record.get("defense") != "none":
        raise ConfigError(f"{twin} is not this thief behind no defense (differs in "
                          f"{', '.join(differ) or 'budgets or defense'})")
    try:
        predictions = torch.load(twin / PREDICTIONS, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{twin / PREDICTIONS} is unreadable ({type(e).__name__}); delete {twin} and "
                          "run again to recompute that stage") from None
    results = []
    for row in record["results"]:
        pred = predictions[str(row["budget"])].long()
        results.append({**row, **prediction_metrics(pred, labels, defended_pred, clean_pred)})
    return record, results


@dataclass(frozen=True)
class AttackRequest:
    """What ``divqat attack`` is asked: one thief against one victim behind one defense.

    Arguments:
        victim: the victim artifact (``divqat train``); for ``attack_remote``, the service's URL.
        attack, params: registered attack name and its parameters. (Default params: the
            attack's defaults.)
        budgets: query budgets (one int, or several); one surrogate per budget (see the attack
            for how queries are shared between them). The black box's budget is the largest.
        defense, defense_params: the output perturbation (``divqat defenses``).
            (Default: none.)
        transfer: the thief's transfer set, ``"holdout"`` or ``"NAME[:SPLIT]"``; required by
            attacks that use one (knockoff, knockoff-adaptive, jbda's seed set).
            (Default: None.)
        training: the surrogate recipe. (Default: None, ``SurrogateTraining()`` on the
            context's device, with its progress bars.)
        labels_only: the black box answers labels only. (Default: False.)
        twin: the folder of this same label-only attack (same victim, transfer set, budgets,
            surrogate recipe and seed) behind no defense. When this defense is a deterministic
            formula of each posterior (``Defense.fusable``), the thief queries only its transfer
            set, no detector watches, and the defense changes the label of none of the transfer
            set's images, the thief's answers here are the twin's answers, so its surrogates are
            the twin's: they are measured against this defense, not trained again. Otherwise
            the attack runs as without ``twin``. (Default: None.)
        out: the folder of ``metrics.json`` and ``predictions.pt``. (Default: None, nothing
            written.)
        watermark: the rate of DAWN's watermark on the thief's answers (``BlackBox(watermark=
            ...)``, after the defense; secret derived from the seed, key "thief"): the record
            says how many answers were marked, and ``out/marks.npz`` keeps the marks for ``divqat
            verify``. Turns ``twin`` off (the answers differ). (Default: None, no watermark.)
        save_surrogate: write the stolen surrogate here as a model file (``divqat.models.saved``:
            state dict, arch, input shape, normalization), which ``divqat verify --suspect``
            loads; with several budgets one file per budget, ``STEM-BUDGET.SUFFIX``. Turns
            ``twin`` off. (Default: None, not written.)
    """

    victim: str | Path
    attack: str
    budgets: Sequence[int] | int
    params: dict[str, Any] = field(default_factory=dict)
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    transfer: str | None = None
    training: SurrogateTraining | None = None
    labels_only: bool = False
    twin: str | Path | None = None
    out: str | Path | None = None
    watermark: float | None = None
    save_surrogate: str | Path | None = None


def surrogate_paths(path: str | Path, budgets: Sequence[int]) -> dict[int, Path]:
    """Where ``save_surrogate`` writes each budget's surrogate: ``path`` for one budget, else
    ``STEM-BUDGET.SUFFIX`` beside it (``stolen.pt`` -> ``stolen-1000.pt``, ``stolen-5000.pt``)."""
    path = Path(path)
    if len(budgets) == 1:
        return {budgets[0]: path}
    return {b: path.with_name(f"{path.stem}-{b}{path.suffix or '.pt'}") for b in budgets}


def _save_surrogates(stolen: list[Stolen], request: AttackRequest, input_shape: Sequence[int],
                     classes: Sequence[str], budgets: list[int], say: Callable[[str], None]) -> dict[str, str]:
    """Each budget's surrogate as a model file (``surrogate_paths``); budget -> path."""
    paths = surrogate_paths(request.save_surrogate, budgets)
    saved = {}
    for s in stolen:
        info = {"attack": request.attack, "budget": s.budget, "queries_used": s.queries_used,
                "victim": str(request.victim), "labels_only": request.labels_only,
                "defense": request.defense, "watermark": request.watermark}
        saved[str(s.budget)] = str(save_model(paths[s.budget], s.surrogate, tuple(input_shape),
                                              len(classes), classes=list(classes), info=info))
        say(f"  surrogate of budget {s.budget} -> {saved[str(s.budget)]}")
    return saved


def attack_victim(request: AttackRequest, context: RunContext | None = None) -> dict[str, Any]:
    """Run one attack against a saved victim behind a defense; measure every surrogate.

    Loads what ``request`` names: the victim, its test split, the transfer set, and builds the
    defense (``context``: where the data are, the device, progress bars, the log; default
    ``RunContext()``). ``attack_loaded`` runs the same attack on objects already loaded.

    Returns a dict with the settings, the defense's metrics over the thief's queries
    (``defender_accuracy``, ``l1_distance``, ``kl_divergence``, ``argmax_changed``,
    ``ms_per_query_clean``, ``ms_per_query_defended``), ``results`` (one dict per budget:
    ``budget``, ``queries_used``, ``adversary_accuracy``, ``adversary_error``, ``agreement``,
    ``agreement_clean``, ``seconds``) and, at the top level, the largest budget's figures;
    ``surrogates_from`` (the twin's folder and why) when the twin's surrogates were measured.
    """
    return _attack(request, context or RunContext(), None, None, None, None)


def attack_loaded(request: AttackRequest, served: DefendedVictim, context: RunContext | None = None,
                  *, test_set: ImageDataset | None = None, transfer_set: TransferSet | None = None,
                  monitor: Monitor | None = None,
                  monitors: Sequence[Monitor | None] | None = None) -> dict[str, Any]:
    """``attack_victim`` on objects the caller already holds (an experiment's stage worker keeps
    them between stages): ``served`` is the victim behind the request's defense
    (``DefendedVictim``, whose compiled program is kept), ``test_set`` the victim's test split
    and ``transfer_set`` the thief's, each loaded from the request when None. ``monitor``:
    extraction detectors watching the thief's stream (``BlackBox(monitor=...)``; with
    ``on_alarm`` other than flag, the alarm also changes what the thief gets); ``monitors``: one
    per key of a Sybil thief instead (``divqat.pipelines.detect.watching_keys``). The request's
    ``defense`` names ``served.defense`` in the record. Returns what ``attack_victim`` returns.
    """
    return _attack(request, context or RunContext(), served, test_set, transfer_set,
                   stream_monitors(create_attack(request.attack, **dict(request.params or {})),
                                   monitor, monitors))


def _attack(request: AttackRequest, context: RunContext, served: DefendedVictim | None,
            test_set: ImageDataset | None, transfer_set: TransferSet | None,
            monitors: list[Monitor | None] | None) -> dict[str, Any]:
    attack, labels_only, defense, twin = request.attack, request.labels_only, request.defense, request.twin
    data_root, device, say = context.data_root, context.device, context.say
    victim_dir = Path(request.victim)
    meta = victim_metadata(victim_dir)
    training = (request.training if request.training is not None
                else SurrogateTraining(device=device, progress=context.progress))
    if not isinstance(training, SurrogateTraining):
        raise ConfigError(f"training must be a SurrogateTraining, got {type(training).__name__}")
    check_bool("", "labels_only", labels_only)
    thief = create_attack(attack, **dict(request.params or {}))
    if thief.soft_only and labels_only:
        raise ConfigError(f"attack {attack!r} needs posteriors: it cannot run label-only")
    check_known_defense(thief, defense, request.defense_params)  # before minutes of work
    budgets = _budgets(request.budgets)
    if request.watermark is not None:
        Watermark(2, rate=request.watermark)  # the rate checked before minutes of work
    monitors = monitors if monitors is not None else [None] * thief.streams
    watched = any(m is not None for m in monitors)

    # The data first: a missing dataset must not be found after minutes of work.
    test = test_set if test_set is not None else load_dataset(meta["dataset"], "test", data_root)
    if thief.uses_transfer_set and transfer_set is None:
        if request.transfer is None:
            raise ConfigError(f"attack {attack!r} needs a transfer set: --transfer holdout or "
                              "--transfer NAME[:SPLIT] (e.g. mnist)")
        transfer_set = load_transfer_set(request.transfer, meta, data_root)
    if served is None:
        built = build_defense(defense, request.defense_params, victim_dir, seed=training.seed,
                              data_root=data_root, device=device, progress=context.progress,
                              log=context.log)
        served = DefendedVictim(load_victim(victim_dir, device=device), built)
    victim, built_defense = served.victim, served.defense

    test_images = to_victim_input(test.images, tuple(meta["input_shape"]))
    labels = torch.as_tensor(test.labels).long()
    # One pass over the test split gives the defender's accuracy and the labels the surrogates
    # are compared with; the thief's own queries give the distortion and the timings.
    queries = None if transfer_set is None else transfer_set.images[:budgets[-1]]
    evaluation = evaluate_served(victim, built_defense, test, queries, served=served)
    defense_metrics = evaluation.metrics
    clean_pred, defended_pred = evaluation.clean_labels, evaluation.defended_labels

    mode = "label-only" if labels_only else "soft-label"
    say(f"{attack} ({mode}) against the {meta.get('mode')} victim behind {defense}, "
        f"budgets {', '.join(map(str, budgets))}"
        + (f", transfer set {transfer_set.name}" if transfer_set is not None else ""))
    watermark = None
    if request.watermark is not None:
        watermark = Watermark.from_seed(served.num_classes, training.seed, request.watermark, key=THIEF_KEY)
    shared = None
    if (twin is not None and labels_only and built_defense.fusable and not watched
            and watermark is None and request.save_surrogate is None
            and thief.queries_transfer_set_only):
        if not (Path(twin) / PREDICTIONS).is_file():  # a twin run by an older divqat
            say(f"  {Path(twin).name} kept no {PREDICTIONS}: the thief's own surrogates are trained")
        elif changed := labels_changed(served, transfer_set.images):
            say(f"  {defense} changes the label of {changed} of {len(transfer_set)} transfer images: "
                "the thief's own surrogates are trained")
        else:
            expected = {"attack": attack, "params": thief.params(), "labels_only": labels_only,
                        "victim": Path(victim_dir).name, "transfer_set": transfer_set.name,
                        "surrogate": training.arch, "epochs": training.epochs,
                        "min_steps": training.min_steps, "seed": training.seed}
            twin_record, results = _twin_results(Path(twin), expected, budgets, labels,
                                                 defended_pred, clean_pred)
            shared = {"folder": str(twin),
                      "why": f"{defense} changed none of the {len(transfer_set)} transfer images' "
                             "labels: the label-only thief's answers, queries and surrogates are "
                             "those behind no defense"}
            queries_used, seconds = twin_record["queries_used"], twin_record["attack_seconds"]
            say(f"  {shared['why']}: measuring the surrogates of {Path(twin).name}")
    streams = None
    if shared is None:
        # The thief's knowledge of the defense (the recovery thief), and its keys (the Sybil
        # thief: one box per key, each with its own share of the budget and its own monitor).
        known = known_defense(thief, defense, request.defense_params, training, transfer_set,
                              served.input_shape, served.num_classes)
        per_key = key_budget(thief, budgets[-1])
        boxes = [BlackBox(served, budget=per_key, label_only=labels_only, monitor=m, watermark=watermark)
                 for m in monitors]
        start = time.perf_counter()
        torch.manual_seed(training.seed)
        with phase("attack"):  # the thief's own work: querying, and training outside ``fit``
            stolen: list[Stolen] = thief.steal(boxes if thief.streams > 1 else boxes[0], budgets,
                                               training, transfer=transfer_set, **known)
        seconds = time.perf_counter() - start
        queries_used = sum(b.queries_used for b in boxes)
        if thief.streams > 1:
            streams = [{"budget": b.budget, "queries_used": b.queries_used} for b in boxes]
        results, predictions = [], {}
        for s in stolen:
            pred = surrogate_predictions(s.surrogate, test_images, device, training.eval_precision)
            predictions[str(s.budget)] = pred.to(torch.int16)
            row = {"budget": s.budget, "queries_used": s.queries_used, "seconds": s.seconds,
                   **({"epochs": training.epochs_for(_trained_on(s))} if thief.uses_transfer_set else {}),
                   **prediction_metrics(pred, labels, defended_pred, clean_pred),
                   **({"info": s.info} if s.info else {})}
            results.append(row)
        if request.out is not None:
            atomic_write(Path(request.out) / PREDICTIONS, lambda tmp: torch.save(predictions, tmp))
        if request.save_surrogate is not None:
            saved_surrogates = _save_surrogates(stolen, request, meta["input_shape"], meta["classes"],
                                                budgets, say)
    for row in results:
        say(f"  budget {row['budget']}: adversary accuracy {row['adversary_accuracy']:.2%}, agreement "
            f"{row['agreement']:.2%} ({row['queries_used']} queries, {row['seconds']:.0f} s)")
    top = results[-1]
    record: dict[str, Any] = {
        "attack": attack, "params": thief.params(), "labels_only": labels_only,
        "defense": defense, "defense_params": built_defense.params(),
        "victim": str(victim_dir), "victim_mode": meta.get("mode"), "victim_dataset": meta.get("dataset"),
        "victim_arch": meta.get("arch"), "victim_accuracy": defense_metrics["victim_accuracy"],
        "transfer_set": None if transfer_set is None else transfer_set.name,
        "surrogate": training.arch, "epochs": training.epochs, "min_steps": training.min_steps,
        "seed": training.seed,
        **{k: defense_metrics[k] for k in ("defender_accuracy", "l1_distance", "kl_divergence",
                                           "argmax_changed", "ms_per_query_clean",
                                           "ms_per_query_defended")},
        "adversary_accuracy": top["adversary_accuracy"], "adversary_error": top["adversary_error"],
        "agreement": top["agreement"], "agreement_clean": top["agreement_clean"],
        "budget": top["budget"], "queries_used": queries_used, "attack_seconds": seconds,
        "results": results, **({"surrogates_from": shared} if shared else {}),
        **({"streams": streams} if streams else {}),
    }
    if watermark is not None:
        record["watermark"] = _watermark_record(watermark, request, meta, test_images, labels,
                                                defended_pred, clean_pred, say)
    if request.save_surrogate is not None:
        record["surrogate_files"] = saved_surrogates
    if request.out is not None:
        write_json(Path(request.out) / "metrics.json", record)
    return record


def _trained_on(stolen: Stolen) -> int:
    """Images the surrogate trained on: its queries, except for a thief that asks several times
    per image (the averaging thief records its ``images``)."""
    return int(stolen.info.get("images", stolen.queries_used))


def _watermark_record(watermark: Watermark, request: AttackRequest, meta: dict, test_images: Tensor,
                      labels: Tensor, defended_pred: Tensor, clean_pred: Tensor,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """What the watermark did to the thief's answers, and what it would cost an honest user
    asking the test split (its labels with the marks, against the defended ones)."""
    log = watermark.log
    honest = watermark.marked_labels(defended_pred, test_images, reference=clean_pred)
    out = {"rate": watermark.rate, "key": watermark.key, "answered": log.answered, "marked": log.marked,
           "marked_fraction": log.marked / log.answered if log.answered else 0.0,
           "distinct_marks": len(log), "controls": log.controls,
           "test_answers_marked": int((honest != defended_pred).sum()),
           "defender_accuracy_watermarked": float((honest == labels).float().mean()),
           "marks_file": None}
    if request.out is not None:
        out["marks_file"] = str(save_marks(log.marks(meta["input_shape"]), Path(request.out) / MARKS))
    say(f"  watermark (rate {watermark.rate:g}): {log.marked} of {log.answered} answers marked "
        f"({out['marked_fraction']:.2%}), {len(log)} distinct marked inputs and {log.controls} controls kept"
        + (f" -> {out['marks_file']}" if out["marks_file"] else ""))
    return out


def _budgets(budgets: Sequence[int] | int) -> list[int]:
    """The budgets ascending, each once; one int is one budget."""
    if isinstance(budgets, int) and not isinstance(budgets, bool):
        budgets = [budgets]
    if not budgets:
        raise ConfigError("give at least one query budget")
    return sorted({check_int("", "budget", b, low=1) for b in budgets})


@dataclass(frozen=True)
class ServiceAccess:
    """How ``attack_remote`` reaches a ``divqat serve`` prediction API.

    Arguments:
        api_key: the thief's key; its budget is the attack's.
        eval_key: a separate key whose answers on the test split stand for the defended
            victim's (``agreement``, ``defender_accuracy``); never the thief's key.
            (Default: None, those are left out.)
        dataset: the registered dataset whose test split measures the surrogates.
            (Default: None, the one the service publishes at ``/v1/model``.)
        insecure: send the keys over plain ``http://`` to a host that is not loopback (see
            ``RemoteBlackBox``). (Default: False: such a URL is refused.)
        more_keys: the Sybil thief's other keys (``api_key`` is its first); their budgets
            together are the attack's. (Default: none.)
    """

    # The keys are secrets: never in a repr, hence never in a log or a traceback.
    api_key: str = field(repr=False)
    eval_key: str | None = field(default=None, repr=False)
    dataset: str | None = None
    insecure: bool = False
    more_keys: tuple[str, ...] = field(default=(), repr=False)


def attack_remote(request: AttackRequest, access: ServiceAccess,
                  context: RunContext | None = None) -> dict[str, Any]:
    """``attack_victim`` against a ``divqat serve`` prediction API: ``request.victim`` is its
    URL, and its defense is the service's (``request.defense`` stays "none", no ``twin``).

    The thief queries through ``RemoteBlackBox(url, access.api_key)``; the service's defense,
    budget and counter apply. Measured on the test split of the service's dataset
    (``/v1/model``, or ``access.dataset``), adapted as ``attack_victim`` does:
    ``adversary_accuracy`` / ``adversary_error`` always; ``agreement`` and ``defender_accuracy``
    only with ``access.eval_key``. ``agreement_clean``, ``victim_accuracy`` and the defense's
    distances need the undefended victim, which the service never shows. What is missing is
    None in the record and named, with the reason, under ``left_out``.

    ``request.transfer``: as ``attack_victim``; ``"holdout:N"`` for the last N images of the
    dataset's training split (``holdout`` alone needs the victim's metadata, which the service
    does not publish). The record adds ``remote`` (url, the key's output level, budget and what
    is left).
    """
    from divqat.remote import RemoteBlackBox

    context = context or RunContext()
    url, attack, transfer, labels_only = str(request.victim), request.attack, request.transfer, request.labels_only
    api_key, eval_key, dataset = access.api_key, access.eval_key, access.dataset
    data_root, device, say = context.data_root, context.device, context.say
    if request.defense != "none" or request.defense_params:
        raise ConfigError("over HTTP the defense is the service's (`divqat serve --defense`); "
                          "drop --defense and --param")
    if request.twin is not None:
        raise ConfigError("over HTTP there is no twin: the thief's answers are the service's")
    if request.watermark is not None:
        raise ConfigError("over HTTP the watermark is the service's (`divqat serve --watermark RATE`); "
                          "drop --watermark")
    training = (request.training if request.training is not None
                else SurrogateTraining(device=device, progress=context.progress))
    if not isinstance(training, SurrogateTraining):
        raise ConfigError(f"training must be a SurrogateTraining, got {type(training).__name__}")
    thief = create_attack(attack, **dict(request.params or {}))
    check_known_defense(thief, None, None)  # before the evaluation key is charged
    budgets = _budgets(request.budgets)
    holdout = None
    if transfer is not None and str(transfer).startswith(HOLDOUT):
        count = str(transfer)[len(HOLDOUT) + 1:]
        if not str(transfer).startswith(f"{HOLDOUT}:") or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"over HTTP the victim's holdout size is not published: give it as "
                              f"--transfer {HOLDOUT}:N (e.g. {HOLDOUT}:10000)")
        holdout, transfer = int(count), HOLDOUT

    keys = (api_key, *access.more_keys)
    if len(keys) != thief.streams:
        raise ConfigError(f"attack {attack!r} holds {thief.streams} key(s); {len(keys)} were given "
                          "(--api-key-file FILE ..., one file per key)")
    boxes: list[RemoteBlackBox] = []
    evaluator = None
    try:
        for key in keys:
            boxes.append(RemoteBlackBox(url, key, label_only=True if labels_only else None,
                                        insecure=access.insecure))
        box = boxes[0]
        if thief.soft_only and box.label_only:
            raise ConfigError(f"attack {attack!r} needs posteriors; this key answers labels only")
        lefts = [b.queries_left for b in boxes]
        if None not in lefts and sum(lefts) < budgets[-1]:
            raise ConfigError(f"the thief's key{'s have' if len(boxes) > 1 else ' has'} {sum(lefts)} "
                              f"images left; the largest budget is {budgets[-1]}")
        dataset = dataset or box.dataset
        if not dataset:
            raise ConfigError("the service does not publish its dataset; name the test split's dataset")
        shape = box.input_shape
        meta = {"dataset": dataset, "input_shape": list(shape), "holdout": holdout, "mode": "remote"}
        test = load_dataset(dataset, "test", data_root)
        if thief.uses_transfer_set:
            if transfer is None:
                raise ConfigError(f"attack {attack!r} needs a transfer set: --transfer holdout:N or "
                                  "--transfer NAME[:SPLIT] (e.g. mnist)")
            transfer_set = load_transfer_set(transfer, meta, data_root)
        else:
            transfer_set = None
        test_images = to_victim_input(test.images, shape)
        labels = torch.as_tensor(test.labels).long()

        left_out: dict[str, str] = {
            key: "needs the undefended victim, which the service never shows"
            for key in ("agreement_clean", "victim_accuracy", "l1_distance", "kl_divergence",
                        "argmax_changed")}
        defended_pred = None
        if eval_key is not None:
            # Before the thief, as attack_victim measures the victim before it steals.
            evaluator = RemoteBlackBox(url, eval_key, insecure=access.insecure)
            if evaluator.queries_left is not None and evaluator.queries_left < len(test_images):
                raise ConfigError(f"the evaluation key has {evaluator.queries_left} images left; the "
                                  f"test split has {len(test_images)}")
            defended_pred = torch.cat([evaluator.query_labels(test_images[i:i + 256])
                                       for i in range(0, len(test_images), 256)])
        else:
            for key in ("agreement", "defender_accuracy"):
                left_out[key] = "needs the victim's answers on the test split: give an evaluation key"
        mode = "label-only" if box.label_only else f"{box.output} answers"
        say(f"{attack} ({mode}) against {url}, budgets {', '.join(map(str, budgets))}"
            + (f", transfer set {transfer_set.name}" if transfer_set is not None else ""))
        known = known_defense(thief, None, None, training, transfer_set, shape, box.num_classes)
        used_before = [b.queries_used for b in boxes]
        start = time.perf_counter()
        torch.manual_seed(training.seed)
        stolen: list[Stolen] = thief.steal(boxes if thief.streams > 1 else box, budgets, training,
                                           transfer=transfer_set, **known)
        seconds = time.perf_counter() - start
        queries_used = sum(b.queries_used for b in boxes) - sum(used_before)

        results = []
        for s in stolen:
            pred = surrogate_predictions(s.surrogate, test_images, device, training.eval_precision)
            accuracy = float((pred == labels).float().mean())
            row = {"budget": s.budget, "queries_used": s.queries_used, "seconds": s.seconds,
                   **({"epochs": training.epochs_for(_trained_on(s))} if thief.uses_transfer_set else {}),
                   "adversary_accuracy": accuracy, "adversary_error": 1.0 - accuracy,
                   "agreement": None if defended_pred is None
                   else float((pred == defended_pred).float().mean()),
                   "agreement_clean": None, **({"info": s.info} if s.info else {})}
            results.append(row)
            agreement = "" if row["agreement"] is None else f", agreement {row['agreement']:.2%}"
            say(f"  budget {s.budget}: adversary accuracy {accuracy:.2%}{agreement} "
                f"({s.queries_used} queries, {s.seconds:.0f} s)")
        saved_surrogates = None
        if request.save_surrogate is not None:
            saved_surrogates = _save_surrogates(stolen, request, shape, box.classes, budgets, say)
        top = results[-1]
        record: dict[str, Any] = {
            "attack": attack, "params": thief.params(), "labels_only": box.label_only,
            "defense": None, "defense_params": None, "victim": url, "victim_mode": None,
            "victim_dataset": dataset, "victim_arch": None, "victim_accuracy": None,
            "transfer_set": None if transfer_set is None else transfer_set.name,
            "surrogate": training.arch, "epochs": training.epochs, "min_steps": training.min_steps,
            "seed": training.seed,
            "defender_accuracy": None if defended_pred is None
            else int((defended_pred == labels).sum()) / len(labels),  # as divqat.pipelines.defend
            "l1_distance": None, "kl_divergence": None, "argmax_changed": None,
            "adversary_accuracy": top["adversary_accuracy"], "adversary_error": top["adversary_error"],
            "agreement": top["agreement"], "agreement_clean": None,
            "budget": top["budget"], "queries_used": queries_used,
            "attack_seconds": seconds, "results": results,
            "remote": {"url": url, "output": box.output, "key_budget": box.budget,
                       "key_used": box.queries_used, "key_left": box.queries_left,
                       "eval_key": eval_key is not None},
            "left_out": left_out,
            **({"surrogate_files": saved_surrogates} if saved_surrogates else {}),
        }
        if len(boxes) > 1:  # the Sybil thief's keys, each as the service counted it
            record["streams"] = [{"budget": b.budget, "queries_used": b.queries_used - before,
                                  "left": b.queries_left}
                                 for b, before in zip(boxes, used_before, strict=True)]
    finally:
        for b in boxes:
            b.close()
        if evaluator is not None:
            evaluator.close()
    if request.out is not None:
        write_json(Path(request.out) / "metrics.json", record)
    return record


__all__ = ["HOLDOUT", "MARKS", "PREDICTIONS", "THIEF_KEY", "AttackRequest", "ServiceAccess", "attack_loaded", "attack_remote",
           "attack_victim", "labels_changed", "load_transfer_set", "parse_transfer", "predict",
           "prediction_metrics", "surrogate_paths", "surrogate_predictions"]
