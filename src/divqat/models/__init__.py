"""Models by name: ``create_model("resnet8", in_channels=1, num_classes=10)``; ``VictimNet`` puts the
input normalization in front of one (the deployed model, and every surrogate)."""

from divqat.models import resnet as _resnet  # noqa: F401  (registers the ResNets)
from divqat.models.normalized import VictimNet, build_net
from divqat.models.registry import MODELS, create_model, model_names

__all__ = ["MODELS", "VictimNet", "build_net", "create_model", "model_names"]
