"""Subsets by class, by count and stratified: teacher/student splits and limited-data runs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .core import ImageSet


def stratified_indices(y: Tensor, n: int, seed: int = 0) -> Tensor:
    """``n`` indices with the class proportions of ``y`` (largest-remainder rounding), sorted."""
    if not 0 < n <= len(y):
        raise ConfigError("count", f"must lie in [1, {len(y)}], got {n}")
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    take = exact.floor().long()
    rest = n - int(take.sum())
    if rest:
        take[torch.argsort(exact - take, descending=True)[:rest]] += 1
    parts = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(y == c).flatten()
        parts.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(parts).sort().values


def by_class(data: ImageSet, classes: Sequence[int], relabel: bool = True) -> ImageSet:
    """Keep the given classes; with ``relabel`` they become 0..len(classes)-1 in the order given."""
    classes = list(classes)
    lut = torch.full((int(data.y.max()) + 1 if len(data) else 1,), -1, dtype=torch.long, device=data.y.device)
    for i, c in enumerate(classes):
        if 0 <= c < len(lut):
            lut[c] = i
    keep = torch.nonzero(lut[data.y] >= 0).flatten()
    out = data.subset(keep)
    if relabel:
        out = ImageSet(out.x, lut[out.y])
    return out


def by_count(data: ImageSet, n: int, seed: int = 0, stratified: bool = True) -> ImageSet:
    if stratified:
        return data.subset(stratified_indices(data.y, n, seed))
    if not 0 < n <= len(data):
        raise ConfigError("count", f"must lie in [1, {len(data)}], got {n}")
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)


def split(data: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Stratified split into (first, second) with ``fraction`` of the samples in the first."""
    n = max(1, min(len(data) - 1, round(fraction * len(data))))
    first = stratified_indices(data.y, n, seed).to(data.y.device)
    mask = torch.ones(len(data), dtype=torch.bool, device=data.y.device)
    mask[first] = False
    return data.subset(first), data.subset(torch.nonzero(mask).flatten())
