"""Figures of the report, a registry of plot kinds:

- ``images``: embed the images the cells made (each attack's ``samples.png``; a defense's own
  figures, e.g. STRIP entropy histograms or Neural Cleanse triggers: MMLM Figures 6-10);
- ``sweep``: a metric against a swept attack parameter (one line per attack, one plot per
  dataset), drawn with :func:`backdoorlab.plots.line_plot` into ``figures/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError
from ..registry import Registry
from .context import Context, check_where
from .spec import CLEAN_MODEL, slug
from .table import CELL_KINDS, matches, mean_std, sort_keys


@dataclass
class PlotParams:
    title: str = ""
    note: str = ""
    where: dict = field(default_factory=dict)
    cells: str = "attack"

    def check(self, allowed: dict[str, list[str]]) -> None:
        if not isinstance(self.where, dict):
            raise ConfigError("where", f"expected a mapping field: value(s), got {self.where!r}")
        check_where(self.where, allowed)
        if self.cells not in CELL_KINDS:
            raise ConfigError("cells", f"must be one of {list(CELL_KINDS)}, got {self.cells!r}")


class PlotKind:
    Params: ClassVar[type[PlotParams]] = PlotParams

    def render(self, ctx: Context, p: Any) -> str:
        raise NotImplementedError


PLOTS: Registry[type[PlotKind]] = Registry("plot kind")


@dataclass
class ImagesParams(PlotParams):
    file: str = "samples.png"  # a name or glob inside each cell's folder
    seeds: list[int] = field(default_factory=list)  # empty = the first seed only


@PLOTS.register("images")
class Images(PlotKind):
    Params = ImagesParams

    def render(self, ctx: Context, p: ImagesParams) -> str:
        seeds = [int(s) for s in p.seeds] or ctx.exp.seeds[:1]
        parts, missing = [], 0
        for ident in ctx.identities:
            if ident["kind"] != p.cells or ident["seed"] not in seeds or not matches(ident, p.where) or (ident.get("repeat") or 0) > 0:
                continue  # a defense's figures of its first defense seed
            folder = ctx.out / "cells" / ident["cell"]
            found = sorted(folder.glob(p.file))
            if not found:
                missing += 1
                continue
            on_clean = ident.get("inspected") == CLEAN_MODEL and ident["attack"] != CLEAN_MODEL
            name = " · ".join(str(x) for x in (ident["attack"], ident["defense"], "on the clean model" if on_clean else "", ident["dataset"], ident["model"]) if x)
            for f in found:
                rel = f.relative_to(ctx.out).as_posix()
                parts.append(f"**{name}** (seed {ident['seed']}, `{f.name}`)\n\n![{name}]({rel})")
        if missing:
            parts.append(f"_{missing} cell(s) have no `{p.file}` yet._")
        return "\n\n".join(parts) or "_No images yet._"


@dataclass
class SweepParams(PlotParams):
    metric: str = "attack_success_rate"
    param: str = ""
    scale: float = 1.0

    def check(self, allowed: dict[str, list[str]]) -> None:
        super().check(allowed)
        if not self.param:
            raise ConfigError("param", "name the swept attack parameter to put on the x axis")


@PLOTS.register("sweep")
class Sweep(PlotKind):
    Params = SweepParams

    def render(self, ctx: Context, p: SweepParams) -> str:
        from ..plots import line_plot

        rows = [r for r in ctx.rows if r["kind"] == p.cells and r["metric"] == p.metric and p.param in (r.get("sweep") or {}) and matches(r, p.where)]
        if not rows:
            return "_No results yet._"
        parts = []
        for (dataset,) in sort_keys([(r["dataset"],) for r in rows], ["dataset"], ctx.order):
            sel = [r for r in rows if r["dataset"] == dataset]
            xs = sorted({float(r["sweep"][p.param]) for r in sel})
            series: dict[str, list[float]] = {}
            for group, model in sort_keys([(r["group"], r["model"]) for r in sel], ["group", "model"], ctx.order):
                name = group if len(ctx.exp.models) == 1 else f"{group} · {model}"
                ys = []
                for x in xs:
                    vals = [r["value"] for r in sel if r["group"] == group and r["model"] == model and float(r["sweep"][p.param]) == x]
                    ys.append(mean_std(vals)[0] * p.scale)
                series[name] = ys
            path = ctx.out / "figures" / f"{slug(p.title or p.metric + '-' + p.param)}-{slug(dataset)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            line_plot(xs, series, path, p.param, p.metric, f"{p.title or p.metric} on {dataset} (mean over seeds)")
            parts.append(f"![{p.metric} vs {p.param} on {dataset}]({path.relative_to(ctx.out).as_posix()})")
        return "\n\n".join(parts)
