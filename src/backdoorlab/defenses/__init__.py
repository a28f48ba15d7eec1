"""Defenses: a registry of detectors and mitigations that run on any attack's run directory."""

from ..registry import Registry

DEFENSES: Registry[type] = Registry("defense")

__all__ = ["DEFENSES"]
