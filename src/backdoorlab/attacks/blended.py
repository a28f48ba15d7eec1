"""Blended (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning"): a whole-image trigger t blended into a fraction of the training images,
x' = (1 - α)·x + α·t, relabelled to η(y).

The paper blends a Hello Kitty photo (or random noise) with α = 0.2 at training time. No such photo
ships offline, so the trigger image is one of scikit-image's bundled sample photos (default
``astronaut``: our choice) resized to the dataset's shape and converted to its channel count, or
uniform random noise (``image="noise"``, seeded with the run's seed). The trigger is a
:class:`MaskPatternTrigger` whose mask is α everywhere, so training and test images use the same α.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validate import check_choice, check_fraction
from .base import ATTACKS, AttackContext, PoisonParams, PoisoningAttack
from .triggers import MaskPatternTrigger, Trigger

# scikit-image sample photos bundled with the package (no download needed), plus seeded noise
BLEND_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "noise")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights to turn an RGB photo into one grey channel


@dataclass
class BlendedParams(PoisonParams):
    """``alpha``: blend weight α of the trigger (paper: 0.2). ``image``: a name in ``BLEND_IMAGES``
    (default ``astronaut``, our choice: the paper's Hello Kitty photo is not available offline)."""

    alpha: float = 0.2
    image: str = "astronaut"

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        check_fraction("alpha", self.alpha)
        check_choice("image", self.image, BLEND_IMAGES)


def blend_image(name: str, shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    """The trigger image t as float (C, H, W) in [0, 1] for a dataset of ``shape`` = (C, H, W)."""
    check_choice("image", name, BLEND_IMAGES)
    c, h, w = shape
    if name == "noise":
        return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed))
    import skimage.data

    img = torch.from_numpy(getattr(skimage.data, name)().copy()).float().div_(255.0)
    img = img[None] if img.dim() == 2 else img.permute(2, 0, 1)[:3]  # (C0, H0, W0)
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    if img.shape[0] == c:
        return img
    grey = (img * torch.tensor(LUMA)[:, None, None]).sum(0, keepdim=True) if img.shape[0] == 3 else img
    return grey.expand(c, h, w).clone()


def blend_trigger(shape: tuple[int, int, int], alpha: float, image: str = "astronaut", seed: int = 0) -> MaskPatternTrigger:
    """x' = (1 - α)·x + α·t as a mask-pattern trigger with a constant mask α."""
    check_fraction("alpha", alpha)
    _, h, w = shape
    return MaskPatternTrigger(torch.full((1, h, w), float(alpha)), blend_image(image, shape, seed))


@ATTACKS.register("blended")
class Blended(PoisoningAttack):
    name = "blended"
    paper = "Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning (2017)"
    Params = BlendedParams
    p: BlendedParams

    def make_trigger(self, ctx: AttackContext) -> Trigger:
        return blend_trigger(ctx.data.spec.shape, self.p.alpha, self.p.image, ctx.seed)
