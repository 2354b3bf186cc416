"""One training loop for every mode (fp32, QAT, DivQAT) and for surrogates later on.

The modes differ only in the model handed in (an ``nn.Module`` or a PT2E fake-quant
``QATModel``) and in the objective (``CrossEntropy`` or ``DivQATLoss``). SGD with Nesterov
momentum, one-cycle or cosine schedule, batched tensor augmentation of uint8 images kept in
memory, channels_last; optionally bf16 autocast (``FitConfig.precision``) where the CPU has it.
Image folders too large for memory (lazy ``FolderImages``) are decoded batch by batch in
DataLoader worker processes, in the very batches the in-memory path would take.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from divqat.data import augment, is_lazy, random_resized_crop, to_float
from divqat.errors import ConfigError, TrainingCollapsed
from divqat.stopwatch import phase, timed

SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
CROPS = ("auto", "pad", "resized")
PRECISE_BN = ("auto", "on", "off")
PRECISE_BN_IMAGES = 2048
"""Training images (at most) whose statistics PreciseBN gives the BatchNorm layers."""
RESIZED_CROP_FROM = 64
"""Shorter side (px) from which crop="auto" picks the random resized crop over the pad-crop."""


@functools.cache
def bf16_supported() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN with AVX512-BF16 or AMX): only
    then is bf16 autocast faster than fp32; elsewhere it emulates bf16 and is slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: str = "cpu") -> str:
    """The precision training really runs in: ``bf16`` falls back to ``fp32`` on a CPU without
    native bf16 (a GPU device is trusted to have it)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if requested == "bf16" and torch.device(device).type == "cpu" and not bf16_supported():
        return "fp32"
    return requested


@dataclass
class FitConfig:
    """Knobs of the loop. Defaults are the fp32 recipe (algorithms.md, sections 1 and 5)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    augment: bool = True
    pad: int = 4
    hflip: bool = True
    # "pad": pad-crop by ``pad`` px (``augment``); "resized": random resized crop
    # (``random_resized_crop``); "auto": resized from RESIZED_CROP_FROM px on the shorter side,
    # pad below (every 28/32 px set, whose batches stay what they were).
    crop: str = "auto"
    seed: int = 0
    # Fraction of the steps after which QAT freezes observers and BatchNorm statistics.
    freeze_at: float | None = None
    device: str = "cpu"
    channels_last: bool = True
    # "bf16": forward passes under torch.autocast(bfloat16); the loss, the gradients' accumulation
    # and the weights stay fp32. Falls back to fp32 where the CPU lacks bf16 (resolve_precision).
    precision: str = "fp32"
    progress: bool = True  # progress bars (only ever drawn on a terminal)
    log_epochs: bool = True  # one summary line per epoch
    desc: str = "train"
    # DataLoader worker processes decoding lazy images (None: min(4, CPUs); 0: in this process).
    workers: int | None = None
    # PreciseBN (``precise_bn``) before every evaluation and at the end: "auto" where some
    # BatchNorm keeps running statistics with momentum below 0.1 (torchvision's MobileNetV3: 0.01),
    # whose averages trail the weights so far that the eval-mode model can answer one class.
    precise_bn: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.freeze_at is not None and not 0 <= self.freeze_at <= 1:
            raise ConfigError(f"freeze_at must be a fraction in [0, 1], got {self.freeze_at}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.precise_bn not in PRECISE_BN:
            raise ConfigError(f"unknown precise_bn {self.precise_bn!r}; choose one of: {', '.join(PRECISE_BN)}")
        if self.crop not in CROPS:
            raise ConfigError(f"unknown crop {self.crop!r}; choose one of: {', '.join(CROPS)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


def resolve_crop(crop: str, size: tuple[int, int]) -> str:
    """The augmentation crop for images of ``size`` (H, W): "auto" -> "resized" from
    RESIZED_CROP_FROM px on the shorter side, else "pad"."""
    if crop != "auto":
        return crop
    return "resized" if min(size) >= RESIZED_CROP_FROM else "pad"


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# --- streaming lazy images ------------------------------------------------------------------------
# Lazy images (divqat.data.streaming) are decoded in DataLoader workers, but the order of the
# batches and the augmentation stay in the main process with the one seeded generator: the
# sampler hands out exactly the chunks of the torch.randperm the in-memory path draws, and the
# workers only turn those indices into uint8 arrays. So a streamed folder trains on the same
# batches, augmented the same way, as the same folder held in memory (determinism across paths,
# tested). Decoding and resizing files is the expensive part worth spreading over processes; the
# batched gather or grid_sample augmentation is cheap, and moving it to workers would split the
# random stream over processes.


class _Chunks(torch.utils.data.Sampler):
    """The index chunks of ``order``, ``batch_size`` at a time; ``order`` is set per epoch (the
    sampler runs in the main process, also with persistent workers)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.order = torch.empty(0, dtype=torch.int64)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start:start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)


class _Decoded(torch.utils.data.Dataset):
    """``images[chunk]`` as a uint8 tensor: one item is one whole batch, decoded in a worker."""

    def __init__(self, images) -> None:
        self.images = images

    def __getitem__(self, chunk: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.images[chunk.numpy()])

    def __len__(self) -> int:
        return len(self.images)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def wants_precise_bn(model: nn.Module, mode: str) -> bool:
    """Whether ``fit`` recomputes ``model``'s BatchNorm statistics under ``FitConfig.precise_bn``:
    "on" for any BatchNorm, "auto" where one has a momentum below 0.1, "off" never. A PT2E
    fake-quant graph holds no BatchNorm modules (its statistics are frozen by ``freeze_at``)."""
    norms = _batchnorms(model)
    if mode == "on":
        return bool(norms)
    return mode == "auto" and any(m.momentum is not None and m.momentum < 0.1 for m in norms)


@torch.no_grad()
def precise_bn(model: nn.Module, images, batch_size: int = 64, limit: int = PRECISE_BN_IMAGES,
               generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> int:
    """PreciseBN (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021, sec. 3): replace every
    BatchNorm layer's running mean and variance by their average over up to ``limit`` training
    images (default 2,048; un-augmented, in batches of ``batch_size``) at the current weights.

    An exponential moving average with a small momentum (0.01 in torchvision's MobileNetV3) mixes
    statistics of weights hundreds of steps old; a model trained from scratch at a high learning
    rate then evaluates far below its training accuracy (measured: 11.6 % test, 69 % train, for
    MobileNetV3-Small after 10 epochs on a 10-class 64 px folder; 71.2 % test after PreciseBN).
    images: uint8 or float (N, C, H, W), or lazy ``FolderImages``. Returns the images used.
    The model's train/eval mode and each layer's momentum are restored."""
    norms = _batchnorms(model)
    if not norms:
        return 0
    n = min(len(images), limit)
    order = torch.randperm(len(images), generator=generator)[:n].sort().values
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    try:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = torch.as_tensor(images[idx])
            x = to_float(x) if x.dtype == torch.uint8 else x.float()
            model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return n


def _loader(images, sampler: _Chunks, workers: int | None) -> torch.utils.data.DataLoader:
    workers = default_workers() if workers is None else workers
    if multiprocessing.current_process().daemon:
        workers = 0  # a daemonic process (a multiprocessing.Pool worker) may not start children
    # batch_size=None: the sampler's chunks are the batches, nothing is collated.
    return torch.utils.data.DataLoader(_Decoded(images), sampler=sampler, batch_size=None,
                                       num_workers=workers, persistent_workers=workers > 0)


@dataclass
class History:
    """Per-epoch means of the objective's logs plus whatever ``on_epoch_end`` returned."""

    epochs: list[dict] = field(default_factory=list)
    precision: str = "fp32"  # what the forward passes ran in (after any fallback)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the peak learning rate at ``step`` of ``total``.

    onecycle: linear warm-up from 0.1x over the first quarter, then cosine down to 0.001x
    (the shape of Smith's one-cycle policy, written out so that it also works for a handful of
    steps). cosine: cosine from 1x to 0. constant: 1x.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    warmup = max(1, round(0.25 * total))
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * done))


def _schedule(optimizer, cfg: FitConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(cfg.schedule, step, total_steps))


@timed("train")
def fit(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    objective: Callable,
    cfg: FitConfig,
    on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
) -> History:
    """Train ``model`` in place.

    images: uint8 (N, C, H, W) at the model's input size, or float in [0, 1] (queries an attack
    synthesized); the model normalizes internally. Lazy uint8 images (``FolderImages``) are
    decoded in ``cfg.workers`` processes, giving the same batches as in memory.
    targets: int64 labels (N,) or float posteriors (N, K) (soft labels for surrogates); the
    objective decides what they mean. objective(logits, targets, inputs, progress) -> (loss, logs).
    An objective with a method ``extra_inputs(images, generator) -> images or None`` (outliers,
    ``divqat.train.ood``) gets those images appended after each batch in the same forward pass:
    it then receives N + M rows of logits and inputs for N targets. It is never shown targets.
    A NaN or infinite loss stops training with ``TrainingCollapsed``.
    """
    device = torch.device(cfg.device)
    lazy = is_lazy(images)
    if not lazy:
        images = torch.as_tensor(images)
    targets = torch.as_tensor(targets)
    n = images.shape[0]
    crop = resolve_crop(cfg.crop, tuple(images.shape[-2:]))
    if n == 0:
        raise ConfigError("no training images")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, cfg, total_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    extra_inputs = getattr(objective, "extra_inputs", None)
    # Never freeze before the first step: the observers must have seen data to hold ranges.
    freeze_step = None if cfg.freeze_at is None else max(1, int(cfg.freeze_at * total_steps))
    precision = resolve_precision(cfg.precision, cfg.device)
    history = History(precision=precision)
    sampler = _Chunks(cfg.batch_size)
    recompute_bn = wants_precise_bn(model, cfg.precise_bn)
    bn_generator = torch.Generator().manual_seed(cfg.seed + 1)
    # One loader per fit call; its workers persist across epochs and end with it.
    loader = _loader(images, sampler, cfg.workers) if lazy else None

    def autocast():
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        if loader is not None:
            sampler.order = order
            batches = iter(loader)
        sums: dict[str, float] = {}
        correct = 0
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}",
                   disable=None if cfg.progress else True, leave=False, dynamic_ncols=True)
        for b in bar:
            if freeze_step is not None and step == freeze_step and hasattr(model, "freeze"):
                model.freeze()
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = next(batches) if loader is not None else images[idx]
            x = to_float(x) if x.dtype == torch.uint8 else x.float()
            if cfg.augment and crop == "resized":
                x = random_resized_crop(x, hflip=cfg.hflip, generator=generator)
            elif cfg.augment:
                x = augment(x, pad=cfg.pad, hflip=cfg.hflip, generator=generator)
            if extra_inputs is not None:
                more = extra_inputs(x, generator)  # images only: the labels stay here
                if more is not None and len(more):
                    x = torch.cat([x, more.to(x.dtype)])
            x = x.to(device, memory_format=memory_format)
            y = targets[idx].to(device)
            with autocast():
                logits = model(x)
            # The objective in fp32 (a DivQAT teacher's forward pass runs in fp32 too).
            loss, logs = objective(logits.float(), y, x, step / total_steps)
            if not torch.isfinite(loss):
                raise TrainingCollapsed(
                    f"{cfg.desc}: the loss became {loss.item()} at epoch {epoch + 1}, step {b + 1}; "
                    "nothing was saved. Lower alpha or the learning rate, or bound the divergence "
                    "(--divergence js, --cap, --ramp)."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            hard = y if y.ndim == 1 else y.argmax(dim=1)
            correct += int((logits.detach()[:len(idx)].argmax(dim=1) == hard).sum())
            seen = min((b + 1) * cfg.batch_size, n)
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()} | {"acc": f"{correct / seen:.3f}"})
        bar.close()
        record = {"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}, "train_accuracy": correct / n}
        if recompute_bn and (on_epoch_end is not None or epoch + 1 == cfg.epochs):
            with phase("precise_bn"):
                precise_bn(model, images, cfg.batch_size, generator=bn_generator, device=device)
        if on_epoch_end is not None:
            with phase("evaluate"):
                record.update(on_epoch_end(epoch, model))
        history.epochs.append(record)
        if cfg.log_epochs:
            tqdm.write(f"{cfg.desc} epoch {epoch + 1}/{cfg.epochs}: "
                       + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
    return history


@torch.no_grad()
def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray | torch.Tensor,
                   batch_size: int = 512, device: str = "cpu", channels_last: bool = False,
                   workers: int | None = None) -> torch.Tensor:
    """Logits (N, K) on the CPU for uint8 images (N, C, H, W); ``model`` is called in chunks as is
    (put it in eval mode first). Lazy images are decoded in ``workers`` processes (None:
    min(4, CPUs)), in the same chunks."""
    out = []
    if is_lazy(images):
        sampler = _Chunks(batch_size)
        sampler.order = torch.arange(images.shape[0])
        chunks = iter(_loader(images, sampler, workers))
    else:
        images = torch.as_tensor(images)
        chunks = (images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))
    with phase("evaluate"):
        for chunk in chunks:
            x = to_float(chunk).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")
