"""Build a defense for a saved victim, including the model that some defenses run.

Most defenses are a formula on the posteriors and come from ``create_defense`` alone. Two run a
model of their own (they declare it: ``Defense.model_param``, ``trains_model``), which is built
here from the victim artifact:

- ``adaptive-misinformation``: a misinformation model of the victim's architecture and
  normalization, trained with ``misinformation_loss`` on the images the victim was trained on
  (Kariyappa & Qureshi, CVPR 2020). Trained on first use, saved in ``VICTIM/misinformation/`` as an
  fp32 artifact, and reused from there.
- ``mad``: a randomly initialized, seeded surrogate of the victim's architecture, as in the
  reference code of Orekondy et al. (ICLR 2020). Nothing to save: the seed rebuilds it.

The evaluation (``divqat defend``) and the attacks build their defense through ``build_defense``,
so both serve the same one::

    >>> defense = build_defense("dcp", {"beta": 0.5}, "runs/qat")
    >>> defense = build_defense("adaptive-misinformation", {"tau": 0.5}, "runs/qat",
    ...                         misinformation_epochs=5)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from divqat.checks import check_int
from divqat.data import ImageDataset, load_dataset, training_split
from divqat.defenses.adaptive_misinformation import misinformation_loss
from divqat.defenses.base import DEFENSES, Defense, check_defense, create_defense, describe_defenses
from divqat.errors import ArtifactError, ConfigError, DatasetError
from divqat.io import write_json
from divqat.models import build_net
from divqat.quant import export_dynamic
from divqat.train.trainer import FitConfig, accuracy, fit, predict_logits
from divqat.victim import VICTIM_KEYS, load_fp32_net, provenance, save_victim, victim_metadata

MISINFORMATION_DIR = "misinformation"
MISINFORMATION_ROLE = "misinformation-model"


class MisinformationObjective:
    """``misinformation_loss`` as a ``fit`` objective: drives the true class's probability to 0."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                 progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = misinformation_loss(logits, labels)
        return loss, {"loss": loss.detach()}


def _fingerprint(victim_dir: Path) -> str:
    """Identifies the victim a misinformation model was trained for: a retrained victim gets a
    new victim.json (its metrics and history differ), hence a new fingerprint."""
    return hashlib.sha256((victim_dir / "victim.json").read_bytes()).hexdigest()


def _seeded_net(meta: dict, seed: int) -> nn.Module:
    # Seeded without touching the caller's global random state.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_net(meta)


def random_surrogate(victim_dir: str | Path, seed: int = 0) -> nn.Module:
    """MAD's surrogate: the victim's architecture and normalization, randomly initialized from
    ``seed`` (as in the reference code), in eval mode. Its last layer ``net.fc`` is the
    ``nn.Linear`` MAD differentiates through."""
    return _seeded_net(victim_metadata(victim_dir), seed).eval()


def victim_training_images(meta: dict, data_root: str | Path | None = None) -> ImageDataset:
    """The images the victim was trained on (``training_split`` with its holdout and limit)."""
    train = load_dataset(meta["dataset"], "train", data_root)
    n = meta.get("train_images")
    try:
        trained = training_split(train, int(meta.get("holdout") or 0), meta.get("limit"))[0]
    except ConfigError:
        trained = None
    if trained is None or (n is not None and len(trained) != n):
        raise DatasetError(f"the victim was trained on {n} images of {meta['dataset']} but its "
                           f"training split now has {len(train)}; is --data-root the same dataset?")
    return trained


def misinformation_model_dir(victim_dir: str | Path) -> Path:
    """Where the misinformation model of a victim is kept: ``VICTIM/misinformation/``."""
    return Path(victim_dir) / MISINFORMATION_DIR


def train_misinformation_model(victim_dir: str | Path, epochs: int = 5, seed: int = 0, *,
                               data_root: str | Path | None = None, batch_size: int = 128,
                               lr: float = 0.1, device: str = "cpu", progress: bool = True) -> Path:
    """Train the misinformation model of a victim and save it in ``VICTIM/misinformation/``.

    The model has the victim's architecture and normalization, starts from ``seed`` and is
    trained with ``misinformation_loss`` (-log(1 - p_y + 1e-12)) on the victim's own training
    images with the fp32 recipe (SGD Nesterov, one-cycle at peak ``lr``, crop and, where the
    dataset allows, flip augmentation). Saved through ``save_victim`` as an fp32 artifact whose
    metadata says ``"role": "misinformation-model"``, with its test accuracy (near 0 when it
    works) and the fingerprint of the victim it belongs to. Returns the directory.
    """
    victim_dir = Path(victim_dir)
    meta = victim_metadata(victim_dir)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule="onecycle",
                    hflip=bool(meta.get("hflip", False)), seed=seed, device=device,
                    progress=progress, log_epochs=progress, desc="misinformation")
    train = victim_training_images(meta, data_root)
    test = load_dataset(meta["dataset"], "test", data_root)
    model = _seeded_net(meta, seed)
    start = time.perf_counter()
    fit(model, train.images, train.labels, MisinformationObjective(), cfg)
    seconds = time.perf_counter() - start
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    test_accuracy = accuracy(predict_logits(model, test.images), test.labels)

    metadata = {
        **{k: meta[k] for k in VICTIM_KEYS},
        "mode": "fp32",
        "role": MISINFORMATION_ROLE,
        "loss": "misinformation: -log(1 - p_y + 1e-12)",
        "victim": str(victim_dir),
        "victim_fingerprint": _fingerprint(victim_dir),
        "hflip": cfg.hflip,
        "seed": seed,
        "epochs": epochs,
        "train_images": len(train),
        "lr": lr,
        "schedule": cfg.schedule,
        "versions": provenance(),
        "metrics": {"test_accuracy": test_accuracy, "train_seconds": seconds},
    }
    out = misinformation_model_dir(victim_dir)
    example = torch.rand(2, *meta["input_shape"])
    try:
        save_victim(out, export_dynamic(model, example), metadata, model.state_dict())
        write_json(out / "metrics.json", metadata["metrics"])
    except OSError as e:
        raise ArtifactError(f"cannot save the misinformation model in {out}: {e}") from e
    return out


def load_misinformation_model(victim_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The saved misinformation model of a victim (eval mode) and its metadata.

    Raises ``ArtifactError`` when there is none, it is damaged, or it belongs to another
    version of the victim (the victim was retrained since).
    """
    where = misinformation_model_dir(victim_dir)
    model, meta = load_fp32_net(where)
    if meta.get("role") != MISINFORMATION_ROLE:
        raise ArtifactError(f"{where} is not a misinformation model (role {meta.get('role')!r})")
    if meta.get("victim_fingerprint") != _fingerprint(Path(victim_dir)):
        raise ArtifactError(f"the misinformation model in {where} was trained for an earlier "
                            "version of this victim; retrain it")
    return model.to(device).eval(), meta


def ensure_misinformation_model(victim_dir: str | Path, epochs: int = 5, seed: int = 0, *,
                                retrain: bool = False, data_root: str | Path | None = None,
                                device: str = "cpu", progress: bool = True,
                                log: Callable[[str], None] | None = None) -> tuple[nn.Module, bool]:
    """The victim's misinformation model, trained and saved first if there is none yet (or it is
    stale, damaged, or ``retrain`` is set). Returns ``(model, trained_now)``.

    An existing model is reused as it is, whatever ``epochs`` and ``seed`` say; ``log`` (e.g.
    ``print``) hears which one is used, or that one is being trained.
    """
    say = log or (lambda message: None)
    where = misinformation_model_dir(victim_dir)
    # Stages of one victim may run at the same time (`divqat run --executor ray`): the first to
    # get here trains the model, the others wait for it and load it.
    with _locked(Path(victim_dir) / f"{MISINFORMATION_DIR}.lock"):
        if not retrain and (where / "victim.json").is_file():
            try:
                model, meta = load_misinformation_model(victim_dir, device)
            except ArtifactError as e:
                say(f"retraining the misinformation model: {e}")
            else:
                note = ""
                if (meta.get("epochs"), meta.get("seed")) != (epochs, seed):
                    note = (f"; it was trained for {meta.get('epochs')} epochs with seed "
                            f"{meta.get('seed')} (retrain to use other settings)")
                say(f"using the misinformation model in {where}{note}")
                return model, False
        say(f"training a misinformation model for {where.parent} ({epochs} epochs, seed {seed}); "
            f"it is saved in {where} and reused afterwards")
        train_misinformation_model(victim_dir, epochs, seed, data_root=data_root, device=device,
                                   progress=progress)
        model, _ = load_misinformation_model(victim_dir, device)
        return model, True


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (created if need be) for the block; blocks until free. In a
    folder this process cannot write there is nothing to lock (and nothing to train into)."""
    try:
        handle = open(path, "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_defense(name: str, params: dict[str, Any] | None = None,
                  victim_dir: str | Path | None = None, *, seed: int = 0,
                  misinformation_epochs: int = 5, retrain_misinformation: bool = False,
                  data_root: str | Path | None = None, device: str = "cpu", progress: bool = True,
                  log: Callable[[str], None] | None = None) -> Defense:
    """A registered defense for the victim in ``victim_dir``, with the model it runs, if any.

    Arguments:
        name (str): the registry name ("dcp", "top-k", "mad", ...).
        params (dict, optional): the defense's parameters, e.g. from ``parse_params``; unknown
            names and out-of-range values are ``ConfigError``, raised before any model is
            trained. The model argument a model-backed defense declares (``model_param``:
            ``misinformation_model``, ``surrogate``) is built here and cannot be passed.
            (Default: None, the defense's defaults.)
        victim_dir (path, optional): the victim artifact; required by model-backed defenses.
        seed (int): seed of the model built (MAD's surrogate; the misinformation model's
            initialization and batches). (Default: 0.)
        misinformation_epochs (int), retrain_misinformation (bool): see
            ``ensure_misinformation_model``. (Defaults: 5, False.)
        data_root, device, progress, log: where the victim's dataset is; where the model runs;
            progress bars while training; a callable told what is happening (e.g. ``print``).
    """
    params = dict(params or {})
    cls = check_defense(name, params)  # every parameter checked before minutes of training
    if cls.model_param is None:
        return create_defense(name, **params)
    if victim_dir is None:
        raise ConfigError(f"defense {name!r} runs a model built from the victim: give the victim "
                          "directory")
    seed = check_int("", "seed", seed)
    victim_metadata(victim_dir)
    if cls.trains_model:
        check_int("", "misinformation epochs", misinformation_epochs, low=1)
        model, _ = ensure_misinformation_model(victim_dir, misinformation_epochs, seed,
                                               retrain=retrain_misinformation, data_root=data_root,
                                               device=device, progress=progress, log=log)
    else:
        model = random_surrogate(victim_dir, seed).to(device)
    return create_defense(name, **{cls.model_param: model}, **params)


def list_defenses() -> list[dict[str, Any]]:
    """Every registered defense as ``{"name", "summary", "params": {name: default}, "model"}``;
    ``params`` are the ones a user sets, ``model`` says what model ``build_defense`` makes for it
    (None for a formula on the posteriors)."""
    rows = []
    for name, summary, defaults in describe_defenses():
        cls = DEFENSES.get(name)
        rows.append({"name": name, "summary": summary,
                     "params": {k: v for k, v in defaults.items() if k != cls.model_param},
                     "model": cls.model_help or None})
    return rows


__all__ = [
    "MISINFORMATION_DIR",
    "MisinformationObjective",
    "build_defense",
    "ensure_misinformation_model",
    "list_defenses",
    "load_misinformation_model",
    "misinformation_model_dir",
    "random_surrogate",
    "train_misinformation_model",
    "victim_training_images",
]
