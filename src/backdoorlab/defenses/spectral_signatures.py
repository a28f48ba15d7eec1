"""Spectral Signatures (Tran, Li and Madry 2018, "Spectral Signatures in Backdoor Attacks"): poisoned
samples leave a trace along the top singular direction of their class's centred representations.

Per class (by the defender's label: as delivered in the training set, or the model's prediction on
the presented test inputs for an attack that leaves the training set clean) of the inspected set: the
penultimate representations r_i (``model.features``) are centred, v is the top right singular
vector of the centred matrix, and each sample scores |<v, r_i - mean>|.

Centring (``centre``): the paper subtracts the class's own mean (``"class"``). When the poisons
are about half of their delivered class (an all-to-one attack at a 10% rate on 10 classes), the
two halves sit at ±Δ/2 around that mean and score alike, so the paper's rule cannot tell them
apart (measured AUROC 0.55 on MNIST-5k). The default ``"heldout"`` (our choice) subtracts the mean
of the defender's clean held-out samples of that class instead: clean samples score near 0 and
poisons near |Δ| whatever their share. A class with fewer than two held-out samples falls back to
its own mean. Both AUROCs are reported (``auroc`` for the chosen centring, ``auroc_class_centred``
and ``auroc_heldout_centred``). The ``removal_factor`` = 1.5
times the expected number of poisons with the highest scores are removed, the expectation being
``assumed_poison_rate`` x class size. The assumed rate is what the defender believes, not the
attack's rate: default 0.1, our choice (configurable; never read from the attack's config).

Scored with the ground truth: ``recall`` and ``precision`` of the removed set over the whole
inspected set, ``auroc`` of the score against the true poison flag within the classes that hold
poisons (scores of different classes have different scales), ``auroc_all_classes`` pooled over
every class. The plot is the histogram of the target class's scores, clean vs poisoned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from threadpoolctl import threadpool_limits

from ..metrics.ranking import auroc
from ..plots import histograms
from ..validate import check_choice, check_positive, check_rate
from .base import DEFENSES, Defense, DefenseKind, DefenseParams
from .view import DefenderView, GroundTruth
from ..train.evaluate import features


@dataclass
class SpectralSignaturesParams(DefenseParams):
    assumed_poison_rate: float = 0.1  # (choice) the defender's guess of ε
    removal_factor: float = 1.5
    centre: Literal["heldout", "class"] = "heldout"  # (choice) the paper's is "class"

    def validate(self) -> None:
        check_choice("centre", self.centre, ("heldout", "class"))
        check_rate("assumed_poison_rate", self.assumed_poison_rate)
        check_positive("removal_factor", self.removal_factor)


def spectral_scores(reps: torch.Tensor, labels: torch.Tensor, num_classes: int, reference: torch.Tensor | None = None,
                    reference_labels: torch.Tensor | None = None) -> torch.Tensor:
    """|<v_c, r_i - μ_c>| for every sample, with v_c the top right singular vector of its class c's
    centred representations; μ_c is the class mean, or the mean of the ``reference`` samples of
    class c (the defender's clean held-out representations) when given and at least two exist."""
    scores = torch.zeros(len(reps), dtype=torch.float64)
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < 2:
            continue
        r = reps[members].double()
        ref = reference[reference_labels == c] if reference is not None and reference_labels is not None else None
        r = r - (ref.double().mean(0, keepdim=True) if ref is not None and len(ref) >= 2 else r.mean(0, keepdim=True))
        with threadpool_limits(1):  # a small SVD: LAPACK threads only spin (60x slower on a busy CPU)
            v = torch.linalg.svd(r, full_matrices=False).Vh[0]
        scores[members] = (r @ v).abs()
    return scores


@DEFENSES.register("spectral-signatures")
class SpectralSignatures(Defense):
    name = "spectral-signatures"
    paper = "Tran, Li and Madry, Spectral Signatures in Backdoor Attacks (NeurIPS 2018)"
    kind = DefenseKind.DATA
    Params = SpectralSignaturesParams
    headline = ("auroc", "recall", "precision", "target_class_precision")
    p: SpectralSignaturesParams

    def decide(self, view: DefenderView) -> dict[str, Any]:
        data, hold = view.inspected, view.heldout
        y = data.y.cpu()
        reps = features(view.model, data.x)
        by_centre = {"class": spectral_scores(reps, y, view.num_classes),
                     "heldout": spectral_scores(reps, y, view.num_classes, features(view.model, hold.x), hold.y.cpu())}
        scores = by_centre[self.p.centre]
        removed = torch.zeros(len(y), dtype=torch.bool)
        counts = torch.bincount(y, minlength=view.num_classes)
        for c in range(view.num_classes):
            members = torch.nonzero(y == c).flatten()
            k = min(len(members), math.ceil(self.p.removal_factor * self.p.assumed_poison_rate * int(counts[c])))
            if k:
                removed[members[scores[members].topk(k).indices]] = True
        return {"centre": self.p.centre, "removed": int(removed.sum()), "removed_per_class": [int((removed & (y == c)).sum()) for c in range(view.num_classes)],
                "removed_mask": removed, "scores": scores, "scores_class_centred": by_centre["class"], "scores_heldout_centred": by_centre["heldout"]}

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        y, flag = view.inspected.y.cpu(), truth.inspected_poisoned
        removed, scores = decision["removed_mask"], decision["scores"]
        hit = int((removed & flag).sum())
        poisoned_classes = torch.unique(y[flag])
        in_pc = torch.isin(y, poisoned_classes)
        f_pc = flag[in_pc]
        aurocs = {k: auroc(decision[f"scores_{k}_centred"][in_pc][~f_pc], decision[f"scores_{k}_centred"][in_pc][f_pc]) if f_pc.any() and (~f_pc).any() else float("nan")
                  for k in ("class", "heldout")}
        t = y == truth.target
        metrics: dict[str, Any] = {
            "recall": hit / max(1, int(flag.sum())),
            "precision": hit / max(1, int(removed.sum())),
            "auroc": aurocs[self.p.centre],
            "auroc_all_classes": auroc(scores[~flag], scores[flag]) if flag.any() and (~flag).any() else float("nan"),
            **{f"auroc_{k}_centred": v for k, v in aurocs.items()},
            "target_class_precision": int((removed & flag & t).sum()) / max(1, int((removed & t).sum())),
        }
        path = view.plot_path("spectral_signatures_hist.png")
        if path is not None:
            histograms({"clean": scores[t & ~flag], "poisoned": scores[t & flag]}, path, f"|<v, r - μ>| (target class, {self.p.centre} centring)", title=f"Spectral signatures, class {truth.target}: AUROC {metrics['auroc']:.3f}")
            metrics["plot"] = path.name
        return metrics
