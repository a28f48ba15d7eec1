"""Figures that people would rather see than tables: image grids, curves, histograms (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .data.core import to_float  # noqa: E402


def _show(ax, img: Tensor) -> None:
    img = to_float(img).detach().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: str | Path, legend_ax=None) -> Path:
    """Every figure ends the same way: the legend (when its axes are given), a tight layout, a PNG."""
    if legend_ax is not None:
        legend_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def image_grid(rows: Sequence[Tensor], row_titles: Sequence[str], path: str | Path, n: int = 8, title: str = "") -> Path:
    """One row per tensor of images (N, C, H, W): e.g. clean, poisoned, amplified difference."""
    n = min(n, *(len(r) for r in rows))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (imgs, name) in enumerate(zip(rows, row_titles)):
        for c in range(n):
            _show(axes[r][c], imgs[c])
        axes[r][0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def clean_poison_grid(clean: Tensor, poisoned: Tensor, path: str | Path, n: int = 8, title: str = "") -> Path:
    c, p = to_float(clean[:n]).cpu(), to_float(poisoned[:n]).cpu()
    diff = (p - c).abs()
    diff = diff / diff.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
    return image_grid([c, p, diff], ["clean", "poisoned", "|diff| (scaled)"], path, n, title)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path, ax)


def histograms(groups: dict[str, Tensor], path: str | Path, xlabel: str, title: str = "", bins: int = 40) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    vals = torch.cat([g.flatten().float().cpu() for g in groups.values()])
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1e-6
    for name, g in groups.items():
        ax.hist(g.flatten().float().cpu().numpy(), bins=bins, range=(lo, hi), alpha=0.55, label=name, density=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, ax)


def scatter(points: dict[str, Tensor], path: str | Path, title: str = "", curve: tuple[Sequence[float], Sequence[float]] | None = None,
            xlabel: str = "", ylabel: str = "") -> Path:
    """Point clouds (N, 2) per group, optionally with one curve through them (e.g. a decision
    boundary) and labelled axes; without axis labels the ticks are hidden (an embedding's axes mean nothing)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.6) if xlabel else (4.2, 4.0))
    for name, pts in points.items():
        pts = pts.float().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5 if curve is not None else 0.6, label=name)
    if curve is not None:
        ax.plot(list(curve[0]), list(curve[1]), color="k", lw=1, label="boundary")
    if xlabel:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, ax)
