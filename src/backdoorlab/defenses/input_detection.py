"""Input-level detectors share one procedure: score every input (low score = poisoned, or high with
``high_is_poisoned``) and fix the threshold on the defender's clean held-out data only (the
``frr_target`` quantile); the decision rejects the presented inputs beyond it. Scored with the truth: AUROC, FRR and FAR over the
presented clean and poisoned inputs, and the score histograms of both.

The held-out scores depend on the model, the held-out data, the parameters and the seed only, so
with a cache folder (a grid's) they are computed once per model and restored, with the random
generator's state after them, by every later run on the same model (a grid's MMLM entries and the
clean-model controls of every attack): the restored run's decision is bit for bit the one it would
have computed (tested)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..artifacts import write_safetensors
from ..plots import histograms
from .base import Defense, DefenseKind, detection_metrics, heldout_threshold
from .memo import locked, memo_dir
from .view import DefenderView, GroundTruth


class ScoreDetector(Defense):
    kind = DefenseKind.INPUT
    score_name: ClassVar[str]  # metric stem: "<score>_threshold", "mean_<score>_clean", ...
    plot_file: ClassVar[str]
    xlabel: ClassVar[str]
    title: ClassVar[str]
    high_is_poisoned: ClassVar[bool] = False  # orientation of the score (STRIP, CD: low = poisoned)

    def scores(self, view: DefenderView, x: Tensor, g: torch.Generator) -> Tensor:
        raise NotImplementedError

    def decide(self, view: DefenderView) -> dict[str, Any]:
        g = torch.Generator().manual_seed(view.seed)
        held, reused = self.heldout_scores(view, g)
        s = self.scores(view, view.inputs, g)
        return {**self.threshold_decision(held, s), "heldout_scores_reused": reused}

    def heldout_scores(self, view: DefenderView, g: torch.Generator) -> tuple[Tensor, bool]:
        """The held-out images' scores, and whether they came from the cache; ``g`` is left in the
        state the computation leaves it in either way."""
        memo = memo_dir(self, view, f"{self.name}-heldout-{view.device.type}")
        if memo is None:
            return self.scores(view, view.heldout.x, g), False
        with locked(memo):
            f = memo / "heldout.safetensors"
            if f.exists():
                t = load_file(f)
                g.set_state(t["generator_state"])
                return t["scores"], True
            held = self.scores(view, view.heldout.x, g)
            memo.mkdir(parents=True, exist_ok=True)
            write_safetensors(f, {"scores": held, "generator_state": g.get_state()})  # atomic
            return held, False

    def threshold_decision(self, held: Tensor, s: Tensor) -> dict[str, Any]:
        """The threshold from the held-out scores ``held`` and the rejections among the inputs' ``s``."""
        sign = 1.0 if self.high_is_poisoned else -1.0
        thr = sign * heldout_threshold(sign * held, self.p.frr_target)
        rejected = sign * s > sign * thr
        return {f"{self.score_name}_threshold": thr, "scores": s, "heldout_scores": held, "rejected": rejected,
                "rejected_fraction": float(rejected.float().mean()) if len(s) else float("nan")}

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        s, flag, n = decision["scores"], truth.inputs_poisoned, self.score_name
        clean, pois = s[~flag], s[flag]
        sign = 1.0 if self.high_is_poisoned else -1.0
        det = detection_metrics(sign * clean, sign * pois, sign * decision[f"{n}_threshold"])
        metrics: dict[str, Any] = {
            **det,
            f"mean_{n}_clean": float(clean.mean()) if len(clean) else float("nan"),
            f"mean_{n}_poisoned": float(pois.mean()) if len(pois) else float("nan"),
            "scored_clean": len(clean), "scored_poisoned": len(pois),
        }
        path = view.plot_path(self.plot_file)
        if path is not None:
            histograms({"clean": clean, "poisoned": pois}, path, self.xlabel,
                       title=f"{self.title}: AUROC {det['auroc']:.3f}, FRR {det['frr']:.3f}, FAR {det['far']:.3f}")
            metrics["plot"] = path.name
        return metrics
