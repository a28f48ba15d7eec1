"""Greedy nearest-first pairing (as in Saha et al. 2020's hidden-trigger attack), batched.

The greedy matching repeatedly takes the globally closest remaining pair. Every mutually-nearest
pair of the remaining sets is taken by that greedy order, so it can be built in rounds of
mutually-nearest pairs, each round one batched argmin, instead of a Python loop over pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy_pairs(dist: Tensor, allowed: Tensor | None = None) -> Tensor:
    """For each row (e.g. an image), the column (e.g. a target code) it is paired with.

    Pairs are one-to-one while columns last; when rows outnumber columns, the pool of columns is
    renewed for the rows left (so every row gets a partner). ``allowed`` (bool, same shape) masks
    pairs that may not be formed; a row with no allowed column falls back to all columns.
    """
    m, q = dist.shape
    if q == 0:
        raise ValueError("no columns to pair with")
    d = dist.double().clone()
    if allowed is not None:
        none = ~allowed.any(1)
        allowed = allowed.clone()
        allowed[none] = True
        d[~allowed] = float("inf")
    out = torch.full((m,), -1, dtype=torch.long)
    rows_left = torch.ones(m, dtype=torch.bool)
    while bool(rows_left.any()):
        cols_left = torch.ones(q, dtype=torch.bool)
        while bool(rows_left.any()) and bool(cols_left.any()):
            cur = d.clone()
            cur[~rows_left] = float("inf")
            cur[:, ~cols_left] = float("inf")
            best_col = cur.argmin(1)
            best_row = cur.argmin(0)
            r = torch.nonzero(rows_left).flatten()
            c = best_col[r]
            finite = torch.isfinite(cur[r, c])
            mutual = (best_row[c] == r) & finite
            if not bool(mutual.any()):  # only forbidden pairs remain for these rows: renew the pool
                break
            rr, cc = r[mutual], c[mutual]
            out[rr] = cc
            rows_left[rr] = False
            cols_left[cc] = False
    return out
