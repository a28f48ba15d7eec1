"""Perturbation and image-quality metrics on batches of images in [0, 1]: L0, L∞, L2, PSNR, SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.core import to_float


def perturbation_norms(clean: Tensor, poisoned: Tensor) -> dict[str, float]:
    """Mean L∞, L2 and L0 (changed pixel positions, any channel, at 1/255 resolution) per image."""
    d = to_float(poisoned).cpu() - to_float(clean).cpu()
    flat = d.flatten(1)
    l0 = ((d.abs() > 0.5 / 255).any(1)).flatten(1).sum(1).float()
    return {
        "mean_perturbation_linf": float(flat.abs().amax(1).mean()),
        "mean_perturbation_l2": float(flat.norm(dim=1).mean()),
        "mean_perturbation_l0": float(l0.mean()),
    }


def psnr(clean: Tensor, poisoned: Tensor) -> float:
    mse = (to_float(poisoned).cpu() - to_float(clean).cpu()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _gauss(size: int = 11, sigma: float = 1.5) -> Tensor:
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(x: Tensor, y: Tensor, size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image (Wang et al. 2004, Gaussian window, per channel, valid region) of float
    batches in [0, 1], on their device and differentiable: the metric and a training loss share it."""
    c = x.shape[1]
    size = min(size, x.shape[-1], x.shape[-2])
    w = _gauss(size, sigma).to(x.device, x.dtype)[None, None].repeat(c, 1, 1, 1)
    conv = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = conv(x), conv(y)
    sxx, syy, sxy = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def ssim(clean: Tensor, poisoned: Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over the batch (:func:`ssim_per_image`)."""
    return float(ssim_per_image(to_float(clean).cpu().float(), to_float(poisoned).cpu().float(), size, sigma).mean())


def image_quality(clean: Tensor, poisoned: Tensor) -> dict[str, float]:
    out = perturbation_norms(clean, poisoned)
    out["psnr"] = psnr(clean, poisoned)
    out["ssim"] = ssim(clean, poisoned)
    return out
