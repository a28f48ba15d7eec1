"""The results table: JSON lines, one row per cell and metric, keyed by (cell id, metric).

A finished cell's rows are appended in one write (``O_APPEND``, then fsync) right after its
``metrics.json``; reading keeps the last row per key and drops a torn last line, and
:meth:`ResultsTable.sync` rebuilds the file atomically from the run directories when it differs
from them, so a run killed at any moment and started again loses nothing and duplicates nothing.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable

ROW_FIELDS = ("cell", "kind", "dataset", "model", "attack", "group", "sweep", "defense", "inspected", "seed", "repeat")
TIMING_METRICS = ("seconds", "train_seconds", "images_per_second")  # vary between runs of the same cell


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))


def table_value(v: Any) -> Any:
    """What a metric contributes to the table: numbers, booleans, and mappings of numbers; else None."""
    if isinstance(v, bool) or _number(v):
        return v
    if isinstance(v, dict) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()):
        return dict(v)
    return None


def cell_rows(identity: dict, metrics: dict) -> list[dict]:
    rows = []
    for name, v in metrics.items():
        value = table_value(v)
        if value is not None:
            rows.append({**identity, "metric": name, "value": value})
    return rows


def row_key(row: dict) -> tuple[str, str]:
    return row["cell"], row["metric"]


def _line(row: dict) -> str:
    return json.dumps(row, sort_keys=False, separators=(",", ":")) + "\n"


class ResultsTable:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Rows in file order, one per (cell, metric) (the last one wins); torn or foreign lines are dropped."""
        if not self.path.exists():
            return []
        rows: dict[tuple[str, str], dict] = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "cell" in row and "metric" in row:
                rows.pop(row_key(row), None)
                rows[row_key(row)] = row
        return list(rows.values())

    def append(self, rows: Iterable[dict]) -> None:
        """Append one cell's rows with a single write, so they land together or not at all."""
        data = "".join(_line(r) for r in rows).encode()
        if not data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # a torn last line (killed mid-write) must not swallow the first new row
            if os.fstat(fd).st_size and not self._ends_with_newline():
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def rewrite(self, rows: Iterable[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(_line(r) for r in rows))
        os.replace(tmp, self.path)

    def sync(self, finished: dict[str, list[dict]]) -> bool:
        """Make the file hold exactly ``finished`` (cell id -> rows); rewrite it only if it differs.

        ``finished`` comes from the run directories, which are the truth: a cell killed after its
        metrics.json but before its append gets its rows, a torn line or a duplicate is dropped, and
        rows of cells that are no longer in the grid are dropped too.
        """
        want = [r for rows in finished.values() for r in rows]
        have = self.path.read_text() if self.path.exists() else ""
        text = "".join(_line(r) for r in want)
        if have == text:
            return False
        self.rewrite(want)
        return True


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def format_mean_std(values: list[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "—"
    text = format(m * scale, fmt)
    return text if s is None else f"{text} ± {format(s * scale, fmt)}"


# --- selecting and ordering rows for tables and plots -------------------------------------------

# inspected: "backdoored" or "clean model" (a defense's control); repeat: the defense seed's index
FIELDS = ("dataset", "model", "attack", "group", "defense", "inspected", "seed", "repeat", "metric", "kind")
CELL_KINDS = ("clean", "attack", "defense")


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def matches(row: dict, where: dict) -> bool:
    """``where`` maps a field to a value or a list of values; ``attack`` also matches the entry label."""
    for k, allowed in where.items():
        allowed = [str(a) for a in _as_list(allowed)]
        if k == "attack":
            if str(row.get("attack")) not in allowed and str(row.get("group")) not in allowed:
                return False
        elif str(row.get(k)) not in allowed:
            return False
    return True


def select(rows: list[dict], cells: str, where: dict, metrics: list[str] | None = None) -> list[dict]:
    return [r for r in rows if r["kind"] == cells and matches(r, where) and (not metrics or r["metric"] in metrics)]


def field_order(identities: list[dict]) -> dict[str, dict[Any, int]]:
    """For each field, the order in which its values first appear in the grid (the experiment file's order)."""
    order: dict[str, dict[Any, int]] = {f: {} for f in FIELDS}
    for ident in identities:
        for f in FIELDS:
            order[f].setdefault(ident.get(f), len(order[f]))
    return order


def sort_keys(keys: Iterable[tuple], fields: list[str], order: dict[str, dict[Any, int]]) -> list[tuple]:
    def rank(key: tuple) -> tuple:
        return tuple((order.get(f, {}).get(v, 10**6), str(v)) for f, v in zip(fields, key))

    return sorted(set(keys), key=rank)
