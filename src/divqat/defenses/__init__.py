"""Output-perturbation defenses: one file per defense, each registered by its CLI name.

    >>> from divqat.defenses import create_defense
    >>> defense = create_defense("dcp", beta=0.5)
    >>> defended = defense(posteriors)             # (N, K) -> (N, K)

Defenses that run a model (``needs_inputs``) also take ``images=``; the black box passes them.
A model-backed defense declares its model (``model_param``, ``model_help``, ``trains_model``);
``check_defense`` checks its parameters without the model, and for a saved victim the driver
``divqat.pipelines.defense_models.build_defense`` builds that model (the misinformation model,
MAD's surrogate). ``divqat.pipelines.defend`` measures a defense (defender accuracy, L1 and KL to
the clean posteriors, argmax changes, latency). This package is methods only: it imports no
black box, training or attack (checked by ``lint-imports``).
"""

# Importing each defense module registers it (the timm pattern); the classes are re-exported.
from divqat.defenses.adaptive_misinformation import AdaptiveMisinformation, misinformation_loss
from divqat.defenses.base import (
    DEFENSES,
    PENDING_MODEL,
    Defense,
    check_defense,
    create_defense,
    describe_defenses,
)
from divqat.defenses.dcp import DCP
from divqat.defenses.mad import MAD
from divqat.defenses.none import NoDefense
from divqat.defenses.random_noise import RandomNoise
from divqat.defenses.reverse_sigmoid import ReverseSigmoid, reverse_sigmoid_noise
from divqat.defenses.rounding import Rounding
from divqat.defenses.top_k import TopK

# The baseline every defense is compared with (the undefended victim), by its registry name.
NO_DEFENSE = NoDefense.name

__all__ = [
    "DCP",
    "DEFENSES",
    "PENDING_MODEL",
    "MAD",
    "NO_DEFENSE",
    "AdaptiveMisinformation",
    "Defense",
    "NoDefense",
    "RandomNoise",
    "ReverseSigmoid",
    "Rounding",
    "TopK",
    "check_defense",
    "create_defense",
    "describe_defenses",
    "misinformation_loss",
    "reverse_sigmoid_noise",
]
