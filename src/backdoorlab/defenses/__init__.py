"""Defenses: a registry of detectors and mitigations that run on any attack's run directory."""

from . import abl  # noqa: F401  (registers)
from . import activation_clustering  # noqa: F401  (registers)
from . import cognitive_distillation  # noqa: F401  (registers)
from . import fine_pruning  # noqa: F401  (registers)
from . import input_blurring  # noqa: F401  (registers)
from . import multi_layer_tuning  # noqa: F401  (registers)
from . import mntd  # noqa: F401  (registers)
from . import neural_cleanse  # noqa: F401  (registers)
from . import scale_up  # noqa: F401  (registers)
from . import sentinet  # noqa: F401  (registers)
from . import spectral_signatures  # noqa: F401  (registers)
from . import strip  # noqa: F401  (registers)
from .base import DEFENSES, Defense, DefenseJob, DefenseKind, DefenseParams, run_defense
from .view import DefenderView, GroundTruth, load_case

__all__ = ["DEFENSES", "DefenderView", "Defense", "DefenseJob", "DefenseKind", "DefenseParams", "GroundTruth", "load_case", "run_defense"]
