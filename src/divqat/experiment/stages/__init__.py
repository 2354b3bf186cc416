"""The kinds of experiment stage, one file each, registered in planning order (the kinds
planned once per seed, then per int8 victim, then after the victims): see ``base.StageKind``.

    fp32       the teacher (``train.Teacher``)
    victim     the int8 victims (``train.Victim``)
    defense    one victim behind one defense setting (``defense``)
    calibrate  one extraction detector calibrated on one victim (``calibrate``)
    attack     one thief against one victim behind one defense (``attack``)
    copy       the on-device thief who copies the program file (``copy``)
    timing     every victim behind every defense, timed side by side (``timing``)
    independent  a model never stolen from, for the false claims (``train.Independent``)
    verify     the watermarked thieves' surrogates and the independent models against the
               thieves' marks, after every seed (``verify``)
    fingerprint  the independent models against an edge victim's program fingerprint, after
               every seed (``fingerprint``)
"""

from divqat.experiment.labels import (
    attack_label,
    defense_label,
    thief_label,
    victim_label,
    victim_name,
)
from divqat.experiment.stages import (  # noqa: F401 - registration
    attack,
    calibrate,
    copy,
    defense,
    fingerprint,
    timing,
    train,
    verify,
)
from divqat.experiment.stages.base import (
    STAGE_KINDS,
    PlanScope,
    RowsContext,
    Stage,
    StageKind,
    StageTask,
    register_kind,
)

__all__ = ["STAGE_KINDS", "PlanScope", "RowsContext", "Stage", "StageKind", "StageTask",
           "attack_label", "defense_label", "register_kind", "thief_label", "victim_label",
           "victim_name"]
