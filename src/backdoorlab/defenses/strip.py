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
(clean vs poisoned, low entropy = poisoned) and the entropy histograms. At most ``max_inputs``
clean and as many poisoned evaluation inputs are scored (default 1000 each, our choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..data.core import to_float
from ..models import Classifier
from ..plots import histograms
from ..validate import check_rate
from .base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseParams, check_int, detection_metrics, limit


@dataclass
class StripParams(DefenseParams):
    n_overlays: int = 100
    superimpose: Literal["add", "blend"] = "add"
    frr_target: float = 0.01
    max_inputs: int = 1000  # (choice) per group; 0 = all
    chunk: int = 32  # inputs per forward batch (chunk x n_overlays images)

    def validate(self) -> None:
        check_int("n_overlays", self.n_overlays)
        check_rate("frr_target", self.frr_target)
        check_int("max_inputs", self.max_inputs, 0)
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
class Strip(Defense):
    name = "strip"
    paper = "Gao et al., STRIP: A Defence Against Trojan Attacks on Deep Neural Networks (ACSAC 2019)"
    kind = DefenseKind.INPUT
    Params = StripParams
    headline = ("auroc", "frr", "far")
    p: StripParams

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        hold, ev = ctx.heldout, ctx.evaluation
        px, _ = ctx.eval_poisoned()
        k = self.p.max_inputs or None
        clean_x, pois_x = ev.x[limit(len(ev), k, ctx.seed)], px[limit(len(px), k, ctx.seed + 1)]
        g = torch.Generator().manual_seed(ctx.seed)
        ent = {name: strip_entropy(ctx.model, x, hold.x, self.p.n_overlays, self.p.superimpose, self.p.chunk, g, ctx.device)
               for name, x in (("heldout", hold.x), ("clean", clean_x), ("poisoned", pois_x))}
        det = detection_metrics(-ent["clean"], -ent["poisoned"], -ent["heldout"], self.p.frr_target)
        metrics: dict[str, Any] = {
            "auroc": det["auroc"],
            "frr": det["frr"],
            "far": det["far"],
            "entropy_threshold": -det["threshold"],
            "mean_entropy_clean": float(ent["clean"].mean()),
            "mean_entropy_poisoned": float(ent["poisoned"].mean()) if len(pois_x) else float("nan"),
            "scored_clean": len(clean_x),
            "scored_poisoned": len(pois_x),
        }
        path = ctx.plot_path("strip_entropy.png")
        if path is not None:
            histograms({"clean": ent["clean"], "poisoned": ent["poisoned"]}, path, "mean entropy under superimposition (bits)",
                       title=f"STRIP ({self.p.superimpose}): AUROC {det['auroc']:.3f}, FRR {det['frr']:.3f}, FAR {det['far']:.3f}")
            metrics["plot"] = path.name
        return metrics
