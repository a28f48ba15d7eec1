"""The one way to apply a trigger: a ``Trigger`` maps a float batch in [0, 1] to its poisoned version.

Every attack, defense and report applies triggers through this class, and every trigger saves as
plain tensors (safetensors) and rebuilds from them.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.core import to_float, to_uint8
from ..models.generators import GENERATORS
from ..optim.pgd import quantize
from ..registry import Registry
from ..train.evaluate import batched

TRIGGERS: Registry[type["Trigger"]] = Registry("trigger")


class Trigger(nn.Module):
    kind: ClassVar[str]

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def deliver(self, x: Tensor) -> Tensor:
        """The 8-bit images an attacker hands over for images ``x`` (uint8, or float in [0, 1]): the
        trigger's output rounded to the nearest level, on ``x``'s device."""
        return to_uint8(self(to_float(x)))

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    @staticmethod
    def from_tensors(kind: str, tensors: dict[str, Tensor]) -> "Trigger":
        return TRIGGERS.get(kind)(**tensors)


@TRIGGERS.register("mask-pattern")
class MaskPatternTrigger(Trigger):
    """x' = (1 - m)·x + m·p: a patch (m ∈ {0,1}, BadNets), a blend (m = α, Blended), a reversed trigger."""

    kind = "mask-pattern"

    def __init__(self, mask: Tensor, pattern: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.register_buffer("pattern", pattern.float())

    def apply(self, x: Tensor) -> Tensor:
        m, p = self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype)
        return x * (1 - m) + m * p


@TRIGGERS.register("additive")
class AdditiveTrigger(Trigger):
    """x' = clip(x + δ, 0, 1): universal perturbations (SIBA, TUAP, random and sparse triggers)."""

    kind = "additive"

    def __init__(self, delta: Tensor) -> None:
        super().__init__()
        self.register_buffer("delta", delta.float())

    def apply(self, x: Tensor) -> Tensor:
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)


@TRIGGERS.register("warp")
class WarpTrigger(Trigger):
    """x' = grid_sample(x, identity + field): a smooth warp (WaNet). ``grid`` is (H, W, 2) in [-1, 1],
    or (N, H, W, 2) for one grid per image of an N-image batch (WaNet's noise mode)."""

    kind = "warp"

    def __init__(self, grid: Tensor) -> None:
        super().__init__()
        self.register_buffer("grid", grid.float())

    def apply(self, x: Tensor) -> Tensor:
        g = self.grid.to(x.device, x.dtype)
        if g.dim() == 3:
            g = g.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, g, align_corners=True).clamp(0, 1)


def place_patch(shape: tuple[int, int, int], pattern: Tensor, position: str | tuple[int, int], margin: int = 1) -> MaskPatternTrigger:
    """A patch trigger: ``pattern`` (C|1, h, w) placed at a named corner (with a margin) or at (row, col)."""
    c, h, w = shape
    ph, pw = pattern.shape[-2:]
    corners = {
        "bottom-right": (h - ph - margin, w - pw - margin),
        "bottom-left": (h - ph - margin, margin),
        "top-right": (margin, w - pw - margin),
        "top-left": (margin, margin),
        "center": ((h - ph) // 2, (w - pw) // 2),
    }
    r, col = corners[position] if isinstance(position, str) else position
    r, col = max(0, min(h - ph, r)), max(0, min(w - pw, col))
    mask = torch.zeros(1, h, w)
    full = torch.zeros(c, h, w)
    mask[:, r : r + ph, col : col + pw] = 1
    full[:, r : r + ph, col : col + pw] = pattern.expand(c, ph, pw)
    return MaskPatternTrigger(mask, full)


class GeneratorTrigger(Trigger):
    """x' = clip(x + ε·tanh(g(x)), 0, 1) for a trigger generator g (LIRA, WB): ||x' - x||∞ ≤ ε by
    construction. Saved as the generator's tensors plus ``eps`` and ``config`` = (channels, base
    width); registered once per generator of :data:`backdoorlab.models.generators.GENERATORS` as
    ``generator/NAME``, so any run's trigger rebuilds from its safetensors."""

    kind = "generator"

    def __init__(self, name: str, net: nn.Module, eps: float, channels: int, width: int) -> None:
        super().__init__()
        self.name, self.kind, self.net = name, f"generator/{name}", net  # type: ignore[misc]
        self.register_buffer("eps", torch.tensor(float(eps)))
        self.register_buffer("config", torch.tensor([int(channels), int(width)]))

    def residual(self, x: Tensor) -> Tensor:
        """ε·tanh(g(x)): the bounded perturbation before clipping."""
        return self.eps.to(x.dtype) * torch.tanh(self.net(x))

    def apply(self, x: Tensor) -> Tensor:
        return (x + self.residual(x)).clamp(0, 1)

    def deliver(self, x: Tensor) -> Tensor:
        """Batched in eval mode, then rounded to 8 bits *inside* the ε ball (rounding alone can
        overshoot it by half a level: ``quantize``), on ``x``'s device."""
        with torch.no_grad():
            out = batched(self, self, x)
        return quantize(x.cpu(), out, float(self.eps)).to(x.device)

    @staticmethod
    def build(name: str, channels: int, width: int | None, eps: float) -> "GeneratorTrigger":
        entry = GENERATORS.get(name)
        w = entry.default_width if width is None else width
        return GeneratorTrigger(name, entry.build(channels, w), eps, channels, w)

    @staticmethod
    def from_state(name: str, **tensors: Tensor) -> "GeneratorTrigger":
        channels, width = (int(v) for v in tensors["config"].tolist())
        trig = GeneratorTrigger.build(name, channels, width, float(tensors["eps"]))
        trig.load_state_dict(tensors)
        return trig.eval()


for _name in GENERATORS.names():
    TRIGGERS.add(f"generator/{_name}", partial(GeneratorTrigger.from_state, _name))  # type: ignore[arg-type]
