"""Input-level detectors share one procedure: score every input (low score = poisoned), fix the
threshold on the defender's clean held-out data only (the ``frr_target`` quantile), then report
AUROC, FRR and FAR on the evaluation split and the score histograms of clean vs poisoned inputs."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..plots import histograms
from .base import Defense, DefenseContext, DefenseKind, detection_metrics, limit


class ScoreDetector(Defense):
    kind = DefenseKind.INPUT
    score_name: ClassVar[str]  # metric stem: "<score>_threshold", "mean_<score>_clean", ...
    plot_file: ClassVar[str]
    xlabel: ClassVar[str]
    title: ClassVar[str]

    def scores(self, ctx: DefenseContext, x: Tensor, g: torch.Generator) -> Tensor:
        raise NotImplementedError

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        hold, ev = ctx.heldout, ctx.evaluation
        px, _ = ctx.eval_poisoned()
        k = self.p.max_inputs or None
        clean_x, pois_x = ev.x[limit(len(ev), k, ctx.seed)], px[limit(len(px), k, ctx.seed + 1)]
        g = torch.Generator().manual_seed(ctx.seed)
        s = {name: self.scores(ctx, x, g) for name, x in (("heldout", hold.x), ("clean", clean_x), ("poisoned", pois_x))}
        det = detection_metrics(-s["clean"], -s["poisoned"], -s["heldout"], self.p.frr_target)
        n = self.score_name
        metrics: dict[str, Any] = {
            "auroc": det["auroc"], "frr": det["frr"], "far": det["far"],
            f"{n}_threshold": -det["threshold"],
            f"mean_{n}_clean": float(s["clean"].mean()),
            f"mean_{n}_poisoned": float(s["poisoned"].mean()) if len(pois_x) else float("nan"),
            "scored_clean": len(clean_x), "scored_poisoned": len(pois_x),
        }
        path = ctx.plot_path(self.plot_file)
        if path is not None:
            histograms({"clean": s["clean"], "poisoned": s["poisoned"]}, path, self.xlabel,
                       title=f"{self.title}: AUROC {det['auroc']:.3f}, FRR {det['frr']:.3f}, FAR {det['far']:.3f}")
            metrics["plot"] = path.name
        return metrics
