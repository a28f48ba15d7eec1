"""Checks shared by every config: each raises ConfigError naming the field before any work starts."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError


def check_epsilon(field: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(field, f"must lie in [0, 1] (pixel scale), got {value}")


def check_rate(field: str, value: float) -> None:
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(field, f"must lie in (0, 1], got {value}")


def check_fraction(field: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(field, f"must lie in [0, 1], got {value}")


def check_class(field: str, value: int, num_classes: int) -> None:
    if not 0 <= int(value) < num_classes:
        raise ConfigError(field, f"class {value} is out of range for a dataset with {num_classes} classes (0..{num_classes - 1})")


def check_positive(field: str, value: float) -> None:
    if not float(value) > 0:
        raise ConfigError(field, f"must be > 0, got {value}")


def check_choice(field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(field, f"must be one of {choices}, got {value!r}")


def _coerce(field: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        check_choice(field, value, get_args(tp))
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(field, value, a)
            except ConfigError as e:
                last = e
        raise last or ConfigError(field, f"cannot read {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        out = [_coerce(field, v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(field, f"expected true/false, got {value!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(field, f"expected an integer, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(field, f"expected {tp.__name__}, got {value!r}") from None
    return value


def build_params(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, coercing types and naming unknown or bad fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown parameter; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.field.startswith(prefix):
            raise ConfigError(prefix + e.field, str(e).split(": ", 1)[-1]) from None
        raise
