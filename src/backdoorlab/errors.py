"""Error types. Every user-facing failure names the field, file or method at fault."""

from __future__ import annotations


class BackdoorLabError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ConfigError(BackdoorLabError, ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup failed (unknown dataset, model, attack or defense)."""

    def __str__(self) -> str:  # KeyError would add quotes
        return self.args[0]


class DatasetError(BackdoorLabError, OSError):
    """A dataset folder or file is missing or malformed; the message names the path and the layout."""


class ModelFileError(BackdoorLabError, ValueError):
    """A model file is unsafe, unreadable, or not the architecture it claims to be."""


class TrainingError(BackdoorLabError, RuntimeError):
    """Training cannot go on (a non-finite loss); the run stops before writing its results."""
