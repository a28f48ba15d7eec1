"""The report: ``report.md`` with the experiment file's tables (mean ± std over seeds) and figures.

Table kinds live in a registry; each has typed parameters (checked with the rest of the file before
anything runs) and renders Markdown from the results table:

- ``pivot``: rows and columns chosen among the row fields (attack, dataset, model, defense,
  metric, ...), values = chosen metrics averaged over the seeds (MMLM Tables 2, 3, 4, 6, 7);
- ``defense``: one table per defense, rows = attacks, columns = the defense's metrics;
- ``control``: each defense's judged metric beside its clean-model control, with the verdict;
- ``histogram``: a mapping metric (e.g. ``change_histogram``, MMLM Table 5), columns = its bins.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from ..registry import Registry
from ..validate import build_params
from .context import Context, check_fields, check_where, names
from .figures import PLOTS
from .spec import CLEAN_MODEL, Experiment, OutputEntry
from .table import CELL_KINDS, TIMING_METRICS, format_mean_std, mean_std, select, sort_keys


@dataclass
class TableParams:
    title: str = ""
    note: str = ""
    where: dict = field(default_factory=dict)
    format: str = ".3f"
    scale: float = 1.0
    labels: dict = field(default_factory=dict)  # display names for metrics, labels, datasets

    def check(self, allowed: dict[str, list[str]]) -> None:
        if not isinstance(self.where, dict):
            raise ConfigError("where", f"expected a mapping field: value(s), got {self.where!r}")
        check_where(self.where, allowed)
        try:
            format(1.0, self.format)
        except ValueError:
            raise ConfigError("format", f"not a number format: {self.format!r} (e.g. .3f)") from None


def md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(x.replace("|", "\\|") for x in line) + " |" for line in lines]
    return "\n".join(out)


def _seed_note(groups: list[list]) -> str:
    ns = sorted({mean_std(g)[2] for g in groups if g})
    if not ns:
        return "_No results yet._"
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return f"_Mean ± sample std over seeds (n = {n} per entry); — = no result yet._"


def _visible(fields_: list[str], rows: list[dict]) -> list[str]:
    """Drop row fields that take one value only (when there is another to show)."""
    keep = [f for f in fields_ if len({str(r.get(f)) for r in rows}) > 1]
    return keep or fields_[-1:]


def pivot(ctx: Context, p: TableParams, rows: list[dict], row_fields: list[str], col_fields: list[str], metric_order: list[str]) -> str:
    order = dict(ctx.order)
    order["metric"] = {m: i for i, m in enumerate(metric_order)}
    # only seeds are averaged: a field that varies but is shown nowhere becomes a row field
    hidden = [f for f in ("dataset", "model", "attack", "defense", "inspected") if f not in row_fields + col_fields and len({str(r.get(f)) for r in rows}) > 1]
    row_fields = _visible(hidden + list(row_fields), rows) if rows else list(row_fields)
    cells: dict[tuple, dict[tuple, list]] = {}
    for r in rows:
        if isinstance(r["value"], dict):
            continue
        rk = tuple(r.get(f) for f in row_fields)
        ck = tuple(r.get(f) for f in col_fields)
        cells.setdefault(rk, {}).setdefault(ck, []).append(r["value"])
    rks = sort_keys(cells, row_fields, order)
    cks = sort_keys([ck for v in cells.values() for ck in v], col_fields, order)
    show = lambda v: str(p.labels.get(str(v), v))  # noqa: E731
    header = [f.capitalize() for f in row_fields] + [" · ".join(show(v) for v in ck) or "value" for ck in cks]
    lines = [[show(v) for v in rk] + [format_mean_std(cells[rk].get(ck, []), p.format, p.scale) for ck in cks] for rk in rks]
    if not lines:
        return "_No results yet._"
    return md_table(header, lines) + "\n\n" + _seed_note([g for v in cells.values() for g in v.values()])


class TableKind:
    Params: ClassVar[type[TableParams]] = TableParams

    def render(self, ctx: Context, p: Any) -> str:
        raise NotImplementedError


TABLES: Registry[type[TableKind]] = Registry("table kind")


@dataclass
class PivotParams(TableParams):
    metrics: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=lambda: ["attack"])
    cols: list[str] = field(default_factory=lambda: ["dataset", "metric"])
    cells: str = "attack"

    def check(self, allowed: dict[str, list[str]]) -> None:
        super().check(allowed)
        if not self.metrics:
            raise ConfigError("metrics", "name at least one metric")
        check_fields("rows", self.rows)
        check_fields("cols", self.cols)
        if set(self.rows) & set(self.cols):
            raise ConfigError("cols", f"{sorted(set(self.rows) & set(self.cols))} is in both rows and cols")
        if len(self.metrics) > 1 and "metric" not in self.rows + self.cols:
            raise ConfigError("cols", "several metrics need 'metric' in rows or cols")
        if self.cells not in CELL_KINDS:
            raise ConfigError("cells", f"must be one of {list(CELL_KINDS)}, got {self.cells!r}")


@TABLES.register("pivot")
class Pivot(TableKind):
    Params = PivotParams

    def render(self, ctx: Context, p: PivotParams) -> str:
        return pivot(ctx, p, select(ctx.rows, p.cells, p.where, p.metrics), p.rows, p.cols, p.metrics)


DEFENSE_BOOKKEEPING = ("target", "heldout_size", "evaluation_size", "evaluation_poisoned")  # left out unless asked for


@dataclass
class DefenseParams(TableParams):
    defenses: list[str] = field(default_factory=list)  # defense labels; empty = every defense
    metrics: list[str] = field(default_factory=list)  # empty = every metric the defense reported
    rows: list[str] = field(default_factory=lambda: ["dataset", "attack"])

    def check(self, allowed: dict[str, list[str]]) -> None:
        super().check(allowed)
        check_fields("rows", self.rows)
        for d in self.defenses:
            if d not in allowed["defense"]:
                raise ConfigError("defenses", f"no defense labelled {d!r}; labels: {', '.join(allowed['defense']) or '(none)'}")


@TABLES.register("defense")
class DefenseTable(TableKind):
    Params = DefenseParams

    def render(self, ctx: Context, p: DefenseParams) -> str:
        parts = []
        for label in p.defenses or [d.label for d in ctx.exp.defenses]:
            rows = select(ctx.rows, "defense", {**p.where, "defense": label}, p.metrics)
            metrics = p.metrics or list(dict.fromkeys(r["metric"] for r in rows if r["metric"] not in TIMING_METRICS + DEFENSE_BOOKKEEPING))
            rows = [r for r in rows if r["metric"] in metrics]
            cols = ["metric"] + (["inspected"] if len({r.get("inspected") for r in rows}) > 1 else [])  # the control beside
            parts.append(f"**{p.labels.get(label, label)}**\n\n" + pivot(ctx, p, rows, p.rows, cols, metrics))
        return "\n\n".join(parts) or "_No defenses in this experiment._"


# a detection claim needs the backdoored model's value above the control's, and above chance where a
# metric has one, by at least this much
DEFAULT_MARGINS = {"auroc": 0.1, "ari": 0.1, "silhouette": 0.1, "anomaly_index": 1.0, "target_anomaly_index": 1.0}
CHANCE = {"auroc": 0.5, "ari": 0.0}
MIN_PAIRS = 3


@dataclass
class ControlParams(TableParams):
    defenses: list[str] = field(default_factory=list)  # defense labels with a control; empty = all of them
    metric: dict = field(default_factory=dict)  # defense label -> the metric judged (default: its first headline metric)
    margins: dict = field(default_factory=dict)  # metric -> margin, over DEFAULT_MARGINS (default 0.1)

    def check(self, allowed: dict[str, list[str]]) -> None:
        super().check(allowed)
        for d in [*self.defenses, *self.metric]:
            if d not in allowed["defense"]:
                raise ConfigError("defenses", f"no defense labelled {d!r}; labels: {', '.join(allowed['defense']) or '(none)'}")
        for m, v in self.margins.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"margins.{m}", f"expected a non-negative number, got {v!r}")


@TABLES.register("control")
class ControlTable(TableKind):
    """Each defense's verdict beside its clean-model control: the judged metric on the backdoored
    model and on the clean model (same inputs, same defense seed), their paired difference, and
    whether a detection claim holds: at least 3 pairs (grid seeds x defense seeds), every one above
    its control, and above chance for a metric that has one, by the margin. Higher values must mean
    "more suspicious" for the judged metric."""

    Params = ControlParams

    def render(self, ctx: Context, p: ControlParams) -> str:
        from ..defenses import DEFENSES

        entries = [d for d in ctx.exp.defenses if d.clean_model and (not p.defenses or d.label in p.defenses)]
        lines = []
        for d in entries:
            metric = p.metric.get(d.label) or (DEFENSES.get(d.name).headline or ("auroc",))[0]
            margin = float(p.margins.get(metric, DEFAULT_MARGINS.get(metric, 0.1)))
            rows = select(ctx.rows, "defense", {**p.where, "defense": d.label}, [metric])
            control = {_pair_key(r, r["attack"] == CLEAN_MODEL): r["value"] for r in rows if r.get("inspected") == CLEAN_MODEL}
            chance = CHANCE.get(metric)
            by_attack: dict[tuple, list[tuple[float, float]]] = {}
            unpaired: dict[tuple, int] = {}
            for r in rows:
                if r.get("inspected") == CLEAN_MODEL or isinstance(r["value"], dict):
                    continue
                key = (r["dataset"], r["model"], r["attack"])
                by_attack.setdefault(key, [])
                c = control.get(_pair_key(r, False), control.get(_pair_key(r, True)))
                if c is None:  # e.g. an ARI with no poisoned input among those the clean model calls the target
                    unpaired[key] = unpaired.get(key, 0) + 1
                else:
                    by_attack[key].append((float(r["value"]), float(c)))
            for key in sort_keys(by_attack, ["dataset", "model", "attack"], ctx.order):
                pairs = by_attack[key]
                diffs = [b - c for b, c in pairs]
                lost = f"; {unpaired[key]} without a control value" if unpaired.get(key) else ""
                if len(pairs) < MIN_PAIRS:
                    verdict = f"too few pairs ({len(pairs)} < {MIN_PAIRS}{lost})"
                elif min(diffs) < margin:
                    verdict = f"not shown (smallest margin over the control {min(diffs):.3g} < {margin:g})"
                elif chance is not None and min(b for b, _ in pairs) < chance + margin:
                    verdict = f"not shown (at or below chance: smallest value {min(b for b, _ in pairs):.3g} < {chance:g} + {margin:g})"
                else:
                    verdict = "detected"
                f = lambda v: format_mean_std(v, p.format, p.scale)  # noqa: E731
                if not pairs:
                    lines.append([*(str(p.labels.get(str(k), k)) for k in key), d.label, metric, "", "", "", "0", verdict])
                    continue
                lines.append([*(str(p.labels.get(str(k), k)) for k in key), d.label, metric, f([b for b, _ in pairs]), f([c for _, c in pairs]),
                              f(diffs), str(len(pairs)), verdict])
        if not lines:
            return "_No defense with a clean-model control (clean_model: true) has results yet._"
        header = ["Dataset", "Model", "Attack", "Defense", "Metric", "backdoored", "clean model (control)", "difference", "pairs", "verdict"]
        return md_table(header, lines) + f"\n\n_Mean ± sample std over grid seeds × defense seeds (pairs); a claim needs ≥ {MIN_PAIRS} pairs, each above its control (and above chance: AUROC 0.5, ARI 0) by the margin._"


def _pair_key(row: dict, once: bool) -> tuple:
    """What pairs a defense cell with its control: the same dataset, model, seed and defense seed, and
    the same attack cell unless the control was run once (a defense that reads no inputs)."""
    return (row["dataset"], row["model"], None if once else row["attack"], row["seed"], row.get("repeat"))


@dataclass
class HistogramParams(TableParams):
    metric: str = "change_histogram"
    rows: list[str] = field(default_factory=lambda: ["dataset", "attack"])
    cells: str = "attack"
    format: str = ".0f"

    def check(self, allowed: dict[str, list[str]]) -> None:
        super().check(allowed)
        check_fields("rows", self.rows)
        if self.cells not in CELL_KINDS:
            raise ConfigError("cells", f"must be one of {list(CELL_KINDS)}, got {self.cells!r}")


@TABLES.register("histogram")
class Histogram(TableKind):
    Params = HistogramParams

    def render(self, ctx: Context, p: HistogramParams) -> str:
        rows = [r for r in select(ctx.rows, p.cells, p.where, [p.metric]) if isinstance(r["value"], dict)]
        bins = list(dict.fromkeys(b for r in rows for b in r["value"]))
        # one bin per column: spread each dict into rows with the bin as the metric, then pivot
        flat = [{**r, "metric": b, "value": r["value"][b]} for r in rows for b in r["value"]]
        return pivot(ctx, p, flat, p.rows, ["metric"], bins)


def check_outputs(exp: Experiment) -> list[tuple[OutputEntry, Any, Any]]:
    """Check every table and plot of the file; returns (entry, kind, params) triples to render."""
    allowed = names(exp)
    out = []
    for registry, entries in ((TABLES, exp.tables), (PLOTS, exp.plots)):
        for e in entries:
            try:
                kind = registry.get(e.kind)
            except ConfigError as err:
                raise ConfigError(f"{e.where}.kind", str(err).split(": ", 1)[-1]) from None
            try:
                params = build_params(kind.Params, e.options)
                params.check(allowed)
            except ConfigError as err:
                raise ConfigError(f"{e.where}.{err.field}", str(err).split(": ", 1)[-1]) from None
            out.append((e, kind(), params))
    return out


def timing_section(rows: list[dict]) -> list[str]:
    """Where the time went: each cell's wall time (its ``seconds`` metric: the last invocation of
    the cell), summed by cell kind and attack or defense entry, largest first."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["metric"] == "seconds" and isinstance(r["value"], (int, float)):
            what = r.get("group") if r["kind"] == "attack" else (f"{r.get('defense')} ({r.get('inspected')})" if r["kind"] == "defense" else "clean model")
            groups.setdefault((r["kind"], str(what)), []).append(float(r["value"]))
    if not groups:
        return []
    total = sum(sum(v) for v in groups.values())
    lines = [[k, w, str(len(v)), f"{sum(v) / 60:.1f}", f"{sum(v) / len(v):.1f}", f"{100 * sum(v) / total:.0f}%"]
             for (k, w), v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))]
    return ["## Where the time went", "", md_table(["kind", "entry", "cells", "minutes", "seconds per cell", "share"], lines), "",
            f"_Sum of the cells' wall times: {total / 60:.1f} min (each cell's last invocation; a grid's wall time adds the gaps between cells)._", ""]


def write_report(exp: Experiment, out: Path, rows: list[dict], identities: list[dict], status: dict) -> Path:
    """Write ``out/report.md`` atomically from the results table; returns its path."""
    ctx = Context(exp, out, rows, identities)
    outputs = check_outputs(exp)
    done, total = status.get("done", 0), len(identities)
    lines = [f"# {exp.name}", ""]
    if exp.description:
        lines += [exp.description.strip(), ""]
    lines += [f"Experiment file: `{exp.source}` · seeds {exp.seeds} · {done}/{total} cells finished"
              + (f", {len(status.get('failed', {}))} failed" if status.get("failed") else "") + f" · written {time.strftime('%Y-%m-%d %H:%M:%S')}",
              "", "All numbers: `results.jsonl` (one row per cell and metric); each cell's run directory is under `cells/`.", ""]
    tables = [(e, k, p) for e, k, p in outputs if e.where.startswith("tables")]
    plots = [(e, k, p) for e, k, p in outputs if e.where.startswith("plots")]
    for e, kind, p in tables:
        lines += [f"## {p.title or e.kind}", "", kind.render(ctx, p), ""]
        if p.note:
            lines += [p.note.strip(), ""]
    if plots:
        lines += ["## Figures", ""]
        for e, kind, p in plots:
            lines += [f"### {p.title or e.kind}", "", kind.render(ctx, p), ""]
    lines += timing_section(rows)
    if status.get("failed"):
        lines += ["## Failed cells", ""]
        for cid, err in status["failed"].items():
            last = [x for x in str(err).strip().splitlines() if x.strip()][-1:] or ["?"]
            lines.append(f"- `{cid}`: {last[0][:300]} (see `cells/{cid}/error.txt`)")
        lines.append("")
    path = out / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
