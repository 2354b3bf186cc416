"""A window MMD test on the defender's own fp32 features (after Pal et al., "Stateful Detection
of Model Extraction Attacks", VarDetect, arXiv 2107.05166, 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from divqat.checks import check_int, check_number
from divqat.detectors.base import DETECTORS, Detector


def median_bandwidth(reference: Tensor, sample: int = 1000) -> float:
    """The median heuristic: the median pairwise distance of (up to ``sample``) reference rows."""
    x = reference[:sample].double()
    d = torch.cdist(x, x)
    off = d[~torch.eye(len(x), dtype=torch.bool)]
    value = float(off.median()) if off.numel() else 1.0
    return value if value > 0 else 1.0


def rbf_mean(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """mean_ij exp(-gamma ||a_i - b_j||^2), in float64."""
    return torch.exp(torch.cdist(a, b).square_().mul_(-gamma)).mean()


@DETECTORS.register("mmd")
class MMD(Detector):
    """MMD: a client's last queries against benign ones, in the defender's own feature space.

    After Pal, Gupta, Kanade, Shevade, "Stateful Detection of Model Extraction Attacks"
    (VarDetect, arXiv 2107.05166, 2021): encode the queries, and compare the distribution of a
    client's queries with that of benign queries by the maximum mean discrepancy. Here the
    encoder is the defender's own fp32 model (the victim's teacher: the 64 features before its
    last layer) instead of VarDetect's separately trained VAE, and the test runs on a sliding
    window::

        X = features of the client's last ``window`` queries,  R = features of benign images
        MMD^2 = mean k(X, X) + mean k(R, R) - 2 mean k(X, R),   k(a, b) = exp(-|a - b|^2 / (2 s^2))

    (the biased estimate; s by the median heuristic on R). MMD^2 > threshold raises the alarm.
    Natural in-distribution queries land where the benign images do; out-of-distribution
    transfer sets, synthetic and generator queries do not. R, s and the threshold (for a target
    false-alarm rate on benign streams) come from ``divqat calibrate``, kept with the victim.

    Arguments:
        features (callable): images (N, C, H, W) float32 in [0, 1] -> (N, F) features; built by
            divqat from the victim. (Default: None, built by divqat.)
        reference (Tensor): benign features (R, F); built by ``divqat calibrate``.
        threshold (float, optional): alarm above this MMD^2. (Default: None: scores only, no
            alarm before calibration.)
        window (int): queries per test, >= 2. (Default: 256.)
        check_every (int): queries between tests, >= 1. (Default: 32.)
        bandwidth (float, optional): the kernel's s. (Default: None, the median heuristic on R.)

    Shape:
        observe(images (N, C, H, W), answers (N, K)) -> Verdict; score = MMD^2 (higher:
        suspicious); the first test once ``window`` queries were seen.

    Example::
        >>> mmd = MMD(features=teacher_features, reference=benign_features, threshold=0.02)
        >>> verdict = mmd.observe(images, posteriors)
    """

    name = "mmd"
    alarm_when = "above"
    threshold_param = "threshold"
    model_param = "features"
    model_help = ("the victim's fp32 teacher up to its last layer, and benign reference features: "
                  "`divqat calibrate` builds both and keeps them with the victim")
    calibrated = True
    data_params = ("reference",)

    def __init__(self, features: Callable[[Tensor], Tensor] | None = None,
                 reference: Tensor | None = None, threshold: float | None = None,
                 window: int = 256, check_every: int = 32, bandwidth: float | None = None) -> None:
        super().__init__()
        if features is not None and not callable(features):
            raise ValueError("mmd.features must be callable (images -> features)")
        self.features = features
        if reference is not None and (not isinstance(reference, Tensor) or reference.ndim != 2
                                      or len(reference) < 2):
            raise ValueError("mmd.reference must be a (R, F) tensor of benign features, R >= 2")
        self.reference = None if reference is None else reference.detach().to(torch.float64)
        self.threshold = check_number(self.name, "threshold", threshold, optional=True)
        self.window = check_int(self.name, "window", window, low=2)
        self.check_every = check_int(self.name, "check_every", check_every, low=1)
        self.bandwidth = check_number(self.name, "bandwidth", bandwidth, low=0.0, low_open=True,
                                      optional=True)
        self._gamma = self._ref_term = None
        if self.reference is not None:
            s = self.bandwidth if self.bandwidth is not None else median_bandwidth(self.reference)
            self._gamma = 1.0 / (2.0 * s * s)
            self._ref_term = float(rbf_mean(self.reference, self.reference, self._gamma))
        self._reset()

    def _reset(self) -> None:
        self._recent = torch.empty(0, 0, dtype=torch.float64)  # the last `window` features
        # mean_j k(x_i, r_j) of each of them: the cross term of a window is their mean, so each
        # query meets the reference once, not once per test.
        self._to_reference = torch.empty(0, dtype=torch.float64)

    def _observe(self, images: Tensor, labels: Tensor, answers: Tensor) -> list[tuple[int, float]]:
        if self.features is None or self.reference is None:
            raise RuntimeError("the mmd detector needs its features and reference: run `divqat "
                               "calibrate --detector mmd` on the victim first")
        with torch.inference_mode():
            feats = self.features(images)
        feats = feats.detach().to("cpu", torch.float64).reshape(len(images), -1)
        cross = torch.exp(torch.cdist(feats, self.reference).square_().mul_(-self._gamma)).mean(dim=1)
        recent = feats if self._recent.numel() == 0 else torch.cat([self._recent, feats])
        to_reference = torch.cat([self._to_reference, cross])
        start, before = self._queries, len(recent) - len(feats)
        tests = []
        for i in range(len(feats)):
            position = start + i + 1
            if position % self.check_every == 0 and position >= self.window:
                end = before + i + 1
                x = recent[end - self.window:end]
                score = (rbf_mean(x, x, self._gamma) + self._ref_term
                         - 2 * to_reference[end - self.window:end].mean())
                tests.append((position, float(score)))
        self._recent = recent[-self.window:].clone()
        self._to_reference = to_reference[-self.window:].clone()
        return tests

    def _state(self) -> dict[str, Any]:
        return {"recent": self._recent.clone(), "to_reference": self._to_reference.clone()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._recent = state["recent"].to(torch.float64).clone()
        self._to_reference = state["to_reference"].to(torch.float64).clone()

    def memory_bytes(self) -> int:
        """Bytes the per-client state holds (the window's features; the reference is shared)."""
        return (self._recent.numel() + self._to_reference.numel()) * 8
