"""Defenses: a registry of detectors and mitigations that run on any attack's run directory."""

from . import activation_clustering  # noqa: F401  (registers)
from . import cognitive_distillation  # noqa: F401  (registers)
from . import fine_pruning  # noqa: F401  (registers)
from . import neural_cleanse  # noqa: F401  (registers)
from . import spectral_signatures  # noqa: F401  (registers)
from . import strip  # noqa: F401  (registers)
from .base import DEFENSES, Defense, DefenseContext, DefenseJob, DefenseKind, DefenseParams, run_defense

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseJob", "DefenseKind", "DefenseParams", "run_defense"]
