"""Neural Cleanse (Wang et al. 2019, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks"): reverse-engineer, for every label, the smallest mask-and-pattern trigger that
sends the defender's clean images to it; a label whose trigger is abnormally small is a backdoor.

All labels are optimised at once as one batched problem: masks (L, 1, H, W) and patterns
(L, C, H, W) live in tanh space, every mini-batch of clean held-out images is stamped with every
still-active label's trigger through :class:`MaskPatternTrigger` (x(1-m) + m·p, broadcast over
labels), and the per-label losses CE(label) + cost_label·|m_label|_1 are summed (Adam is
element-wise, so this equals one optimiser per label). Defaults follow the reference code: Adam lr
0.1, betas (0.5, 0.9), mini-batches of 32, a "step" is one pass over the clean data (at most
``max_epochs`` = 1000); cost 0 at start, set to ``init_cost`` = 1e-3 once the attack success is
>= 0.99 for 5 steps, then x2 after 5 steps above / ÷2^1.5 after 5 steps below; the best mask is the
one with the smallest L1 among steps with success >= 0.99; a label stops after 25 steps without a
1% improvement once its cost has gone both up and down.

Detection: anomaly index = |L1 - median| / (1.4826·MAD) over labels; labels with an index above
``anomaly_threshold`` = 2 and an L1 below the median are flagged. ``anomaly_index`` is the index of
the smallest-L1 label (the model's score). ``max_images`` (0 = all held-out images) is for quick
tests. The plot is the grid of reversed masks, patterns and masked patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks.triggers import MaskPatternTrigger
from ..data.core import to_float
from ..errors import ConfigError
from ..models import Classifier
from ..plots import image_grid
from ..validate import check_positive, check_rate
from .base import DEFENSES, Defense, DefenseKind, DefenseParams, check_int, frozen
from .view import DefenderView, GroundTruth, limit

EPS = 1e-7


@dataclass
class NeuralCleanseParams(DefenseParams):
    init_cost: float = 1e-3
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    batch_size: int = 32
    max_epochs: int = 1000
    success_threshold: float = 0.99
    patience: int = 5
    cost_up: float = 2.0
    cost_down: float = 2.0**1.5
    early_stop_patience: int = 25
    early_stop_threshold: float = 0.99
    anomaly_threshold: float = 2.0
    max_images: int = 0  # 0: all of the defender's held-out images

    def validate(self) -> None:
        for f in ("init_cost", "lr", "cost_up", "cost_down", "anomaly_threshold"):
            check_positive(f, getattr(self, f))
        for f in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f, f"must lie in [0, 1), got {getattr(self, f)}")
        for f in ("batch_size", "max_epochs", "patience", "early_stop_patience"):
            check_int(f, getattr(self, f))
        check_int("max_images", self.max_images, 0)
        check_rate("success_threshold", self.success_threshold)
        check_rate("early_stop_threshold", self.early_stop_threshold)


def squash(t: Tensor) -> Tensor:
    return torch.tanh(t) / (2 - EPS) + 0.5


def unsquash(v: Tensor) -> Tensor:
    return torch.atanh((v - 0.5) * (2 - EPS))


def reverse_engineer(model: Classifier, x: Tensor, num_classes: int, p: NeuralCleanseParams, seed: int, device: torch.device) -> dict[str, Tensor]:
    """Smallest triggers for every label at once. ``x``: the defender's clean images (uint8 N, C, H, W)."""
    n, c, h, w = x.shape
    L = num_classes
    g = torch.Generator().manual_seed(seed)
    mask_t = unsquash(torch.rand(L, 1, h, w, generator=g)).to(device).requires_grad_(True)
    pat_t = unsquash(torch.rand(L, c, h, w, generator=g)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_t, pat_t], lr=p.lr, betas=(p.beta1, p.beta2))
    labels = torch.arange(L, device=device)
    z = lambda dtype=torch.long: torch.zeros(L, dtype=dtype, device=device)  # noqa: E731
    cost, set_cnt, up_cnt, down_cnt, es_cnt = z(torch.float), z(), z(), z(), z()
    up_flag, down_flag = z(torch.bool), z(torch.bool)
    active = torch.ones(L, dtype=torch.bool, device=device)
    best_reg = torch.full((L,), float("inf"), device=device)
    es_best = torch.full((L,), float("inf"), device=device)
    best_mask, best_pat = squash(mask_t.detach()).clone(), squash(pat_t.detach()).clone()
    epochs = z()
    xf = to_float(x).to(device)
    with frozen(model):
        for _ in range(p.max_epochs):
            if not bool(active.any()):
                break
            act = torch.nonzero(active).flatten()
            tot_reg, tot_acc = torch.zeros(L, device=device), torch.zeros(L, device=device)
            perm = torch.randperm(n, generator=g).to(device)
            nb = 0
            for s in range(0, n, p.batch_size):
                xb = xf[perm[s : s + p.batch_size]]
                m, pt = squash(mask_t[act]), squash(pat_t[act])
                stamped = MaskPatternTrigger(m[:, None], pt[:, None]).apply(xb)  # (a, B, C, H, W)
                out = model(stamped.flatten(0, 1))
                tgt = labels[act].repeat_interleave(len(xb))
                ce = F.cross_entropy(out, tgt, reduction="none").view(len(act), -1).mean(1)
                reg = m.abs().flatten(1).sum(1)
                loss = (ce + cost[act] * reg).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    tot_reg[act] += reg.detach()
                    tot_acc[act] += (out.argmax(1) == tgt).float().view(len(act), -1).mean(1)
                nb += 1
            with torch.no_grad():
                acc, reg = tot_acc / nb, tot_reg / nb
                epochs[act] += 1
                ok = active & (acc >= p.success_threshold)
                rec = ok & (reg < best_reg)
                best_reg = torch.where(rec, reg, best_reg)
                best_mask[rec], best_pat[rec] = squash(mask_t[rec]), squash(pat_t[rec])
                # early stop: no 1% improvement of the best L1 for a while, once the cost went both ways
                has = active & torch.isfinite(best_reg)
                worse = best_reg >= p.early_stop_threshold * es_best
                es_cnt = torch.where(has, torch.where(worse, es_cnt + 1, 0), es_cnt)
                es_best = torch.minimum(best_reg, es_best)
                active &= ~(up_flag & down_flag & (es_cnt >= p.early_stop_patience))
                # cost schedule
                start = (cost == 0) & ok
                set_cnt = torch.where(start, set_cnt + 1, 0)
                init = active & (set_cnt >= p.patience)
                cost = torch.where(init, torch.full_like(cost, p.init_cost), cost)
                for t in (up_cnt, down_cnt):
                    t[init] = 0
                up_flag[init], down_flag[init] = False, False
                up_cnt = torch.where(ok, up_cnt + 1, 0)
                down_cnt = torch.where(ok, 0, down_cnt + 1)
                go_up = active & (up_cnt >= p.patience)
                go_down = active & ~go_up & (down_cnt >= p.patience)
                up_cnt[go_up], down_cnt[go_down] = 0, 0
                cost = torch.where(go_up, cost * p.cost_up, torch.where(go_down, cost / p.cost_down, cost))
                up_flag |= go_up
                down_flag |= go_down
    reached = torch.isfinite(best_reg)
    with torch.no_grad():  # a label that never reached the success threshold keeps its last trigger
        best_mask[~reached], best_pat[~reached] = squash(mask_t[~reached]), squash(pat_t[~reached])
    return {"mask": best_mask.cpu(), "pattern": best_pat.cpu(), "l1": best_mask.flatten(1).sum(1).cpu(), "reached": reached.cpu(), "epochs": epochs.cpu()}


def median(v: Tensor) -> Tensor:
    """The median as the reference code computes it (numpy's): the mean of the two middle values
    for an even count. ``torch.median`` returns the lower one, which inflates the anomaly index and
    scores one label exactly 0."""
    return torch.quantile(v.double(), 0.5)


def anomaly_indices(l1: Tensor) -> tuple[Tensor, float]:
    """|L1 - median| / (1.4826·MAD) per label (MAD = median of |L1 - median|), and the median."""
    med = median(l1)
    mad = 1.4826 * median((l1.double() - med).abs())
    return ((l1.double() - med).abs() / mad.clamp_min(1e-12)).float(), float(med)


@DEFENSES.register("neural-cleanse")
class NeuralCleanse(Defense):
    name = "neural-cleanse"
    paper = "Wang et al., Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks (S&P 2019)"
    kind = DefenseKind.MODEL
    Params = NeuralCleanseParams
    headline = ("anomaly_index", "flagged_labels", "target_anomaly_index")
    p: NeuralCleanseParams

    def decide(self, view: DefenderView) -> dict[str, Any]:
        x = view.heldout.x
        x = x[limit(len(x), self.p.max_images or None, view.seed)]
        rev = reverse_engineer(view.model, x, view.num_classes, self.p, view.seed, view.device)
        idx, med = anomaly_indices(rev["l1"])
        flagged = (idx > self.p.anomaly_threshold) & (rev["l1"] < med)
        low = int(rev["l1"].argmin())
        decision: dict[str, Any] = {
            "anomaly_index": float(idx[low]),
            "smallest_l1_label": low,
            "flagged_labels": torch.nonzero(flagged).flatten().tolist(),
            "detected": bool(flagged.any()),
            "median_l1": med,
            "l1": rev["l1"].tolist(),
            "anomaly_index_per_label": idx.tolist(),
            "reached_success": rev["reached"].tolist(),
            "epochs": rev["epochs"].tolist(),
            "images": len(x),
            "masks": rev["mask"], "patterns": rev["pattern"],
        }
        path = view.plot_path("neural_cleanse_triggers.png")
        if path is not None:
            order = rev["l1"].argsort()[:16]
            m, pt = rev["mask"][order], rev["pattern"][order]
            image_grid([m, pt, m * pt], ["mask", "pattern", "mask·pattern"], path, n=len(order),
                       title=f"reversed triggers, labels by L1: {order.tolist()}; anomaly index {decision['anomaly_index']:.2f}, flagged {decision['flagged_labels']}")
            decision["plot"] = path.name
        return decision

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        t = truth.target
        return {"target_flagged": t in decision["flagged_labels"] if truth.target_mode == "all-to-one" else None,
                "target_anomaly_index": decision["anomaly_index_per_label"][t]}
