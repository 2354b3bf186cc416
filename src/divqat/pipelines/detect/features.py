"""The defender's own fp32 model, as the feature space of the feature detectors (mmd), kept
with the victim in ``VICTIM/detectors/features.pt`` so the victim directory carries everything
its detectors need."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from divqat.errors import ArtifactError, ConfigError
from divqat.io import atomic_write
from divqat.models import penultimate
from divqat.train.losses import frozen_forward
from divqat.victim import load_fp32_net, victim_metadata

DETECTORS_DIR = "detectors"
FEATURES = "features.pt"


class _Penultimate(nn.Module):
    """The fp32 victim net's normalization and layers up to its last one, as one module (any
    architecture: ``divqat.models.penultimate``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.normalize = net.normalize
        self.features = penultimate(net.net)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.normalize(x))


class FeatureExtractor:
    """The defender's fp32 model up to its last layer: images float32 (N, C, H, W) in [0, 1] ->
    features (N, F), computed without gradients in chunks. Inference only: its BatchNorms are
    folded into the convolutions before them (``frozen_forward``), and it runs channels_last
    (1.4-1.7x for these convolutions on this CPU, environment notes): a watched query pays
    for this forward pass and nearly nothing else (docs/results.md, "Per-query cost")."""

    def __init__(self, net: nn.Module) -> None:
        if not isinstance(getattr(net, "net", None), nn.Module) or not hasattr(net, "normalize"):
            raise ArtifactError(f"the fp32 model {type(net).__name__} is not a VictimNet "
                                "(normalization + net)")
        try:
            extractor = _Penultimate(net.eval())
        except ConfigError as exc:
            raise ArtifactError(f"the fp32 model has no penultimate layer to watch: {exc}") from None
        self.net = frozen_forward(extractor).eval().to(memory_format=torch.channels_last)

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



__all__ = ["DETECTORS_DIR", "FEATURES", "FeatureExtractor", "detectors_dir", "load_features",
           "save_features"]
