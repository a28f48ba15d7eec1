"""The one validation layer: every config (CLI, grid file, Python API) goes through these checks
before any work starts, and each raises a ConfigError naming the field and the value.

Numbers must be finite and of their type (a bool is never an int or a float), in range; devices
must exist on this machine; output folders must be creatable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError


def number(field: str, value: Any, integer: bool = False) -> float:
    """``value`` as a finite number (an integer when ``integer``); bools, strings and NaN/inf fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ConfigError(field, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    return value


def check_epsilon(field: str, value: float) -> None:
    if not 0.0 <= number(field, value) <= 1.0:
        raise ConfigError(field, f"must lie in [0, 1] (pixel scale), got {value}")


def check_rate(field: str, value: float) -> None:
    if not 0.0 < number(field, value) <= 1.0:
        raise ConfigError(field, f"must lie in (0, 1], got {value}")


def check_fraction(field: str, value: float) -> None:
    if not 0.0 <= number(field, value) <= 1.0:
        raise ConfigError(field, f"must lie in [0, 1], got {value}")


def check_class(field: str, value: int, num_classes: int) -> None:
    if not 0 <= number(field, value, integer=True) < num_classes:
        raise ConfigError(field, f"class {value} is out of range for a dataset with {num_classes} classes (0..{num_classes - 1})")


def check_positive(field: str, value: float) -> None:
    if not number(field, value) > 0:
        raise ConfigError(field, f"must be > 0, got {value}")


def check_int(field: str, value: int, low: int = 1, high: int | None = None) -> None:
    number(field, value, integer=True)
    if value < low or (high is not None and value > high):
        raise ConfigError(field, f"must be an integer >= {low}, got {value}" if high is None else f"must be an integer in [{low}, {high}], got {value}")


def check_range(field: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    v = number(field, value)
    if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
        raise ConfigError(field, f"must lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value}")


def check_device(name: str) -> "Any":
    """The torch device ``name`` names (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked to exist here."""
    import torch

    if not isinstance(name, str):
        raise ConfigError("device", f"expected a device name (auto, cpu, cuda, cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name!r} asked for, but this machine has no CUDA device (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device", f"{name!r} asked for, but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError("device", f"{name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def check_out_folder(field: str, path: str | Path) -> Path:
    """``path`` as a folder this process can create or write: its first existing ancestor must be a
    writable folder (not a file)."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(field, f"{p} cannot be a folder: {probe} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(field, f"{p} cannot be written: {probe} is not writable")
    return p


def check_apart(field: str, out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """A run never writes into the folder of one of its inputs, nor into a folder that holds one
    (``--force`` would empty it). An input is a folder (a run, a dataset) or a file; a file inside
    a run folder (one with a config.json) stands for that run folder."""
    o = Path(out).expanduser().resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        i = Path(path).expanduser().resolve()
        if i.is_file() and (i.parent / "config.json").is_file():
            i = i.parent
        if o == i or o in i.parents or (i.is_dir() and i in o.parents):
            raise ConfigError(field, f"{out} overlaps this run's input {name} ({path}): a run never writes into its input's folder; choose another --out")


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
    if tp in (int, float):
        if isinstance(value, str):  # a number written as text ("1e-3" from YAML, "3" from key=value)
            try:
                value = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise ConfigError(field, f"expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        number(field, value, integer=tp is int)
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"expected text, got {value!r}")
        return value
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
