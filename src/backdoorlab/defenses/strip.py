"""STRIP (Gao et al. 2019, "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks"): an
input carrying a trigger keeps its (target) prediction when other images are superimposed on it,
so its predictions under perturbation have a low entropy.

For every input, ``n_overlays`` = 100 images drawn at random (fixed seed) from the defender's clean
held-out data are superimposed on it; the score is the mean Shannon entropy (in bits) of the
softmax over the superimposed copies. ``superimpose="add"`` (default) adds the two images and clips
to [0, 1], as the reference code's ``addWeighted(background, 1, overlay, 1, 0)`` does;
``superimpose="blend"`` averages them 0.5/0.5. All copies of a chunk of inputs go through the model
as one batch.

The entropy threshold is fixed on clean data only: the ``frr_target`` = 1% quantile of the
entropies of the held-out images, so 1% of the defender's clean inputs are rejected. Reported:
``frr`` (clean evaluation inputs rejected), ``far`` (poisoned evaluation inputs accepted), ``auroc``
(clean vs poisoned, low entropy = poisoned) and the entropy histograms. The inputs scored are
those the job presents (``DefenseJob.max_inputs`` clean and as many poisoned, default 1,000 each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..data.core import to_float
from ..models import Classifier
from ..validate import check_rate
from .base import DEFENSES, DefenseParams, check_int
from .input_detection import ScoreDetector
from .view import DefenderView


@dataclass
class StripParams(DefenseParams):
    n_overlays: int = 100
    superimpose: Literal["add", "blend"] = "add"
    frr_target: float = 0.01
    chunk: int = 32  # inputs per forward batch (chunk x n_overlays images)

    def validate(self) -> None:
        check_int("n_overlays", self.n_overlays)
        check_rate("frr_target", self.frr_target)
        check_int("chunk", self.chunk)


@torch.no_grad()
def strip_entropy(model: Classifier, x: Tensor, overlays: Tensor, n: int, mode: str, chunk: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Mean softmax entropy (bits) of each input under ``n`` random superimpositions from ``overlays``."""
    model.eval()
    out = []
    for s in range(0, len(x), chunk):
        xb = to_float(x[s : s + chunk]).to(device)
        pick = torch.randint(0, len(overlays), (len(xb), n), generator=generator)
        ov = to_float(overlays[pick.flatten()]).to(device).view(len(xb), n, *xb.shape[1:])
        mixed = (xb[:, None] + ov).clamp(0, 1) if mode == "add" else 0.5 * xb[:, None] + 0.5 * ov
        prob = torch.softmax(model(mixed.flatten(0, 1)).float(), 1)
        ent = -(prob * torch.log2(prob.clamp_min(1e-12))).sum(1)
        out.append(ent.view(len(xb), n).mean(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


@DEFENSES.register("strip")
class Strip(ScoreDetector):
    name = "strip"
    paper = "Gao et al., STRIP: A Defence Against Trojan Attacks on Deep Neural Networks (ACSAC 2019)"
    Params = StripParams
    score_name = "entropy"
    plot_file = "strip_entropy.png"
    xlabel = "mean entropy under superimposition (bits)"
    headline = ("auroc", "frr", "far")
    p: StripParams

    def scores(self, view: DefenderView, x: Tensor, g: torch.Generator) -> Tensor:
        return strip_entropy(view.model, x, view.heldout.x, self.p.n_overlays, self.p.superimpose, self.p.chunk, g, view.device)

    @property
    def title(self) -> str:  # type: ignore[override]
        return f"STRIP ({self.p.superimpose})"
