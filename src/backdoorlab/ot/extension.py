"""Piece-wise linear extension of a fitted semi-discrete OT map and mode-mixture detection (MMLM).

Everything here works in the solver's scaled space (see ``OTConfig.scaling``); generated codes are
mapped back to the caller's feature space before they are returned.

Choices (defaults), documented because the papers' values were lost or differ:

* neighbours: ``method="centroid"`` (default, as the MMLM paper describes): the k mass centres
  nearest to x in Euclidean distance, nearest first; the first one is the "first cell".
  ``method="potential"``: AE-OT's top-k of <x, y_i> + h_i; the first cell is then x's OT cell.
  Caveat: mass centres are means of ~N/n samples; in high dimension with few samples per cell
  they are noisy and the nearest centre rarely is x's own cell (d=256, n=2000, 20k samples:
  3.6% agreement), so neighbours become almost random. Use many samples per cell there, or
  ``method="potential"``, whose neighbours follow the OT cells directly.
* k = 2 (default): the first cell and one neighbour. The mixture test needs *all* k-1 angles to
  exceed the threshold, so larger k is a stricter test (every neighbour must lie across a gap).
* weights: ``"inverse_distance"`` (default): lambda_j proportional to 1 / ||x - c_j|| over the k
  cells, the interpolation of the AE-OT paper's piece-wise linear extension; near a cell boundary
  the code lands between the two targets, deep inside a cell it stays close to that cell's target.
  ``"pair"``: (1 - pair_weight) * y_first + pair_weight * y_nearest_neighbour, with
  pair_weight = 0.75 giving AE-OT's generation rule 0.25 * y_a + 0.75 * y_b. A sequence of k
  non-negative numbers gives fixed weights in neighbour order (normalised to sum 1).
* threshold theta = 0.7 rad (AE-OT's value); a tensor indexed by class gives a threshold per class
  of the first cell (MMLM uses different thresholds for target-class and other-class cells).
* angle space: ``"features"`` (default, the papers' space): the angle between (y_i, -1) and
  (y_j, -1) with y the caller's own points (MMLM: the classifier's penultimate features), i.e. the
  angle between the two facets of the Brenier potential over that space. ``"scaled"``: the same
  with the solver's standardised targets (centred: different angles; what session 1-3 used).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from backdoorlab.errors import ConfigError
from backdoorlab.ot.solver import SemiDiscreteOT

METHODS = ("centroid", "potential")
_BUDGET = 64 * 2**20  # bytes of the largest temporary built per chunk of rows


def _rows(per_row_floats: int) -> int:
    return max(1, _BUDGET // (4 * max(1, per_row_floats)))


@dataclass
class MassCenters:
    """Mass centres of the cells (source space). Empty cells (no Monte Carlo sample) fall back to
    the sample closest to entering them (largest <x, y_i> + h_i - u_h(x)) and are flagged."""

    centers: torch.Tensor  # (n, d)
    counts: torch.Tensor  # (n,) samples per cell
    empty: torch.Tensor  # (n,) bool


def mass_centers(ot: SemiDiscreteOT) -> MassCenters:
    """Mean of the current Monte Carlo samples in each cell W_i."""
    x, idx = ot.samples, ot.sample_assignments()
    counts = torch.bincount(idx, minlength=ot.n)
    sums = torch.zeros(ot.n, ot.dim, device=ot.device).index_add_(0, idx, x)
    centers = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    empty = counts == 0
    if bool(empty.any()):
        cols = empty.nonzero().squeeze(1)
        best = torch.full((cols.numel(),), -torch.inf, device=ot.device)
        arg = torch.zeros(cols.numel(), dtype=torch.long, device=ot.device)
        step = _rows(ot.n)
        for r in range(0, x.shape[0], step):
            s = (x[r: r + step] @ ot.targets.t()).add_(ot.h)
            margin = s[:, cols] - s.max(1).values.unsqueeze(1)
            val, pos = margin.max(0)
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, pos + r, arg)
        centers[cols] = x[arg]
    return MassCenters(centers, counts, empty)


SPACES = ("features", "scaled")


def cell_angles(ot: SemiDiscreteOT, i: torch.Tensor, j: torch.Tensor, space: str = "features") -> torch.Tensor:
    """Angle (radians) between (y_i, -1) and (y_j, -1) in R^{d+1}; y the original points
    (``space="features"``) or the solver's scaled targets (``"scaled"``); broadcasts."""
    if space not in SPACES:
        raise ConfigError("angle_space", f"must be one of {SPACES}, got {space!r}")
    y = ot.to_original(ot.targets) if space == "features" else ot.targets
    i, j = torch.broadcast_tensors(torch.as_tensor(i, device=ot.device), torch.as_tensor(j, device=ot.device))
    out = torch.empty(i.shape, device=ot.device)
    fi, fj, fo = i.reshape(-1), j.reshape(-1), out.view(-1)
    sq = y.pow(2).sum(1) + 1.0
    step = _rows(2 * ot.dim)
    for r in range(0, fi.numel(), step):
        a, b = fi[r: r + step], fj[r: r + step]
        dot = (y[a] * y[b]).sum(1) + 1.0
        fo[r: r + step] = torch.acos((dot / (sq[a] * sq[b]).sqrt()).clamp(-1.0, 1.0))
    return out


def neighbours(ot: SemiDiscreteOT, x: torch.Tensor, k: int, method: str = "centroid",
               centers: MassCenters | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k cells nearest to source points x (first cell first) and x's distance to their centres."""
    _check_k(ot, k)
    if method not in METHODS:
        raise ConfigError("method", f"must be one of {METHODS}, got {method!r}")
    x = ot._check_points(x)
    c = (centers or mass_centers(ot)).centers
    c_sq = c.pow(2).sum(1)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=ot.device)
    dist = torch.empty(x.shape[0], k, device=ot.device)
    step = _rows(ot.n + k * ot.dim)
    for r in range(0, x.shape[0], step):
        xb = x[r: r + step]
        xsq = xb.pow(2).sum(1, keepdim=True)
        if method == "centroid":
            d2 = (xb @ c.t()).mul_(-2).add_(xsq).add_(c_sq)
            val, ids = d2.topk(k, dim=1, largest=False)
            dist[r: r + step] = val.clamp_(min=0).sqrt_()
        else:
            ids = (xb @ ot.targets.t()).add_(ot.h).topk(k, dim=1).indices
            dist[r: r + step] = (xb.unsqueeze(1) - c[ids]).norm(dim=2)
        idx[r: r + step] = ids
    return idx, dist


def extension_weights(dist: torch.Tensor, weights: str | Sequence[float] = "inverse_distance",
                      pair_weight: float = 0.75) -> torch.Tensor:
    """Convex weights (m, k) over a point's k cells (see the module docstring)."""
    m, k = dist.shape
    if k < 2:
        raise ConfigError("k", f"the extension needs k >= 2 cells, got {k}")
    if isinstance(weights, str):
        if weights == "inverse_distance":
            inv = 1.0 / dist.clamp(min=1e-12)
            return inv / inv.sum(1, keepdim=True)
        if weights == "pair":
            if not 0.0 <= pair_weight <= 1.0:
                raise ConfigError("pair_weight", f"must be in [0, 1], got {pair_weight!r}")
            w = torch.zeros(m, k, device=dist.device)
            w[:, 0], w[:, 1] = 1.0 - pair_weight, pair_weight
            return w
        raise ConfigError("weights", f"must be 'inverse_distance', 'pair' or {k} numbers, got {weights!r}")
    w = torch.as_tensor(weights, dtype=torch.float32, device=dist.device)
    if w.shape != (k,) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ConfigError("weights", f"must be {k} non-negative numbers with a positive sum, got {weights!r}")
    return (w / w.sum()).expand(m, k).clone()


def extend(ot: SemiDiscreteOT, x: torch.Tensor, k: int = 2, method: str = "centroid",
           weights: str | Sequence[float] = "inverse_distance", pair_weight: float = 0.75,
           centers: MassCenters | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extended OT map of source points x: (codes in feature space (m, d), cells (m, k), weights (m, k))."""
    idx, dist = neighbours(ot, x, k, method, centers)
    w = extension_weights(dist, weights, pair_weight)
    return ot.to_original(_combine(ot, idx, w)), idx, w


def _combine(ot: SemiDiscreteOT, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(idx.shape[0], ot.dim, device=ot.device)
    step = _rows(idx.shape[1] * ot.dim)
    for r in range(0, idx.shape[0], step):
        out[r: r + step] = torch.einsum("mk,mkd->md", w[r: r + step], ot.targets[idx[r: r + step]])
    return out


@dataclass
class ModeMixture:
    """Codes generated by the extended OT map and their mode-mixture test (one row per code)."""

    codes: torch.Tensor  # (m, d) generated codes, feature space
    sources: torch.Tensor  # (m, d) the source samples they came from
    first: torch.Tensor  # (m,) first cell
    neighbours: torch.Tensor  # (m, k-1) the other cells, nearest first
    weights: torch.Tensor  # (m, k) convex weights over [first, neighbours...]
    max_angle: torch.Tensor  # (m,) largest angle between the first cell and a neighbour
    min_angle: torch.Tensor  # (m,) smallest such angle
    is_mixture: torch.Tensor  # (m,) bool: min_angle > threshold (all angles exceed it)
    cell_labels: torch.Tensor  # (m, k) class of every cell, first cell first
    first_label: torch.Tensor  # (m,)
    other_label: torch.Tensor  # (m,) class of the nearest neighbour not in first_label's class, -1 if none
    n_classes: torch.Tensor  # (m,) number of distinct classes among the k cells
    label_mask: torch.Tensor | None  # (m,) int64 bitmask of the classes among the cells (labels < 63), else None

    def contains(self, label: int) -> torch.Tensor:
        """Rows whose cells include ``label``."""
        return (self.cell_labels == label).any(1)

    def mixes(self, a: int, b: int | None = None) -> torch.Tensor:
        """Mixture codes whose cells include class a and class b (b=None: any class other than a)."""
        other = (self.cell_labels != a).any(1) if b is None else self.contains(b)
        return self.is_mixture & self.contains(a) & other

    def subset(self, rows: torch.Tensor) -> "ModeMixture":
        """The same record restricted to ``rows`` (a bool mask or an index tensor)."""
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModeMixture(**{k: (v[rows] if v is not None else None) for k, v in vals.items()})

    def __len__(self) -> int:
        return self.codes.shape[0]


def mode_mixture(ot: SemiDiscreteOT, labels: torch.Tensor, n_samples: int = 10_000, k: int = 2,
                 threshold: float | torch.Tensor = 0.7, *, method: str = "centroid",
                 weights: str | Sequence[float] = "inverse_distance", pair_weight: float = 0.75,
                 sources: torch.Tensor | None = None, seed: int | None = None, angle_space: str = "features") -> ModeMixture:
    """Draw ``n_samples`` source points (or use ``sources``), extend the OT map to them and flag
    the mode-mixture codes: all angles between the first cell and its k-1 neighbours exceed the
    threshold (a float, or a per-class tensor indexed by the first cell's label)."""
    labels = torch.as_tensor(labels, device=ot.device).long()
    if labels.shape != (ot.n,) or bool((labels < 0).any()):
        raise ConfigError("labels", f"must be {ot.n} non-negative class ids, got shape {tuple(labels.shape)}")
    if sources is None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ConfigError("n_samples", f"must be an integer >= 1, got {n_samples!r}")
        sources = ot.sample_source(n_samples, seed)
    sources = ot._check_points(sources)
    idx, dist = neighbours(ot, sources, k, method)
    w = extension_weights(dist, weights, pair_weight)
    codes = ot.to_original(_combine(ot, idx, w))
    first, nbrs = idx[:, 0], idx[:, 1:]
    ang = cell_angles(ot, first.unsqueeze(1), nbrs, angle_space)
    min_a, max_a = ang.min(1).values, ang.max(1).values
    cell_labels = labels[idx]
    first_label = cell_labels[:, 0]
    thr = torch.as_tensor(threshold, dtype=torch.float32, device=ot.device)
    if thr.ndim == 1:
        if thr.numel() <= int(labels.max()):
            raise ConfigError("threshold", f"per-class thresholds need {int(labels.max()) + 1} entries, got {thr.numel()}")
        thr = thr[first_label]
    elif thr.ndim != 0:
        raise ConfigError("threshold", "must be a number or a 1-D per-class tensor")
    differs = cell_labels[:, 1:] != first_label.unsqueeze(1)
    pos = differs.to(torch.int8).argmax(1, keepdim=True)
    other = torch.where(differs.any(1), cell_labels[:, 1:].gather(1, pos).squeeze(1), torch.full_like(first_label, -1))
    srt = cell_labels.sort(1).values
    n_classes = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
    mask = None
    if int(labels.max()) < 63:
        mask = torch.zeros_like(first_label)
        for j in range(k):  # k is small: a loop over neighbour slots, batched over all codes
            mask |= torch.ones_like(first_label) << cell_labels[:, j]
    return ModeMixture(codes, sources, first, nbrs, w, max_a, min_a, min_a > thr, cell_labels,
                       first_label, other, n_classes, mask)


def class_distances(codes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                    target_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of each code to the nearest ``target_class`` feature and to the nearest
    feature of any other class (inf where a side is empty). Use feature-space codes, e.g.
    ``ModeMixture.codes``; rank by these to build Z_far / Z_near."""
    codes = torch.as_tensor(codes, dtype=torch.float32)
    feats = torch.as_tensor(features, dtype=torch.float32).to(codes.device)
    labels = torch.as_tensor(labels).to(codes.device)
    if feats.ndim != 2 or codes.ndim != 2 or feats.shape[1] != codes.shape[1]:
        raise ConfigError("features", f"codes {tuple(codes.shape)} and features {tuple(feats.shape)} must be (m, d), (n, d)")
    if labels.shape != (feats.shape[0],):
        raise ConfigError("labels", f"must have shape ({feats.shape[0]},), got {tuple(labels.shape)}")
    out = []
    for group in (feats[labels == target_class], feats[labels != target_class]):
        d = torch.full((codes.shape[0],), torch.inf, device=codes.device)
        if group.shape[0]:
            step = _rows(group.shape[0])
            for r in range(0, codes.shape[0], step):
                d[r: r + step] = torch.cdist(codes[r: r + step], group).min(1).values
        out.append(d)
    return out[0], out[1]


def _check_k(ot: SemiDiscreteOT, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= ot.n:
        raise ConfigError("k", f"must be an integer in [2, {ot.n}], got {k!r}")
