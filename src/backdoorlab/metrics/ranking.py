"""Detection scores: AUROC and false-rejection rate at a false-acceptance rate chosen on clean data."""

from __future__ import annotations

import torch
from torch import Tensor


def auroc(scores_negative: Tensor, scores_positive: Tensor) -> float:
    """Probability that a positive (poisoned) outranks a negative (clean); ties count one half."""
    neg, pos = scores_negative.double().flatten().cpu(), scores_positive.double().flatten().cpu()
    allv = torch.cat([neg, pos])
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inv = torch.unique(allv, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
