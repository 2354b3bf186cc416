"""Models by spec: ``create_model("resnet8", in_channels=1, num_classes=10)``, or a user's own
(``"torchvision:mobilenet_v3_small"``, ``"timm:NAME"``, ``"package.module:function"``);
``VictimNet`` puts the input normalization in front of one (the deployed model, and every
surrogate); ``penultimate`` gives the features its classifier layer receives."""

from divqat.models import resnet as _resnet  # noqa: F401  (registers the ResNets)
from divqat.models.features import features, penultimate
from divqat.models.normalized import VictimNet, build_net
from divqat.models.registry import MODELS, check_arch, create_model, describe_archs, model_names

__all__ = ["MODELS", "VictimNet", "build_net", "check_arch", "create_model", "describe_archs",
           "features", "model_names", "penultimate"]
