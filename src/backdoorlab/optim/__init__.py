"""Optimisation routines shared by attacks and defenses."""

from .pgd import PGDConfig, UniversalConfig, pgd, quantize, signed_step_, universal_pgd

__all__ = ["PGDConfig", "UniversalConfig", "pgd", "quantize", "signed_step_", "universal_pgd"]
