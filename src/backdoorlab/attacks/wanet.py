"""WaNet (Nguyen & Tran 2021, "WaNet - Imperceptible Warping-based Backdoor Attack"): the trigger is
a small, smooth warp of the image; training is controlled by the attacker.

Warping field (paper Sec. 3.2): a k x k x 2 control grid P ~ U[-1, 1] is normalised by its mean
absolute value, P̂ = P / mean|P|, upsampled bicubically to H x W, scaled by the strength s and added
to the identity sampling grid; the result is clamped to [-1, 1] (the image border). As in the
authors' code, the grid lives in grid_sample's normalised coordinates, where the field is s·P̂/H
(times ``grid_rescale``, 1 by default); this is what the published numbers were measured with.

Training (paper Sec. 3.3): in every batch a fraction ρ_a (``poison_rate``) gets the backdoor warp
and the label η(y), and a further ρ_n = ``cross_ratio``·ρ_a gets the "noise mode": the backdoor grid
plus an independent per-image perturbation U[-1, 1]/H, clamped, with the true label kept, so the
network learns that only the exact warp is the trigger. The hook acts on the augmented batch (the
shared trainer augments before hooks; the authors' code warps first, then augments).
ASR is measured with the backdoor warp on the test set; ``noise_mode_accuracy`` (paper Table 1's
"noise" column) with a noise-mode warp per test image and the true labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.core import to_float
from ..errors import ConfigError
from ..train.evaluate import predict
from ..train.trainer import TrainHooks
from .base import ATTACKS, AttackContext, PoisonParams, AttackResult, TrainingAttack
from .triggers import Trigger, WarpTrigger


@dataclass
class WaNetParams(PoisonParams):
    """``k``: control-grid size (paper: 4); ``s``: warp strength (paper: 0.5); ``cross_ratio``:
    ρ_n / ρ_a (paper: 2); ``grid_rescale``: the authors' code's extra factor (1)."""

    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    grid_rescale: float = 1.0

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        if self.k < 2:
            raise ConfigError("k", f"the control grid needs at least 2x2 points, got {self.k}")
        if self.s < 0:
            raise ConfigError("s", f"must be >= 0, got {self.s}")
        if self.cross_ratio < 0:
            raise ConfigError("cross_ratio", f"must be >= 0, got {self.cross_ratio}")
        if self.grid_rescale <= 0:
            raise ConfigError("grid_rescale", f"must be > 0, got {self.grid_rescale}")
        if self.poison_rate * (1 + self.cross_ratio) > 1:
            raise ConfigError("cross_ratio", f"poison_rate·(1 + cross_ratio) = {self.poison_rate * (1 + self.cross_ratio):g} exceeds the batch")


def identity_grid(h: int, w: int) -> Tensor:
    """The sampling grid that leaves an image unchanged under grid_sample(align_corners=True): (H, W, 2)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=-1)


def control_field(k: int, h: int, w: int, generator: torch.Generator | None = None) -> Tensor:
    """ψ(rand[-1,1](k, k, 2)) upsampled bicubically to (H, W, 2): the unscaled warping field."""
    if k < 2:
        raise ConfigError("k", f"the control grid needs at least 2x2 points, got {k}")
    p = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    p = p / p.abs().mean()
    return F.interpolate(p, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)


def backdoor_grid(field: Tensor, s: float, rescale: float = 1.0) -> Tensor:
    """clamp((identity + s·field/H)·rescale, -1, 1) for a field of shape (H, W, 2)."""
    h, w = field.shape[:2]
    return ((identity_grid(h, w) + s * field / h) * rescale).clamp(-1, 1)


def noise_grids(grid: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n noise-mode grids: the backdoor grid plus U[-1, 1]/H per image and position, clamped: (n, H, W, 2)."""
    h = grid.shape[0]
    noise = torch.rand((n, *grid.shape), generator=generator, device=grid.device if generator is None else "cpu") * 2 - 1
    return (grid.unsqueeze(0) + noise.to(grid.device) / h).clamp(-1, 1)


def warp_shift_pixels(grid: Tensor) -> dict[str, float]:
    """Mean and largest displacement of a (H, W, 2) grid from the identity, in pixels."""
    h, w = grid.shape[:2]
    d = (grid - identity_grid(h, w)) * torch.tensor([(w - 1) / 2, (h - 1) / 2])
    norm = d.norm(dim=-1)
    return {"warp_mean_shift_pixels": float(norm.mean()), "warp_max_shift_pixels": float(norm.max())}


@ATTACKS.register("wanet")
class WaNet(TrainingAttack):
    name = "wanet"
    paper = "Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack (ICLR 2021)"
    Params = WaNetParams
    p: WaNetParams
    # the warp is learned slowly: 12 epochs give 1.9% ASR on MNIST-5k, 60 give 98% (docs/results.md §5, §7)
    recipe = {"mnist5k": {"epochs": 60}, "fashion-mnist": {"epochs": 40}, "mnist": {"epochs": 30}}

    def make_trigger(self, ctx: AttackContext) -> Trigger:
        _, h, w = ctx.data.spec.shape
        field = control_field(self.p.k, h, w, torch.Generator().manual_seed(ctx.seed))
        return WarpTrigger(backdoor_grid(field, self.p.s, self.p.grid_rescale))

    def hooks(self, ctx: AttackContext, trigger: Trigger) -> TrainHooks:
        return WaNetBatches(self, ctx.data.spec.num_classes, trigger)

    def run(self, ctx: AttackContext) -> AttackResult:
        res = super().run(ctx)
        test = ctx.data.test
        g = noise_grids(res.trigger.grid.cpu(), len(test), torch.Generator().manual_seed(ctx.seed + 1))  # type: ignore[union-attr]
        x_noise = WarpTrigger(g)(to_float(test.x.cpu()))
        res.metrics["noise_mode_accuracy"] = float((predict(res.model, x_noise) == test.y.cpu()).float().mean())
        res.metrics.update(warp_shift_pixels(res.trigger.grid.cpu()))  # type: ignore[union-attr]
        return res


class WaNetBatches(TrainHooks):
    """Each batch: ρ_a backdoor-warped and relabelled, then ρ_n noise-mode warped with true labels."""

    def __init__(self, attack: WaNet, num_classes: int, trigger: Trigger) -> None:
        self.attack, self.nc, self.trigger = attack, num_classes, trigger

    def batch(self, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        p = self.attack.p
        n_bd = int(len(y) * p.poison_rate)  # the batch is shuffled: its head is a random subset
        n_cross = min(int(n_bd * p.cross_ratio), len(y) - n_bd)
        if n_bd + n_cross == 0:
            return x, y
        x, y = x.clone(), y.clone()
        x[:n_bd] = self.trigger(x[:n_bd])
        y[:n_bd] = self.attack.labels(y[:n_bd], self.nc)
        if n_cross:
            g = noise_grids(self.trigger.grid.to(x.device), n_cross)  # global RNG: seeded and checkpointed by the trainer
            x[n_bd : n_bd + n_cross] = WarpTrigger(g)(x[n_bd : n_bd + n_cross])
        return x, y
