"""Attacks: a registry of small modules on four kinds of attack."""

from . import badnets  # noqa: F401  (registers)
from . import blended  # noqa: F401  (registers)
from . import wanet  # noqa: F401  (registers)
from . import data_efficient  # noqa: F401  (registers)
from . import mmlm  # noqa: F401  (registers)
from . import siba, ubw, universal  # noqa: F401  (registers SIBA, Sparse, Random, TUAP, UBW-P)
from . import wb  # noqa: F401  (registers WB and LIRA)
from . import issba  # noqa: F401  (registers ISSBA and its issba/* triggers)
from . import latent_backdoor  # noqa: F401  (registers)
from .base import ATTACKS, Attack, AttackContext, AttackKind, AttackParams, AttackResult, ModelModificationAttack, PoisonBatches, PoisoningAttack, PoisonParams, TrainingAttack, TransferAttack, derived_seed
from .issba import ISSBATrigger
from .triggers import TRIGGERS, AdditiveTrigger, GeneratorTrigger, MaskPatternTrigger, Trigger, WarpTrigger

__all__ = [
    "ATTACKS", "TRIGGERS", "AdditiveTrigger", "GeneratorTrigger", "ISSBATrigger", "Attack", "AttackContext", "AttackKind", "AttackParams", "AttackResult", "PoisonBatches", "PoisonParams", "derived_seed",
    "MaskPatternTrigger", "ModelModificationAttack", "PoisoningAttack", "TrainingAttack", "TransferAttack", "Trigger", "WarpTrigger",
]
