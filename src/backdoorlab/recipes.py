"""Default training recipes per dataset and model (every field can be overridden from the CLI)."""

from __future__ import annotations

from dataclasses import fields

import torch

from .train.trainer import TrainConfig
from .validate import build_params, check_device

SMALL = {"digit-cnn", "traffic-cnn"}
EPOCHS_SMALL = {"mnist5k": 12, "digits": 40, "fashion-mnist": 12, "mnist": 8, "gtsrb": 20, "cifar10": 40, "tiny-imagenet": 40}
EPOCHS_LARGE = {"mnist5k": 15, "digits": 40, "fashion-mnist": 20, "mnist": 10, "gtsrb": 40, "cifar10": 100, "tiny-imagenet": 100}


def default_train_config(dataset: str, model: str) -> TrainConfig:
    if model in SMALL:
        return TrainConfig(epochs=EPOCHS_SMALL.get(dataset, 20), batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    return TrainConfig(epochs=EPOCHS_LARGE.get(dataset, 60), batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")


def train_config(dataset: str, model: str, overrides: dict | None = None) -> TrainConfig:
    base = default_train_config(dataset, model)
    values = {f.name: getattr(base, f.name) for f in fields(TrainConfig)}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_params(TrainConfig, values, prefix="train.")


def resolve_device(name: str = "auto") -> torch.device:
    """The device a run uses (``auto``: CUDA when present); one that this machine lacks is a ConfigError."""
    return check_device(name)
