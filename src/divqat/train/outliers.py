"""Outliers: unlabeled images outside the victim's training distribution, for a DivQAT aimed at
out-of-distribution queries (``divqat.train.ood``).

The idea is outlier exposure (Hendrycks, Mazeika, Dietterich, "Deep Anomaly Detection with
Outlier Exposure", ICLR 2019): a model trained on an auxiliary set of outliers learns a behaviour
on inputs it was never shown that carries over to unseen out-of-distribution inputs. Here the
behaviour is "answer unlike the fp32 teacher", so a thief whose transfer set is foreign learns
less of the teacher's knowledge, while the training images keep their answers.

Two sources, named by a spec string (``--outliers``, the config's ``outliers``):

- ``synth`` (the default; ``synth:KIND[+KIND...]`` for some kinds only): made from each
  training batch itself, so no extra data is needed. Kinds, one drawn per image:

  ``mix``      the image blended with another image of the batch, weight U(0.35, 0.65) (a
               mixup far from both ends). Partners are drawn at random, **without labels**:
               with K balanced classes a partner is of another class with probability
               (K-1)/K, and a same-class blend is simply a weaker outlier. Not using labels
               keeps every kind usable on any unlabeled batch and guarantees that nothing
               about the outliers can leak a label into the loss.
  ``patches``  the image cut into a 4x4 grid whose patches are shuffled (local texture kept,
               global shape destroyed).
  ``corrupt``  one strong corruption: additive Gaussian noise (std 0.5), inversion (1 - x), or
               a coarse 4x4 mosaic (average-pooled, then enlarged).

- ``NAME[:SPLIT]``: any dataset (class subsets too; split default: train), adapted to the
  victim's input, labels dropped on loading; each batch draws as many random images as the
  training batch holds, with the training augmentation (pad-4 crop, flip).

Every source is deterministic for a seeded ``torch.Generator`` and returns float images in
[0, 1] of the training batch's shape. The set the outliers come from must not be the set a
thief is evaluated with (that would measure memorization of the thief's own queries); the
experiment report names both and warns when they coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from divqat.data import adapt, augment, dataset_spec, load_dataset, to_float
from divqat.errors import ConfigError

SYNTH = "synth"
KINDS = ("mix", "patches", "corrupt")
GRID = 4  # patches: a GRID x GRID grid; corrupt: a GRID x GRID mosaic


def _uniform(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def mix(images: Tensor, generator: torch.Generator, low: float = 0.35, high: float = 0.65) -> Tensor:
    """Each image blended with a randomly drawn other image of the batch (no labels used): a
    random cyclic derangement pairs them, so no image is mixed with itself (a batch of one is
    mixed with its own mirror image)."""
    n = images.shape[0]
    if n == 1:
        partner = images.flip(-1)
    else:
        order = torch.randperm(n, generator=generator, device=generator.device)
        index = torch.empty_like(order)
        index[order] = order.roll(1)
        partner = images[index.to(images.device)]
    weight = _uniform(n, generator, low, high).to(images.device).view(n, 1, 1, 1)
    return weight * images + (1 - weight) * partner


def patch_shuffle(images: Tensor, generator: torch.Generator, grid: int = GRID) -> Tensor:
    """Each image's ``grid`` x ``grid`` patches in a random order of its own. A border that the
    grid does not divide (H or W not a multiple of ``grid``) is left where it is."""
    n, c, h, w = images.shape
    ph, pw = h // grid, w // grid
    if ph == 0 or pw == 0:
        raise ConfigError(f"patch shuffling needs images of at least {grid}x{grid}, got {h}x{w}")
    out = images.clone()
    body = images[:, :, :ph * grid, :pw * grid]
    patches = body.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    order = torch.rand(n, grid * grid, generator=generator, device=generator.device).argsort(dim=1)
    order = order.to(images.device).view(n, grid * grid, 1, 1, 1).expand_as(patches)
    shuffled = patches.gather(1, order)
    out[:, :, :ph * grid, :pw * grid] = (shuffled.reshape(n, grid, grid, c, ph, pw)
                                         .permute(0, 3, 1, 4, 2, 5).reshape(n, c, ph * grid, pw * grid))
    return out


def corrupt(images: Tensor, generator: torch.Generator, noise_std: float = 0.5, grid: int = GRID) -> Tensor:
    """One strong corruption per image: Gaussian noise, inversion, or a coarse mosaic."""
    n, _, h, w = images.shape
    noise = torch.randn(images.shape, generator=generator, device=generator.device).to(images.device)
    noisy = (images + noise_std * noise).clamp(0.0, 1.0)
    inverted = 1.0 - images
    mosaic = F.interpolate(F.adaptive_avg_pool2d(images, (min(grid, h), min(grid, w))), size=(h, w),
                           mode="nearest")
    which = torch.randint(0, 3, (n,), generator=generator, device=generator.device).to(images.device)
    which = which.view(n, 1, 1, 1)
    return torch.where(which == 0, noisy, torch.where(which == 1, inverted, mosaic))


SYNTHESIZERS = {"mix": mix, "patches": patch_shuffle, "corrupt": corrupt}


def synthesize(images: Tensor, generator: torch.Generator, kinds: tuple[str, ...] = KINDS) -> Tensor:
    """Outliers made from a batch of float images (N, C, H, W) in [0, 1]: one kind per image,
    drawn uniformly from ``kinds``. Same shape, dtype and device; values in [0, 1]."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"synthesize needs float images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    made = [SYNTHESIZERS[k](images, generator) for k in kinds]
    if len(made) == 1:
        return made[0]
    which = torch.randint(0, len(kinds), (images.shape[0],), generator=generator, device=generator.device)
    which = which.to(images.device).view(-1, 1, 1, 1)
    out = made[-1]
    for k in range(len(kinds) - 2, -1, -1):
        out = torch.where(which == k, made[k], out)
    return out


# ---------------------------------------------------------------- sources

@dataclass(frozen=True)
class SynthesizedOutliers:
    """``source(images, generator)`` -> outliers made from the training batch ``images``."""

    kinds: tuple[str, ...] = KINDS
    name: str = SYNTH

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return synthesize(images, generator, self.kinds)


class DatasetOutliers:
    """``source(images, generator)`` -> ``len(images)`` random images of a fixed unlabeled set
    (uint8 (M, C, H, W) at the victim's input shape), augmented; ``images`` gives only the count,
    the device and the dtype."""

    def __init__(self, images: Tensor, name: str, pad: int = 4, hflip: bool = True) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
            raise ConfigError(f"outlier set {name}: expected non-empty uint8 images (M, C, H, W), got "
                              f"{images.dtype} {tuple(images.shape)}")
        self.images, self.name, self.pad, self.hflip = images, name, pad, hflip

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        rows = torch.randint(0, len(self.images), (images.shape[0],), generator=generator,
                             device=generator.device).cpu()
        x = to_float(self.images[rows]).to(images.device, images.dtype)
        return augment(x, pad=self.pad, hflip=self.hflip, generator=generator)


OutlierSource = SynthesizedOutliers | DatasetOutliers


def parse_outliers(text: str) -> str:
    """The canonical spelling of an outlier source: ``synth``, ``synth:mix+corrupt`` or a dataset
    ``NAME:SPLIT`` (split default: train). ``ConfigError`` or ``DatasetError`` on a bad one."""
    from divqat.data import SPLITS

    text = str(text).strip()
    head, sep, tail = text.partition(":")
    if head == SYNTH:
        if not sep:
            return SYNTH
        kinds = tuple(k.strip() for k in tail.split("+"))
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds or len(set(kinds)) != len(kinds):
            raise ConfigError(f"bad outlier source {text!r}: after 'synth:' give distinct kinds joined "
                              f"by '+', each one of: {', '.join(KINDS)}")
        return f"{SYNTH}:{'+'.join(kinds)}"
    split = tail.strip() or "train"
    splits = dataset_spec(head).splits if head.strip() else SPLITS
    if not head.strip() or (sep and not tail.strip()) or split not in splits:
        raise ConfigError(f"bad outlier source {text!r}: expected {SYNTH}, {SYNTH}:KIND[+KIND] (kinds: "
                          f"{', '.join(KINDS)}) or a dataset NAME[:SPLIT] (split: {', '.join(splits)})")
    return f"{dataset_spec(head).name}:{split}"


def load_outliers(text: str, input_shape: tuple[int, int, int], *, training_set: str = "the training images",
                  data_root: str | Path | None = None) -> OutlierSource:
    """The outlier source named by ``text`` for a victim of ``input_shape`` (C, H, W). Its ``name``
    says where the outliers come from (for a synthesized source: ``training_set``)."""
    canonical = parse_outliers(text)
    if canonical.startswith(SYNTH):
        kinds = tuple(canonical.partition(":")[2].split("+")) if ":" in canonical else KINDS
        return SynthesizedOutliers(kinds, f"{SYNTH}:{'+'.join(kinds)} of {training_set}")
    name, split = canonical.rsplit(":", 1)
    data = load_dataset(name, split, data_root)  # labels are not kept past this line
    x = adapt(to_float(data.images), input_shape[0], input_shape[1:]).clamp_(0.0, 1.0)
    return DatasetOutliers(x.mul_(255).round_().to(torch.uint8), canonical)


__all__ = ["KINDS", "SYNTH", "SYNTHESIZERS", "DatasetOutliers", "OutlierSource", "SynthesizedOutliers",
           "corrupt", "load_outliers", "mix", "parse_outliers", "patch_shuffle", "synthesize"]
