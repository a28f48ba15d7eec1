"""SCALE-UP (Guo et al. 2023, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via
Analyzing Scaled Prediction Consistency"): the prediction of an input carrying a trigger survives
amplifying its pixel values, the prediction of a clean input less often.

Every input x is scaled to clamp(n·x, 0, 1) for n in ``scales`` = (3, 5, 7, 9, 11) (the reference
code's scaling set; the WB and SIBA papers use five scales too). The paper's score,
``score="spc"`` (default), is the scaled prediction consistency: the fraction of the scaled copies
that keep x's own predicted label (high = poisoned; the paper thresholds it, SIBA at 0.8).
``score="soft"`` (our choice, not the paper's) averages the softmax probability of x's label over
the scaled copies instead: on near-binary images (MNIST digits) the strokes saturate at n = 3
already, so almost every clean digit keeps its label and the fraction ties at 1 for clean and
poisoned inputs alike, while the probability still moves (docs/results.md §12). All scaled copies
of a chunk of inputs go through the model as one batch.

As every input detector here (:mod:`backdoorlab.defenses.input_detection`), the threshold is the
``frr_target`` = 1% quantile of the scores of the defender's clean held-out images (ties at the
top mean fewer rejections); reported: AUROC, FRR, FAR and the score histograms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..data.core import to_float
from ..errors import ConfigError
from ..models import Classifier
from ..validate import check_choice, check_rate
from .base import DEFENSES, DefenseParams, check_int
from .input_detection import ScoreDetector
from .view import DefenderView


@dataclass
class ScaleUpParams(DefenseParams):
    scales: tuple[float, ...] = (3, 5, 7, 9, 11)
    score: Literal["spc", "soft"] = "spc"
    frr_target: float = 0.01
    chunk: int = 256  # inputs per forward batch (chunk x len(scales) images)

    def validate(self) -> None:
        if not self.scales or not all(isinstance(n, (int, float)) and not isinstance(n, bool) and 1 < n < 1e6 for n in self.scales):
            raise ConfigError("scales", f"must be a non-empty list of factors above 1, got {self.scales!r}")
        check_choice("score", self.score, ("spc", "soft"))
        check_rate("frr_target", self.frr_target)
        check_int("chunk", self.chunk)


@torch.no_grad()
def scaled_consistency(model: Classifier, x: Tensor, scales: tuple[float, ...], soft: bool, chunk: int, device: torch.device) -> Tensor:
    """Per input: the fraction of the copies clamp(n·x, 0, 1) predicted as x is (``soft``: the mean
    softmax probability of x's label over the copies)."""
    model.eval()
    n = torch.tensor([float(s) for s in scales], device=device).view(-1, 1, 1, 1, 1)
    out = []
    for s in range(0, len(x), chunk):
        xb = to_float(x[s : s + chunk]).to(device)
        label = model(xb).argmax(1)
        scaled = (n * xb[None]).clamp(0, 1).flatten(0, 1)  # (S·B, C, H, W), scale-major
        logits = model(scaled).float().view(len(n), len(xb), -1)
        if soft:
            kept = torch.softmax(logits, 2).gather(2, label.view(1, -1, 1).expand(len(n), -1, 1))[..., 0]
        else:
            kept = (logits.argmax(2) == label[None]).float()
        out.append(kept.mean(0).cpu())
    return torch.cat(out) if out else torch.empty(0)


@DEFENSES.register("scale-up")
class ScaleUp(ScoreDetector):
    name = "scale-up"
    paper = "Guo et al., SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled Prediction Consistency (ICLR 2023)"
    Params = ScaleUpParams
    score_name = "consistency"
    plot_file = "scale_up_consistency.png"
    high_is_poisoned = True
    headline = ("auroc", "frr", "far")
    p: ScaleUpParams

    def scores(self, view: DefenderView, x: Tensor, g: torch.Generator) -> Tensor:
        return scaled_consistency(view.model, x, tuple(self.p.scales), self.p.score == "soft", self.p.chunk, view.device)

    @property
    def xlabel(self) -> str:  # type: ignore[override]
        return "scaled prediction consistency" if self.p.score == "spc" else "mean probability of the label under scaling"

    @property
    def title(self) -> str:  # type: ignore[override]
        return f"SCALE-UP ({self.p.score})"
