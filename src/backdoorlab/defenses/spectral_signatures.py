"""Spectral Signatures (Tran, Li and Madry 2018, "Spectral Signatures in Backdoor Attacks"): poisoned
samples leave a trace along the top singular direction of their class's centred representations.

Per class (by the delivered label) of the inspected set (the training set as delivered): the
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
from .base import DEFENSES, Defense, DefenseContext, DefenseKind, DefenseParams
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

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        data, flag, source = ctx.inspected_set()
        y = data.y.cpu()
        reps, hold = features(ctx.model, data.x), ctx.heldout
        by_centre = {"class": spectral_scores(reps, y, ctx.num_classes),
                     "heldout": spectral_scores(reps, y, ctx.num_classes, features(ctx.model, hold.x), hold.y.cpu())}
        scores = by_centre[self.p.centre]
        removed = torch.zeros(len(y), dtype=torch.bool)
        counts = torch.bincount(y, minlength=ctx.num_classes)
        for c in range(ctx.num_classes):
            members = torch.nonzero(y == c).flatten()
            k = min(len(members), math.ceil(self.p.removal_factor * self.p.assumed_poison_rate * int(counts[c])))
            if k:
                removed[members[scores[members].topk(k).indices]] = True
        hit = int((removed & flag).sum())
        poisoned_classes = torch.unique(y[flag])
        in_pc = torch.isin(y, poisoned_classes)
        f_pc = flag[in_pc]
        aurocs = {k: auroc(v[in_pc][~f_pc], v[in_pc][f_pc]) if f_pc.any() and (~f_pc).any() else float("nan") for k, v in by_centre.items()}
        metrics: dict[str, Any] = {
            "inspected": source,
            "removed": int(removed.sum()),
            "recall": hit / max(1, int(flag.sum())),
            "precision": hit / max(1, int(removed.sum())),
            "auroc": aurocs[self.p.centre],
            "auroc_all_classes": auroc(scores[~flag], scores[flag]) if flag.any() else float("nan"),
            "centre": self.p.centre,
            **{f"auroc_{k}_centred": v for k, v in aurocs.items()},
            "target_class_precision": int((removed & flag & (y == ctx.target)).sum()) / max(1, int((removed & (y == ctx.target)).sum())),
            "removed_per_class": [int((removed & (y == c)).sum()) for c in range(ctx.num_classes)],
        }
        path = ctx.plot_path("spectral_signatures_hist.png")
        if path is not None:
            t = y == ctx.target
            histograms({"clean": scores[t & ~flag], "poisoned": scores[t & flag]}, path, f"|<v, r - μ>| (target class, {self.p.centre} centring)", title=f"Spectral signatures, class {ctx.target}: AUROC {metrics['auroc']:.3f}")
            metrics["plot"] = path.name
        return metrics
