"""Training: one loop (``fit``) for fp32, QAT and DivQAT, the losses, and the victim pipeline."""

from divqat.train.losses import DIVERGENCES, CrossEntropy, DivQATLoss, DivQATSettings, divergence
from divqat.train.trainer import FitConfig, History, accuracy, fit, predict_logits

__all__ = [
    "DIVERGENCES", "CrossEntropy", "DivQATLoss", "DivQATSettings", "divergence",
    "FitConfig", "History", "accuracy", "fit", "predict_logits",
]
