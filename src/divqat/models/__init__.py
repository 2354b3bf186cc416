"""Models by name: ``create_model("resnet8", in_channels=1, num_classes=10)``."""

from divqat.models import resnet as _resnet  # noqa: F401  (registers the ResNets)
from divqat.models.registry import MODELS, create_model, model_names

__all__ = ["MODELS", "create_model", "model_names"]
