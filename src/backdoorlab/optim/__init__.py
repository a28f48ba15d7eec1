"""Optimisation routines shared by attacks and defenses."""

from .pgd import PGDConfig, pgd, quantize

__all__ = ["PGDConfig", "pgd", "quantize"]
