"""SentiNet (Chou, Tramèr and Pellegrino 2020, "SentiNet: Detecting Localized Universal Attacks
Against Deep Learning Systems"): the region an input's prediction rests on is cut out and pasted
onto clean images; a trigger's region carries its label with it ("fools" the clean images), a
natural object's region does not, and an inert pattern pasted in the same place leaves the model
unsure where a trigger would make it sure.

Per input x with predicted label y:

1. the salient region: the ``mask_fraction`` (our choice, 0.1) highest-scoring pixels of the
   Grad-CAM map of y (:mod:`backdoorlab.models.gradcam`, by default at the last convolutional
   stage, another with ``stage``; the paper adds class proposals and selective search, which we
   leave out);
2. ``fooled``: the region of x pasted onto ``n_overlays`` (100) clean held-out images (one fixed
   draw for every input), the fraction of those pasted images predicted as y, counting only the
   overlays that the model does not already put in class y;
3. ``avgconf``: uniform noise (the inert pattern) pasted into the same region of the same
   images, the mean top-class softmax confidence.

The decision boundary comes from the defender's clean held-out images only, as in the paper: their
(avgconf, fooled) points are cut into ``bins`` (10) equal avgconf intervals, the largest fooled
value of each occupied interval is taken, and a degree-2 polynomial is fitted through those upper
points (least squares; a constant when fewer than three intervals are occupied), held flat outside
the clean points' avgconf range. An input's score is its height above that curve (high = poisoned); the threshold is the usual ``frr_target`` = 1%
quantile of the held-out scores (:mod:`backdoorlab.defenses.input_detection`). Reported: AUROC, FRR,
FAR, the score histograms, the paper's fooled-vs-avgconf scatter with the curve, and a heat-map
figure (inputs, Grad-CAM maps, the regions cut out) for clean and poisoned inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.core import to_float
from ..errors import ConfigError
from ..models import Classifier
from ..models.gradcam import grad_cam
from ..plots import image_grid, scatter
from ..validate import check_fraction, check_rate
from .base import DEFENSES, DefenseParams, check_int
from .input_detection import ScoreDetector
from .view import DefenderView, GroundTruth


@dataclass
class SentiNetParams(DefenseParams):
    mask_fraction: float = 0.1  # (choice) share of the image taken as the salient region
    n_overlays: int = 100  # (choice) clean images the region is pasted on
    bins: int = 10  # avgconf intervals of the boundary fit
    frr_target: float = 0.01
    chunk: int = 16  # inputs per forward batch (chunk x n_overlays images, twice)
    heatmap_images: int = 6  # clean and poisoned inputs shown in the heat-map figure (0 = none)
    stage: str = ""  # the Grad-CAM layer (a stage name); "" = the model's last convolutional stage (the paper's)

    def validate(self) -> None:
        check_fraction("mask_fraction", self.mask_fraction)
        check_int("n_overlays", self.n_overlays)
        check_int("bins", self.bins)
        check_rate("frr_target", self.frr_target)
        check_int("chunk", self.chunk)
        check_int("heatmap_images", self.heatmap_images, 0)


def salient_masks(model: Classifier, x: Tensor, fraction: float, stage: str = "") -> tuple[Tensor, Tensor]:
    """Grad-CAM maps of the predicted labels (N, H, W) and the binary masks (N, 1, H, W) of each
    map's top ``fraction`` of pixels (ties broken by position)."""
    cam = grad_cam(model, x, stage=stage or None)
    flat = cam.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    mask = torch.zeros_like(flat).scatter_(1, flat.topk(k, 1).indices, 1.0)
    return cam, mask.view(len(x), 1, *x.shape[-2:])


@torch.no_grad()
def sentinet_points(model: Classifier, x: Tensor, overlays: Tensor, p: SentiNetParams, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """(fooled, avgconf) per input ``x`` (uint8 or float) with the clean ``overlays`` (float, on device)."""
    model.eval()
    over_pred = model(overlays).argmax(1)
    fooled, conf = [], []
    for s in range(0, len(x), p.chunk):
        xb = to_float(x[s : s + p.chunk]).to(device)
        y = model(xb).argmax(1)
        with torch.enable_grad():
            _, m = salient_masks(model, xb, p.mask_fraction, p.stage)
        m = m[:, None]  # (B, 1, 1, H, W)
        pasted = overlays[None] * (1 - m) + xb[:, None] * m  # (B, n, C, H, W)
        pred = model(pasted.flatten(0, 1)).argmax(1).view(len(xb), -1)
        other = over_pred[None] != y[:, None]
        fooled.append((((pred == y[:, None]) & other).sum(1) / other.sum(1).clamp_min(1)).cpu())
        noise = torch.rand(pasted.shape, generator=g).to(device)
        inert = overlays[None] * (1 - m) + noise * m
        conf.append(torch.softmax(model(inert.flatten(0, 1)).float(), 1).amax(1).view(len(xb), -1).mean(1).cpu())
    empty = torch.empty(0)
    return (torch.cat(fooled) if fooled else empty), (torch.cat(conf) if conf else empty)


def fit_boundary(avgconf: Tensor, fooled: Tensor, bins: int) -> list[float]:
    """The avgconf range of the clean points, then the polynomial coefficients (highest power
    first) through their per-interval maxima."""
    a, f = avgconf.double().numpy(), fooled.double().numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(a, edges) - 1, 0, bins - 1)
    xs, ys = [], []
    for b in np.unique(which):
        sel = which == b
        top = int(np.argmax(f[sel]))
        xs.append(a[sel][top])
        ys.append(f[sel][top])
    lo, hi = (float(a.min()), float(a.max())) if len(a) else (0.0, 1.0)
    if len(xs) < 3:
        return [lo, hi, float(max(ys)) if ys else 0.0]
    return [lo, hi, *(float(c) for c in np.polyfit(xs, ys, 2))]


def boundary_at(boundary: list[float], avgconf: np.ndarray) -> np.ndarray:
    """The curve at ``avgconf``, held flat outside the clean points' range (no extrapolation)."""
    lo, hi, *coef = boundary
    return np.polyval(coef, np.clip(avgconf, lo, hi))


def above_boundary(boundary: list[float], avgconf: Tensor, fooled: Tensor) -> Tensor:
    return (fooled.double() - torch.from_numpy(boundary_at(boundary, avgconf.double().numpy()))).float()


@DEFENSES.register("sentinet")
class SentiNet(ScoreDetector):
    name = "sentinet"
    paper = "Chou, Tramèr and Pellegrino, SentiNet: Detecting Localized Universal Attacks Against Deep Learning Systems (IEEE S&P Workshops 2020)"
    Params = SentiNetParams
    score_name = "above_boundary"
    plot_file = "sentinet_scores.png"
    xlabel = "fooled rate above the clean boundary"
    title = "SentiNet"
    high_is_poisoned = True
    headline = ("auroc", "frr", "far")
    p: SentiNetParams

    def decide(self, view: DefenderView) -> dict[str, Any]:
        if self.p.stage and self.p.stage not in view.model.stage_names[:-1]:
            raise ConfigError("params.stage", f"{self.p.stage!r} is not a stage of {view.model.arch.name} before its head: {view.model.stage_names[:-1]}")
        g = torch.Generator().manual_seed(view.seed)
        hold = view.heldout.x
        pick = torch.randperm(len(hold), generator=g)[: self.p.n_overlays]
        overlays = to_float(hold[pick]).to(view.device)
        hf, hc = sentinet_points(view.model, hold, overlays, self.p, g, view.device)
        f, c = sentinet_points(view.model, view.inputs, overlays, self.p, g, view.device)
        coef = fit_boundary(hc, hf, self.p.bins)
        out = self.threshold_decision(above_boundary(coef, hc, hf), above_boundary(coef, c, f))
        return {**out, "boundary": coef, "fooled": f, "avgconf": c, "heldout_fooled": hf, "heldout_avgconf": hc}

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        metrics = super().score(view, decision, truth)
        flag = truth.inputs_poisoned
        f, c = decision["fooled"], decision["avgconf"]
        metrics["mean_fooled_clean"] = float(f[~flag].mean()) if bool((~flag).any()) else float("nan")
        metrics["mean_fooled_poisoned"] = float(f[flag].mean()) if bool(flag.any()) else float("nan")
        path = view.plot_path("sentinet_fooled_avgconf.png")
        if path is not None:
            grid = np.linspace(0, 1, 101)
            scatter({"clean": torch.stack([c[~flag], f[~flag]], 1), "poisoned": torch.stack([c[flag], f[flag]], 1)}, path,
                    f"SentiNet: AUROC {metrics['auroc']:.3f}", (grid, boundary_at(decision["boundary"], grid)), "avgconf (inert pattern)", "fooled rate")
            metrics["scatter_plot"] = path.name
        k = self.p.heatmap_images
        path = view.plot_path("sentinet_gradcam.png")
        if path is not None and k > 0:
            x = to_float(torch.cat([view.inputs[~flag][:k], view.inputs[flag][:k]])).to(view.device)
            cam, m = salient_masks(view.model, x, self.p.mask_fraction, self.p.stage)
            heat = cam[:, None].expand_as(x)
            image_grid([x.cpu(), heat.cpu(), (x * m).cpu()], ["input", "Grad-CAM", "region"], path, n=len(x),
                       title=f"SentiNet regions: {min(k, int((~flag).sum()))} clean, then poisoned inputs")
            metrics["heatmap_plot"] = path.name
        return metrics
