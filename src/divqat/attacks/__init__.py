"""Model extraction attacks: one file per attack, each registered by its CLI name.

Attacks see only a ``divqat.boundary.QueryBoundary`` (the Sybil thief: several of them, one per
key; the recovery thief also gets the defense it knows as an opaque ``KnownDefense`` from the
driver, never a defense object)::

    >>> from divqat.attacks import SurrogateTraining, create_attack
    >>> stolen = create_attack("knockoff").steal(box, [1000, 10000], SurrogateTraining(), transfer=ts)

``divqat.pipelines.attack.attack_victim`` is the whole ``divqat attack`` command (load the victim, put
the defense and the black box around it, run the attack, measure the surrogates).
"""

# Importing each attack module registers it (the timm pattern).
from divqat.attacks.averaging import Averaging
from divqat.attacks.base import (
    ATTACKS,
    Attack,
    QueryCache,
    SoftCrossEntropy,
    Stolen,
    SurrogateTraining,
    TransferSet,
    build_surrogate,
    check_blackbox,
    create_attack,
    describe_attacks,
    param_mapping,
    soft_cross_entropy,
    train_surrogate,
)
from divqat.attacks.dfme import DFME
from divqat.attacks.fixmatch import FixMatch
from divqat.attacks.jbda import JBDA
from divqat.attacks.knockoff import Knockoff
from divqat.attacks.knockoff_adaptive import KnockoffAdaptive
from divqat.attacks.maze import MAZE
from divqat.attacks.recovery import KnownDefense, Recovery
from divqat.attacks.sybil import SpreadBoundary, Sybil

__all__ = [
    "ATTACKS",
    "Attack",
    "Averaging",
    "DFME",
    "FixMatch",
    "JBDA",
    "Knockoff",
    "KnockoffAdaptive",
    "KnownDefense",
    "MAZE",
    "QueryCache",
    "Recovery",
    "SoftCrossEntropy",
    "SpreadBoundary",
    "Stolen",
    "SurrogateTraining",
    "Sybil",
    "TransferSet",
    "build_surrogate",
    "check_blackbox",
    "create_attack",
    "describe_attacks",
    "param_mapping",
    "soft_cross_entropy",
    "train_surrogate",
]
