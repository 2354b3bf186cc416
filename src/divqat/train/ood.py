"""DivQAT aimed at out-of-distribution queries.

The paper's DivQAT (Khaled et al., arXiv 2512.23948) pushes the quantized model's posteriors away
from the fp32 teacher's on the *training* images, where they also have to stay accurate: the
argmax is pinned by CE, and only a small divergence is affordable (docs/results.md: about 1
point of accuracy for 10x QAT's KL). But a thief with in-distribution images barely needs the
posteriors (a label-only thief steals almost as well), and a thief with foreign images sees
answers the training loss never shaped. This objective moves the push to where thieves get their
data, following outlier exposure (Hendrycks, Mazeika, Dietterich, "Deep Anomaly Detection with
Outlier Exposure", ICLR 2019, which trains a classifier toward uniform posteriors on an auxiliary
outlier set):

    L = CE(p_q(x), y)
        + distill * T^2 * KL(p(x) || p_q(x))                 (optional: x stays faithful)
        - alpha * mean_x min(D(p(x), p_q(x)), cap)          (divergence_on in or both)
        - alpha * mean_o min(D(p(o), p_q(o)), cap)          (divergence_on out or both)

x the training batch with labels y, o a batch of unlabeled outliers (``divqat.train.outliers``:
synthesized from the batch itself by default, or a dataset the user names), p the frozen fp32
teacher, p_q the fake-quantized student, D and cap as in the paper's DivQAT
(``divqat.train.losses``; the same divergences, cap, ramp, temperature and log clamp). Unlike
outlier exposure the target is not the uniform distribution but "away from the teacher", and on
outliers nothing holds the argmax, so the cap also bounds how far a foreign answer may move.
For ``tail-kl`` on an outlier the class left out is the teacher's answer (an outlier has no
label). ``divergence_on in`` without distillation is exactly the paper's DivQAT (``DivQATLoss``);
alpha 0 and distill 0 is exactly CE, i.e. QAT.

The outliers ride in the same forward pass as the training batch (``extra_inputs``, appended
after it, as outlier exposure does), so BatchNorm and the activation observers see both; the
batch holds as many outliers as training images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divqat.errors import ConfigError
from divqat.train.losses import DivQATLoss, DivQATSettings, divergence
from divqat.train.outliers import OutlierSource


class OODDivQATLoss(DivQATLoss):
    """The objective above. ``outliers`` is required when the divergence is pushed on them.

    Called by ``fit`` as ``loss(logits, labels, images, progress)`` where the first
    ``len(labels)`` rows of ``logits`` / ``images`` are the training batch and the rest the
    outliers that ``extra_inputs`` added. Logs ``loss``, ``ce``, ``div`` (mean uncapped
    divergence on the training images), ``div_out`` (on the outliers) and ``distill`` when used.
    """

    def __init__(self, teacher: nn.Module, settings: DivQATSettings,
                 outliers: OutlierSource | None = None, precision: str = "fp32") -> None:
        super().__init__(teacher, settings, precision)
        self.uses_outliers = settings.divergence_on in ("out", "both") and settings.alpha > 0
        if self.uses_outliers and outliers is None:
            raise ConfigError(f"divergence_on {settings.divergence_on!r} needs an outlier source")
        self.outliers = outliers if self.uses_outliers else None

    def extra_inputs(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Outliers for one training batch (never its labels: they are not passed here)."""
        return None if self.outliers is None else self.outliers(images, generator)

    def __call__(self, logits, labels, images, progress):
        s = self.settings
        n = labels.shape[0]
        teacher_logits = self.teacher_logits(images)
        z, t = logits[:n], teacher_logits[:n]
        ce = F.cross_entropy(z, labels)
        alpha = s.alpha_at(progress)
        pushes_in = s.divergence_on in ("in", "both") and alpha != 0
        with torch.set_grad_enabled(pushes_in and torch.is_grad_enabled()):
            div = divergence(t, z, s.divergence, labels, s.temperature, s.log_clamp)
        loss = ce
        if pushes_in:
            loss = loss - alpha * self._capped(div).mean()
        logs = {"ce": ce.detach(), "div": div.detach().mean()}
        if s.distill > 0:
            pull = divergence(t, z, "kl", None, s.temperature, s.log_clamp).mean() * s.temperature ** 2
            loss = loss + s.distill * pull
            logs["distill"] = pull.detach()
        if logits.shape[0] > n:
            zo, to = logits[n:], teacher_logits[n:]
            # tail-kl leaves out one class: on an unlabeled outlier, the teacher's answer.
            div_out = divergence(to, zo, s.divergence, to.argmax(dim=1), s.temperature, s.log_clamp)
            if alpha != 0:
                loss = loss - alpha * self._capped(div_out).mean()
            logs["div_out"] = div_out.detach().mean()
        return loss, {"loss": loss.detach(), **logs}

    def _capped(self, div: torch.Tensor) -> torch.Tensor:
        return div if self.settings.cap is None else div.clamp(max=self.settings.cap)


def divqat_objective(teacher: nn.Module, settings: DivQATSettings,
                     outliers: OutlierSource | None = None, precision: str = "fp32") -> DivQATLoss:
    """The DivQAT objective ``settings`` describe: the paper's ``DivQATLoss`` when the divergence
    is on the training images only and nothing is distilled, else ``OODDivQATLoss``.
    ``precision`` "bf16": the teacher's forward passes under bf16 autocast."""
    if settings.divergence_on == "in" and settings.distill == 0:
        return DivQATLoss(teacher, settings, precision)
    return OODDivQATLoss(teacher, settings, outliers, precision)


__all__ = ["OODDivQATLoss", "divqat_objective"]
