"""Run a whole experiment: validate, expand, skip finished cells, run the rest, table and report.

Resumable by construction: a cell is finished when its run directory has ``metrics.json`` (written
last, atomically); on start the results table is rebuilt from the finished run directories when it
differs from them, and each cell's rows are appended in one write right after it finishes. Kill
it at any moment, start it again: nothing finished is redone and no row is duplicated.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import RunDir
from ..errors import ConfigError
from ..validate import check_out_folder
from .executors import EXECUTORS, Executor, side_by_side
from .grid import Cell, Grid, expand
from .report import check_outputs, write_report
from .spec import Experiment, load_experiment
from .table import ResultsTable, cell_rows

TABLE_FILE = "results.jsonl"


@dataclass
class GridResult:
    out: Path
    table: Path
    report: Path
    ran: list[str] = field(default_factory=list)  # cells run now
    skipped: list[str] = field(default_factory=list)  # finished before
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error
    blocked: list[str] = field(default_factory=list)  # not run because a cell they need failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def _clock(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class GridProgress:
    """Grid-level progress (cells done, running, left, time per cell, ETA) as log lines and progress.json."""

    def __init__(self, grid: Grid, todo: list[Cell], slots: int, enabled: bool = True) -> None:
        self.grid, self.slots, self.enabled = grid, max(1, slots), enabled
        self.total, self.done = len(grid), len(grid) - len(todo)
        self.left = {c.id: c for c in todo}
        self.running: dict[str, float] = {}
        self.failed: list[str] = []
        self.times: dict[str, list[float]] = {}

    def per_cell(self, kind: str) -> float | None:
        t = self.times.get(kind) or [x for v in self.times.values() for x in v]
        return sum(t) / len(t) if t else None

    def eta(self) -> float | None:
        work = 0.0
        now = time.perf_counter()
        for cid, c in self.left.items():
            est = self.per_cell(c.kind)
            if est is None:
                return None
            work += max(0.0, est - (now - self.running[cid])) if cid in self.running else est
        return work / self.slots

    def _emit(self, event: str) -> None:
        waiting = len(self.left) - len(self.running)
        mean = self.per_cell("")
        head = (f"[grid {self.done}/{self.total} done · {len(self.running)} running · {waiting} left"
                + (f" · {len(self.failed)} failed" if self.failed else "")
                + (f" · {mean:.1f} s/cell" if mean is not None else "") + f" · ETA {_clock(self.eta())}]")
        RunDir(self.grid.out).write_json("progress.json", {
            "total": self.total, "done": self.done, "running": sorted(self.running), "left": waiting, "failed": self.failed,
            "seconds_per_cell": {k: sum(v) / len(v) for k, v in self.times.items()}, "eta_seconds": self.eta(), "updated": time.time(),
        })
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(f"{head} {event}", file=sys.stderr)

    def start(self, cell: Cell) -> None:
        self.running[cell.id] = time.perf_counter()
        self._emit(f"start {cell.id}")

    def finish(self, cell: Cell, seconds: float) -> None:
        self.running.pop(cell.id, None)
        self.left.pop(cell.id, None)
        self.done += 1
        self.times.setdefault(cell.kind, []).append(seconds)
        self._emit(f"done  {cell.id} ({seconds:.1f} s)")

    def end(self, skipped: int, blocked: int) -> None:
        self.left.clear()
        self._emit(f"end: {skipped} cell(s) were already finished" + (f", {blocked} skipped after a failure" if blocked else ""))

    def fail(self, cell: Cell, blocked: list[Cell]) -> None:
        self.running.pop(cell.id, None)
        for c in [cell, *blocked]:
            self.left.pop(c.id, None)
        self.failed.append(cell.id)
        self._emit(f"FAILED {cell.id}" + (f" ({len(blocked)} cell(s) that need it are skipped)" if blocked else ""))


def prepare(experiment: str | Path | Experiment, out: str | Path) -> Grid:
    """Everything that can fail before running: the file, every job, tables, plots, existing run dirs,
    and the output folder (new, empty, or one a grid wrote)."""
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    o = check_out_folder("out", out)
    if o.is_dir() and any(o.iterdir()) and not any((o / n).exists() for n in ("experiment.yaml", TABLE_FILE, "cells", "run.lock", "report.md", "progress.json")):
        raise ConfigError("out", f"{o} holds files that are not a grid's output; choose a new or empty folder (nothing was changed)")
    grid = expand(exp, out)
    check_outputs(exp)
    grid.check_run_dirs()
    return grid


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None) -> Executor:
    try:
        cls = EXECUTORS.get(name)
    except ConfigError as e:
        raise ConfigError("executor", str(e).split(": ", 1)[-1]) from None
    if address and name != "ray":
        raise ConfigError("address", f"only the ray executor joins a cluster, not {name!r}")
    return cls(address=address, num_cpus=num_cpus)


def _lock(out: Path):
    """Hold ``out/run.lock`` for the run: a second run on the same folder at once is refused (the
    lock goes with the process, however it ends)."""
    import fcntl

    f = open(out / "run.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError("out", f"{out} is being run by another backdoorlab process; wait for it or use another --out") from None
    return f


def _sync_table(grid: Grid, table: ResultsTable) -> list[str]:
    finished = {c.id: cell_rows(c.identity(), RunDir(c.dir).read_metrics()) for c in grid if c.finished}
    table.sync(finished)
    return list(finished)


def dropped_cells(grid: Grid) -> list[str]:
    """Cells whose rows ``results.jsonl`` holds but this grid no longer has (a run of a smaller file)."""
    ids = {c.id for c in grid}
    return sorted({r["cell"] for r in ResultsTable(grid.out / TABLE_FILE).read()} - ids)


def check_shrink(grid: Grid, drop_missing: bool) -> list[str]:
    """Refuse to shrink a grid's results unless asked (then say what goes): a file that is a subset
    of the one that made ``out`` would silently drop rows from results.jsonl and the report."""
    gone = dropped_cells(grid)
    if gone and not drop_missing:
        raise ConfigError("out", f"{grid.out} holds results of {len(gone)} cell(s) this file does not have (e.g. {gone[0]}); running it here would drop "
                                 "them from results.jsonl and report.md: use another --out, or pass --drop-missing to drop them")
    return gone


def unproduced_metrics(grid: Grid) -> list[str]:
    """Table metrics no finished cell produced, named by their table (checked once every cell is done)."""
    have = {r["metric"] for r in ResultsTable(grid.out / TABLE_FILE).read()}
    out = []
    for i, t in enumerate(grid.exp.tables):
        one = t.options.get("metric")  # a metric name, or (a control table) a mapping defense -> metric
        wanted = t.options.get("metrics") or (list(one.values()) if isinstance(one, dict) else [one] if one else [])
        out += [f"tables[{i}]: {m}" for m in wanted if str(m) not in have]
    return out


def rebuild_report(grid: Grid, status: dict | None = None) -> Path:
    rows = ResultsTable(grid.out / TABLE_FILE).read()
    return write_report(grid.exp, grid.out, rows, [c.identity() for c in grid], status or {"done": sum(c.finished for c in grid)})


def run_experiment(experiment: str | Path | Experiment, out: str | Path, executor: str = "local", address: str | None = None,
                   progress: bool = True, num_cpus: int | None = None, drop_missing: bool = False) -> GridResult:
    """Run every unfinished cell in dependency order; returns what ran, what was skipped, what failed.

    A grid never shrinks the results it finds in ``out`` unless ``drop_missing``; once every cell
    has finished, a table metric that no cell produced is an error naming the table."""
    grid = prepare(experiment, out)
    if executor == "auto":  # worker processes when two of the grid's cells can run side by side
        executor = "processes" if address is None and side_by_side(list(grid), num_cpus or os.cpu_count() or 1) else "local"
    ex = make_executor(executor, address, num_cpus)
    gone = check_shrink(grid, drop_missing)
    grid.out.mkdir(parents=True, exist_ok=True)
    lock = _lock(grid.out)
    try:
        if gone:
            print(f"dropping the rows of {len(gone)} cell(s) this file no longer has: {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}", file=sys.stderr)
        exp = grid.exp
        if exp.source != "<dict>" and Path(exp.source).is_file():
            RunDir(grid.out).file("experiment.yaml").write_text(Path(exp.source).read_text())
        table = ResultsTable(grid.out / TABLE_FILE)
        res = GridResult(grid.out, table.path, grid.out / "report.md", skipped=_sync_table(grid, table))
        _run_cells(grid, ex, table, res, progress)
        _sync_table(grid, table)  # rows in the grid's order, whatever order the cells finished in
        rebuild_report(grid, {"done": len(res.skipped) + len(res.ran), "failed": res.failed})
    finally:
        lock.close()
    missing = unproduced_metrics(grid) if res.ok else []
    if missing:
        raise ConfigError("tables", f"no cell produced {', '.join(missing)} (a typo, or a metric of another attack or defense?); the cells are kept, fix the file and run again")
    return res


START_ORDER = {"clean": 0, "attack": 1, "defense": 2}


def _run_cells(grid: Grid, ex: Executor, table: ResultsTable, res: GridResult, progress: bool) -> None:
    todo = [c for c in grid if not c.finished]
    done = set(res.skipped)
    ex.start()
    try:
        ex.check(todo)
        ex.plan_slots(todo)
        prog = GridProgress(grid, todo, ex.slots, enabled=progress)
        # cells that others wait for start first (clean models, then attacks), the many short defense
        # cells fill the workers at the end: a shorter tail than file order, the same cells
        pending = sorted(todo, key=lambda c: START_ORDER.get(c.kind, len(START_ORDER)))
        while pending or ex.busy:
            for c in list(pending):
                if any(d in res.failed or d in res.blocked for d in c.deps):
                    pending.remove(c)
                    res.blocked.append(c.id)
                elif all(d in done for d in c.deps) and ex.can_take(c):
                    pending.remove(c)
                    ex.submit(c, progress)
                    prog.start(c)
            if not ex.busy:
                break  # nothing runs and nothing can start: only blocked cells are left
            for o in ex.wait():
                err = o.cell.dir / "error.txt"
                if o.error is None:
                    table.append(cell_rows(o.cell.identity(), o.metrics or {}))
                    err.unlink(missing_ok=True)
                    done.add(o.cell.id)
                    res.ran.append(o.cell.id)
                    prog.finish(o.cell, o.seconds)
                else:
                    o.cell.dir.mkdir(parents=True, exist_ok=True)
                    err.write_text(o.error)
                    res.failed[o.cell.id] = o.error
                    prog.fail(o.cell, [c for c in grid.dependents(o.cell.id) if c in pending])
        prog.end(len(res.skipped), len(res.blocked))
    finally:
        ex.stop()
