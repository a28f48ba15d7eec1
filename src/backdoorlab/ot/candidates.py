"""Exact cell assignment from a few candidate cells per sample (the OT solver's fast step).

A Monte Carlo sample x_s lies in the cell argmax_i (S_si + h_i), S = X·Yᵀ fixed for a fixed sample
set. At a refresh, with potential h0, each sample keeps its K best cells (``cells``, with their
S values) and ``bound_s``, the (K+1)-th best value of S_s + h0. Later, for the current h, any cell j
outside the candidates scores S_sj + h_j <= bound_s + max_j (h_j - h0_j), so when the best candidate
beats that, it is the argmax over all n cells: the same answer as the full pass, from K values
instead of n. Samples where the test fails (h moved too far for them) are recomputed in full, and
all candidates are refreshed once more than ``refresh_fraction`` of the samples fail. Candidates
are kept in ascending cell order, so ties resolve to the lowest index as ``torch.argmax`` does.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


class CandidateCells:
    """Top-K candidate cells per sample, refreshed when the potential has moved too far."""

    def __init__(self, k: int, refresh_fraction: float = 0.005) -> None:
        self.k, self.refresh_fraction = k, refresh_fraction
        self.cells: Tensor | None = None  # (N, K) long, ascending per row
        self.scores: Tensor | None = None  # (N, K) S values of those cells
        self.bound: Tensor | None = None  # (N,) (K+1)-th best of S + h0
        self.h0: Tensor | None = None
        self.refreshes = 0
        self.full_rows = 0  # samples recomputed in full since the last refresh (statistics)

    def invalidate(self) -> None:
        self.cells = None

    def refresh(self, h: Tensor, n_samples: int, blocks: Iterable[tuple[int, int, Tensor]]) -> None:
        """Recompute every sample's candidates at potential ``h`` from the rows of S, given as
        (start, stop, S[start:stop]) blocks covering all samples."""
        n = h.shape[0]
        k = min(self.k, n - 1)
        dev = h.device
        self.cells = torch.empty(n_samples, k, dtype=torch.long, device=dev)
        self.scores = torch.empty(n_samples, k, device=dev)
        self.bound = torch.empty(n_samples, device=dev)
        for s, e, rows in blocks:
            v, i = (rows + h).topk(k + 1, dim=1)
            order = i[:, :k].argsort(1)
            cells = i[:, :k].gather(1, order)
            self.cells[s:e] = cells
            self.scores[s:e] = rows.gather(1, cells)  # S itself (not v - h: the sums must round as the full pass's)
            self.bound[s:e] = v[:, k]
        self.h0 = h.clone()
        self.refreshes += 1
        self.full_rows = 0

    def assign(self, h: Tensor, rows_at: Callable[[Tensor], Tensor]) -> tuple[Tensor, int]:
        """Cell of every sample under ``h``; ``rows_at(idx)`` gives the S rows of samples ``idx`` for
        those whose candidates cannot decide. Returns (cells, number of samples computed in full)."""
        assert self.cells is not None and self.scores is not None and self.bound is not None and self.h0 is not None
        drift = float((h - self.h0).max())
        vals = self.scores + h[self.cells]
        best, pos = vals.max(1)
        out = self.cells.gather(1, pos[:, None]).squeeze(1)
        margin = 1e-5 * (self.bound.abs() + abs(drift) + 1.0)  # float rounding of the sums: undecided rows go in full
        bad = torch.nonzero(best <= self.bound + drift + margin).flatten()
        if len(bad):
            out[bad] = (rows_at(bad) + h).argmax(1)
            self.full_rows += len(bad)
        return out, len(bad)

    def stale(self, n_samples: int, n_bad: int) -> bool:
        return n_bad > self.refresh_fraction * n_samples
