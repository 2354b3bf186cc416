"""Training: one loop (``fit``) for fp32, QAT and DivQAT, the losses (the paper's DivQAT and its
out-of-distribution variant, ``ood``) and the outliers that variant trains on (``outliers``)."""

from divqat.train.losses import (
    DIVERGENCES,
    PLACEMENTS,
    CrossEntropy,
    DivQATLoss,
    DivQATSettings,
    divergence,
)
from divqat.train.ood import OODDivQATLoss, divqat_objective
from divqat.train.outliers import load_outliers, synthesize
from divqat.train.trainer import FitConfig, History, accuracy, fit, predict_logits

__all__ = [
    "DIVERGENCES", "PLACEMENTS", "CrossEntropy", "DivQATLoss", "DivQATSettings", "divergence",
    "OODDivQATLoss", "divqat_objective", "load_outliers", "synthesize",
    "FitConfig", "History", "accuracy", "fit", "predict_logits",
]
