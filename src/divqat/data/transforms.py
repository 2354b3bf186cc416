"""Batched tensor transforms: uint8 -> float, shape adaptation between datasets, normalization,
training augmentation. The one place where pixel statistics and input shapes are handled."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (Pillow's "L" uses them too).
LUMA_601 = (0.299, 0.587, 0.114)


STATS_SAMPLE = 10_000
"""Images a statistics estimate decodes from a lazy image folder (``channel_stats(sample=)``):
the mean and std of 10,000 images are within about 1e-3 of the full set's, at a fraction of
an epoch's decoding."""

STATS_SEED = 0
"""Seed of that sample: part of the recipe, so a victim's recorded mean/std are repeatable."""

_CHUNK_BYTES = 128 * 1024**2  # float64 per chunk; 4096 images of 32x32 RGB fit (96 MiB)


def channel_stats(images: np.ndarray | Tensor, chunk: int = 4096, sample: int | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 images (N, C, H, W), in [0, 1] units.

    Sums run in float64 over chunks of at most ``chunk`` images (fewer for large images: at most
    128 MiB of float64 at a time), so 60k images need no float copy of the whole set. std is the
    population one (ddof=0), as normalization layers use.
    sample: estimate from a fixed seeded subset of at most this many images (``STATS_SAMPLE``
    for lazy image folders, whose full pass would decode every file); None uses them all.
    images may be anything indexable like a uint8 array (``divqat.data.streaming.FolderImages``).
    """
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"channel_stats needs a non-empty uint8 (N, C, H, W) batch, got "
                         f"{images.dtype} {images.shape}")
    n, c, h, w = images.shape
    rows: np.ndarray | None = None  # None: every row, sliced (no index copy)
    if sample is not None and sample < n:
        if sample < 1:
            raise ValueError(f"channel_stats needs sample >= 1, got {sample}")
        # Sorted, so a lazy folder reads its files in directory order.
        rows = np.sort(np.random.default_rng(STATS_SEED).choice(n, sample, replace=False))
    count_rows = n if rows is None else len(rows)
    chunk = max(1, min(chunk, _CHUNK_BYTES // (c * h * w * 8)))
    total = np.zeros(c)
    squares = np.zeros(c)
    for start in range(0, count_rows, chunk):
        batch = images[start:start + chunk] if rows is None else images[rows[start:start + chunk]]
        x = batch.astype(np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
    count = count_rows * h * w
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def to_float(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (N, C, H, W), numpy or torch -> float32 tensor in [0, 1], same device."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.float().div_(255.0)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def adapt(x: Tensor, channels: int, size: int | Sequence[int]) -> Tensor:
    """Make float images (N, C, H, W) fit a victim's input: (N, channels, *size).

    Gray -> RGB repeats the channel; RGB -> gray takes BT.601 luma. A smaller image is
    zero-padded centrally (28x28 -> 32x32 pads 2 on each side: nothing is resampled); anything
    else is resized with antialiased bilinear interpolation. Returns ``x`` itself when it
    already fits.
    """
    height, width = _pair(size)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or channels not in (1, 3):
        raise ValueError(f"adapt maps (N, 1 or 3, H, W) to 1 or 3 channels; got {tuple(x.shape)} "
                         f"-> {channels}")
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 3 and channels == 1:
        weights = x.new_tensor(LUMA_601).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if h <= height and w <= width:
        top, left = (height - h) // 2, (width - w) // 2
        return F.pad(x, (left, width - w - left, top, height - h - top))
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)


class Normalize(nn.Module):
    """(x - mean) / std per channel on (N, C, H, W); mean and std are buffers (1, C, 1, 1), so
    they travel with the model's state_dict and export as constants (torch.export-traceable)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"Normalize needs one positive std per mean, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = ", ".join
        return (f"mean=({fmt(f'{m:.4f}' for m in self.mean.flatten().tolist())}), "
                f"std=({fmt(f'{s:.4f}' for s in self.std.flatten().tolist())})")


def augment(x: Tensor, pad: int = 4, hflip: bool = True,
            generator: torch.Generator | None = None) -> Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, on a batch.

    x: (N, C, H, W), any dtype. Each image is zero-padded by ``pad`` on every side and cropped
    back to (H, W) at a random offset; with ``hflip`` it is also mirrored with probability 0.5
    (pass hflip=False for digits and signs, where a mirror changes the meaning). Both are done
    as one gather, no loop over samples. Deterministic for a seeded ``generator``, whose device
    draws the random numbers.
    """
    if pad == 0 and not hflip:
        return x
    n, c, h, w = x.shape
    device = generator.device if generator is not None else x.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
        rows = rows + torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device)
        cols = cols + torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device)
    if hflip:
        mirrored = torch.rand(n, 1, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    x = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, x.shape[3]))
    return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def random_resized_crop(x: Tensor, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                        generator: torch.Generator | None = None) -> Tensor:
    """Random resized crop and random horizontal flip, per sample, on a float batch (N, C, H, W).

    The augmentation of ImageNet-style training (Szegedy et al., 2015, "Going deeper with
    convolutions"; torchvision's RandomResizedCrop) for images large enough that a 4 px
    pad-crop barely moves them (``augment``): each image is cut to a box covering a fraction in
    ``scale`` of its area with aspect ratio (w/h) log-uniform in ``ratio``, placed uniformly
    inside it, and resized back to (H, W), mirrored with probability 0.5 when ``hflip``. All N
    boxes are one affine grid and one bilinear ``grid_sample``, no loop over samples.
    Deterministic for a seeded ``generator``, whose device draws the random numbers.

    Deviation: torchvision redraws a box that does not fit (up to 10 times, then a center crop);
    here a side that would exceed the image is clipped to it, which keeps the draws a fixed count
    per sample (so the batch stays one vectorized call) at the price of slightly squarer boxes
    at the ends of ``ratio`` and ``scale``.
    """
    if not x.is_floating_point():
        raise TypeError(f"random_resized_crop needs float images, got {x.dtype}")
    n, _, h, w = x.shape
    device = generator.device if generator is not None else x.device

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    # Box sides as fractions of the image's: (bw * W) / (bh * H) = aspect, bw * bh = area.
    bw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
    bh = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    # Centers in grid_sample's [-1, 1] coordinates, anywhere the box stays inside the image.
    cx = (1 - bw) * uniform(-1.0, 1.0)
    cy = (1 - bh) * uniform(-1.0, 1.0)
    sign = torch.ones(n, device=device)
    if hflip:
        sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = bw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = bh, cy
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_victim_input(images: np.ndarray | Tensor, shape: Sequence[int]) -> Tensor:
    """uint8 or float (N, C, H, W) images -> float32 in [0, 1] at a victim's input ``shape``
    (C, H, W), through ``adapt``. Resizing can overshoot [0, 1] by a rounding error, which the
    black box refuses, so the result is clamped."""
    x = torch.as_tensor(images)
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    return adapt(x, shape[0], shape[1:]).clamp_(0.0, 1.0)


def check_victim_input(images: Tensor, shape: Sequence[int]) -> Tensor:
    """What a victim's forward pass takes: a float tensor (N, C, H, W) at its input ``shape``
    (C, H, W), returned as float32. Anything else raises ``TypeError`` / ``ValueError`` naming the
    conversion to use (``adapt``, ``to_float``)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"victim input must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"victim input must have shape (N, {', '.join(map(str, shape))}), "
                         f"got {tuple(images.shape)}; adapt images with divqat.data.adapt")
    if not images.is_floating_point():
        raise ValueError(f"victim input must be float in [0, 1], got {images.dtype} "
                         "(convert uint8 images with divqat.data.to_float)")
    return images.float()
