"""Batched tensor transforms: uint8 -> float, shape adaptation between datasets, normalization,
training augmentation. The one place where pixel statistics and input shapes are handled."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (Pillow's "L" uses them too).
LUMA_601 = (0.299, 0.587, 0.114)


def channel_stats(images: np.ndarray | Tensor, chunk: int = 4096
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 images (N, C, H, W), in [0, 1] units.

    Sums run in float64 over chunks of ``chunk`` images, so 60k images need no float copy of
    the whole set. std is the population one (ddof=0), as normalization layers use.
    """
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"channel_stats needs a non-empty uint8 (N, C, H, W) batch, got "
                         f"{images.dtype} {images.shape}")
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].astype(np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
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
