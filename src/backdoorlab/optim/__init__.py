"""Optimisation routines shared by attacks and defenses."""

from .pgd import PGDConfig, pgd

__all__ = ["PGDConfig", "pgd"]
