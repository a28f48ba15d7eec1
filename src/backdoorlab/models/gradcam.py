"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization") for any :class:`Classifier`: which input region a class's logit
rests on, as seen from one stage's feature map.

For a batch, the stage's output A (N, K, h, w) is computed once; the gradient of the chosen class
logit y_c with respect to A gives per-channel weights α_k = mean over (h, w) of ∂y_c/∂A_k; the map
is ReLU(Σ_k α_k A_k), upsampled bilinearly to the input size and divided by its maximum per image
(an all-zero map stays zero). Default stage: ``model.conv_stage`` (the last convolutional feature
map, as the paper takes); default class: the model's prediction. One backward pass per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Classifier


def grad_cam(model: Classifier, x: Tensor, target: Tensor | None = None, stage: str | None = None, batch_size: int = 256) -> Tensor:
    """Heat maps (N, H, W) in [0, 1] for float images ``x`` (N, C, H, W) in [0, 1] on the model's
    device; ``target`` (N,) the classes explained (default: the predictions)."""
    stage = stage or model.conv_stage
    was = model.training
    model.eval()
    maps = []
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size]
        with torch.enable_grad():
            a = model.forward_to(xb, stage).detach().requires_grad_(True)
            out = model.forward_from(a, stage)
            cls = out.argmax(1) if target is None else target[s : s + batch_size].to(out.device)
            (grad,) = torch.autograd.grad(out.gather(1, cls[:, None]).sum(), a)
        if a.dim() != 4:
            raise ValueError(f"stage {stage!r} gives {tuple(a.shape)}, not a (N, K, h, w) feature map")
        cam = F.relu((grad.mean((2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        maps.append(cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1))
    model.train(was)
    return torch.cat(maps) if maps else x.new_zeros(0, *x.shape[-2:])
