"""Evaluation: clean accuracy, attack success rate (all-to-one and all-to-all), per-class accuracy."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..data.core import ImageSet, to_float
from ..validate import check_choice, check_class

TargetMode = Literal["all-to-one", "all-to-all"]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def batched(fn, model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Apply ``fn(float batch)`` over images given as uint8 or float in [0, 1], in eval mode; CPU float32 out."""
    was = model.training
    model.eval()
    dev = model_device(model)
    out = [fn(to_float(x[s : s + batch_size].to(dev))).float().cpu() for s in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    return batched(model, model, x, batch_size)


def features(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate activations (the head's input)."""
    return batched(model.features, model, x, batch_size)


def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    return logits(model, x, batch_size).argmax(1)


def accuracy(model: nn.Module, data: ImageSet) -> float:
    return float((predict(model, data.x) == data.y.cpu()).float().mean())


def per_class_accuracy(model: nn.Module, data: ImageSet, num_classes: int) -> list[float]:
    pred, y = predict(model, data.x), data.y.cpu()
    hits = torch.bincount(y[pred == y], minlength=num_classes).float()
    total = torch.bincount(y, minlength=num_classes).clamp_min(1).float()
    return (hits / total).tolist()


def target_labels(y: Tensor, mode: TargetMode, target: int, num_classes: int) -> Tensor:
    """η(y): the attacker's label, ``target`` for all-to-one, ``(y + 1) mod C`` for all-to-all."""
    check_choice("target_mode", mode, ("all-to-one", "all-to-all"))
    if mode == "all-to-one":
        check_class("target", target, num_classes)
        return torch.full_like(y, target)
    return (y + 1) % num_classes


def asr_mask(y: Tensor, mode: TargetMode, target: int) -> Tensor:
    """Which test images count for the ASR: true class != target (all-to-one), all (all-to-all)."""
    return y != target if mode == "all-to-one" else torch.ones_like(y, dtype=torch.bool)


def attack_success_rate(model: nn.Module, x_poison: Tensor, y_true: Tensor, mode: TargetMode, target: int, num_classes: int) -> float:
    """Fraction of counted poisoned images classified as η(y_true)."""
    y_true = y_true.cpu()
    keep = asr_mask(y_true, mode, target)
    if not bool(keep.any()):
        return float("nan")
    pred = predict(model, x_poison[keep.to(x_poison.device)])
    return float((pred == target_labels(y_true[keep], mode, target, num_classes)).float().mean())


def per_class_attack_success_rate(model: nn.Module, x_poison: Tensor, y_true: Tensor, mode: TargetMode, target: int, num_classes: int) -> list[float | None]:
    """The ASR per true (source) class; None for a class that does not count (the target in
    all-to-one) or has no image."""
    y_true = y_true.cpu()
    keep = asr_mask(y_true, mode, target)
    hit = predict(model, x_poison) == target_labels(y_true, mode, target, num_classes)
    hits = torch.bincount(y_true[keep & hit], minlength=num_classes)
    total = torch.bincount(y_true[keep], minlength=num_classes)
    return [float(h) / float(t) if t else None for h, t in zip(hits.tolist(), total.tolist())]
