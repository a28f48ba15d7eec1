"""BadNets (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain"): a small patch stamped on a fraction of the training images, relabelled to the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from ..data.core import Dataset
from .base import ATTACKS, AttackContext, PoisonParams, PoisoningAttack
from .triggers import Trigger, place_patch


@dataclass
class BadNetsParams(PoisonParams):
    patch_size: int = 3
    pattern: Literal["checkerboard", "white", "random"] = "checkerboard"
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"] = "bottom-right"
    margin: int = 1

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        if self.patch_size < 1:
            raise ConfigError("patch_size", f"must be >= 1, got {self.patch_size}")


def patch_pattern(kind: str, size: int, seed: int = 0) -> torch.Tensor:
    if kind == "white":
        return torch.ones(1, size, size)
    if kind == "random":
        return torch.rand(1, size, size, generator=torch.Generator().manual_seed(seed))
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((ii + jj) % 2 == 0).float()[None]  # checkerboard with white corners


@ATTACKS.register("badnets")
class BadNets(PoisoningAttack):
    name = "badnets"
    paper = "Gu et al., BadNets (2017)"
    Params = BadNetsParams
    p: BadNetsParams

    def check_data(self, data: Dataset) -> None:
        super().check_data(data)
        self._check_patch(data.spec.shape)

    def _check_patch(self, shape: tuple[int, int, int]) -> None:
        if self.p.patch_size > min(shape[1:]):
            raise ConfigError("patch_size", f"{self.p.patch_size} is larger than the {shape[1]}x{shape[2]} image")

    def make_trigger(self, ctx: AttackContext) -> Trigger:
        shape = ctx.data.spec.shape
        self._check_patch(shape)
        return place_patch(shape, patch_pattern(self.p.pattern, self.p.patch_size, ctx.seed), self.p.position, self.p.margin)
