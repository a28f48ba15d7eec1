"""Where cells run: in this process one after another (``local``) or as Ray tasks (``ray``).

Both run a cell through :func:`execute_cell` (the existing jobs write its run directory; the
trainers' progress bars pass through, from Ray workers via Ray's log forwarding) and hand back
its metrics; the runner alone writes the results table, so local and Ray runs mix and resume alike.
A cell runs with as many torch threads as the CPUs it asks for, in every executor, so the same
grid gives the same numbers wherever it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..artifacts import dump_json
from ..errors import ConfigError
from ..registry import Registry
from .grid import Cell

CELL_RUNNERS: Registry[Callable[[Any, Path, bool], dict]] = Registry("cell kind")


def _run_train(job: Any, out: Path, progress: bool) -> dict:
    from ..jobs import run_train

    return run_train(job, out, progress=progress)


def _run_attack(job: Any, out: Path, progress: bool) -> dict:
    from ..jobs import run_attack

    return run_attack(job, out, progress=progress)


def _run_defense(job: Any, out: Path, progress: bool) -> dict:
    from ..defenses import run_defense

    if job.model == "clean":
        # a grid's attack run starts from the shared clean model file; the defense reads it from the run
        run = Path(job.run)
        have = run / "clean_model.safetensors"
        if not have.exists():
            src = Path(json.loads((run / "config.json").read_text())["clean_model"])
            if not src.exists() and "/cells/" in str(src) and "/cells/" in str(run):  # the output folder was moved
                src = Path(str(run)[: str(run).rindex("/cells/")] + str(src)[str(src).rindex("/cells/") :])
            tmp = have.with_name(f"{have.name}.{os.getpid()}.tmp")  # concurrent cells never share it
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, have)
    return run_defense(job, out, progress=progress)


CELL_RUNNERS.add("clean", _run_train)
CELL_RUNNERS.add("attack", _run_attack)
CELL_RUNNERS.add("defense", _run_defense)


def execute_cell(cell: Cell, progress: bool = True) -> dict:
    """Run one cell with its thread budget; returns its metrics as written to metrics.json."""
    before = torch.get_num_threads()
    torch.set_num_threads(cell.resources.threads)
    try:
        metrics = CELL_RUNNERS.get(cell.kind)(cell.job, cell.dir, progress)
    finally:
        torch.set_num_threads(before)
    return json.loads(dump_json(metrics))


@dataclass
class Outcome:
    cell: Cell
    metrics: dict | None = None
    error: str | None = None  # a formatted traceback when the cell failed
    seconds: float = 0.0


class Executor(ABC):
    """Runs submitted cells; :meth:`wait` returns at least one finished (or failed) cell."""

    slots: int = 1  # about how many cells run at once (for the ETA)

    def start(self) -> None: ...

    def check(self, cells: list[Cell]) -> None:
        """Refuse cells that could never start here (before any runs)."""

    def plan_slots(self, cells: list[Cell]) -> None: ...

    @abstractmethod
    def can_take(self, cell: Cell) -> bool:
        """Whether ``cell`` would start now (so that "running" means running, not queued)."""

    def stop(self) -> None: ...

    @abstractmethod
    def submit(self, cell: Cell, progress: bool) -> None: ...

    @abstractmethod
    def wait(self) -> list[Outcome]: ...

    @property
    @abstractmethod
    def busy(self) -> int: ...


class LocalExecutor(Executor):
    """One cell at a time in this process (the cell itself uses its CPUs through torch threads)."""

    def __init__(self, **_: Any) -> None:
        self._queue: list[tuple[Cell, bool]] = []

    def submit(self, cell: Cell, progress: bool) -> None:
        self._queue.append((cell, progress))

    @property
    def busy(self) -> int:
        return len(self._queue)

    def can_take(self, cell: Cell) -> bool:
        return not self._queue

    def wait(self) -> list[Outcome]:
        cell, progress = self._queue.pop(0)
        t0 = time.perf_counter()
        try:
            metrics = execute_cell(cell, progress)
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - one failing cell must not stop the others; the traceback is kept
            return [Outcome(cell, None, traceback.format_exc(), time.perf_counter() - t0)]
        return [Outcome(cell, metrics, None, time.perf_counter() - t0)]


def median_cpus(cells: list[Cell]) -> float:
    """The CPUs a typical cell asks for (the median): what sizes the slots and what ``auto`` compares."""
    return sorted(c.resources.cpus for c in cells)[len(cells) // 2] if cells else 0.0


def side_by_side(cells: list[Cell], cpus: float) -> bool:
    """Whether two of ``cells`` fit in ``cpus`` at once (what ``auto`` asks before it picks worker
    processes): the two smallest requests, not the median, so that a few large cells (a clean model
    on every core) do not make the grid's many 1-CPU cells run one after another."""
    sizes = sorted(c.resources.cpus for c in cells)
    return len(sizes) >= 2 and sizes[0] + sizes[1] <= cpus


def _timed_cell(cell: Cell, progress: bool) -> tuple[dict, float]:
    """Run a cell in a worker (a process or a Ray task); its metrics and wall seconds."""
    t0 = time.perf_counter()
    metrics = execute_cell(cell, progress)
    return metrics, time.perf_counter() - t0


def _die_with_parent() -> None:
    """A worker ends when the grid's process does (even on SIGKILL), so no orphan finishes a cell
    that the resumed grid runs again (Linux; elsewhere the worker ends after its current cell)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ProcessExecutor(Executor):
    """Cells side by side on this machine, each in a worker process with the CPUs it asks for.

    As many cells run at once as their CPUs fit in ``num_cpus`` (default: this machine's cores);
    small CNNs use a second thread poorly, so two 1-CPU cells side by side get more done than one
    2-thread cell (benchmarks/bench_speed.py). Workers are spawned (fresh interpreters) and
    reused; a cell's trainer progress bars are off (the grid's progress line says what runs).
    """

    def __init__(self, num_cpus: int | None = None, **_: Any) -> None:
        self._cpus = float(num_cpus or os.cpu_count() or 1)
        self._inflight: dict[Any, tuple[Cell, float]] = {}
        self._pool: Any = None

    def start(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=max(1, int(self._cpus)), mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent)

    def check(self, cells: list[Cell]) -> None:
        for c in cells:
            if c.resources.gpus > 0 and not torch.cuda.is_available():
                raise ConfigError("resources", f"cell {c.id} asks for {c.resources.gpus:g} GPUs but this machine has none")

    def plan_slots(self, cells: list[Cell]) -> None:
        if cells:
            self.slots = max(1, int(self._cpus // max(median_cpus(cells), 1e-9)))

    def can_take(self, cell: Cell) -> bool:
        used = sum(c.resources.cpus for c, _ in self._inflight.values())
        return not self._inflight or used + cell.resources.cpus <= self._cpus

    @property
    def busy(self) -> int:
        return len(self._inflight)

    def submit(self, cell: Cell, progress: bool) -> None:
        fut = self._pool.submit(_timed_cell, cell, False)
        self._inflight[fut] = (cell, time.perf_counter())

    def wait(self) -> list[Outcome]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_any

        done, _ = wait_any(list(self._inflight), return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            cell, t0 = self._inflight.pop(fut)
            try:
                metrics, seconds = fut.result()
                out.append(Outcome(cell, metrics, None, seconds))
            except KeyboardInterrupt:
                raise
            except Exception:  # noqa: BLE001 - one failing cell must not stop the others; the traceback is kept
                out.append(Outcome(cell, None, traceback.format_exc(), time.perf_counter() - t0))
        return out

    def stop(self) -> None:
        if self._pool is not None:
            for fut in self._inflight:
                fut.cancel()
            procs = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=not self._inflight, cancel_futures=True)
            for pr in procs:  # an interrupted grid leaves no cell running behind it
                if pr.is_alive():
                    pr.terminate()
            self._inflight.clear()
            self._pool = None


class RayExecutor(Executor):
    """Cells as Ray tasks, each asking for its CPUs and GPUs; joins ``address`` or starts a local instance.

    The output folder must be on a filesystem every worker sees (one machine, or a shared mount),
    and on a cluster backdoorlab must be importable on every node (a locally started instance
    passes this package's folder to its workers). Cells start only when their resources are free,
    so "running" in the progress line means running; Ray forwards the cells' progress bars.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, **_: Any) -> None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("executor", "ray is not installed; install the extra: pip install 'backdoorlab[ray]'")
        self.address, self.num_cpus = address, num_cpus
        self._started = False
        self._inflight: dict[Any, tuple[Cell, float]] = {}

    def start(self) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=True)
            else:
                # a local instance: workers import this very package, wherever it lives
                pkg_parent = str(Path(__file__).resolve().parents[2])
                path = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": path}})
            self._started = True
        res = ray.cluster_resources()
        self._cpus, self._gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
        self._task = ray.remote(_timed_cell)

    def can_take(self, cell: Cell) -> bool:
        if not self._inflight:
            return True
        cpus = sum(c.resources.cpus for c, _ in self._inflight.values()) + cell.resources.cpus
        gpus = sum(c.resources.gpus for c, _ in self._inflight.values()) + cell.resources.gpus
        return cpus <= self._cpus and gpus <= self._gpus

    def check(self, cells: list[Cell]) -> None:
        for c in cells:
            r = c.resources
            if r.cpus > self._cpus or r.gpus > self._gpus:
                raise ConfigError("resources", f"cell {c.id} asks for {r.cpus:g} CPUs and {r.gpus:g} GPUs but the Ray cluster has {self._cpus:g} and {self._gpus:g}")

    def plan_slots(self, cells: list[Cell]) -> None:
        if cells:
            self.slots = max(1, int(self._cpus // max(median_cpus(cells), 1e-9)))

    def stop(self) -> None:
        if self._inflight:
            for ref in list(self._inflight):
                self._ray.cancel(ref, force=True)
            self._inflight.clear()
        if self._started:
            self._ray.shutdown()
            self._started = False

    @property
    def busy(self) -> int:
        return len(self._inflight)

    def submit(self, cell: Cell, progress: bool) -> None:
        r = cell.resources
        ref = self._task.options(num_cpus=r.cpus, num_gpus=r.gpus, name=cell.id, max_retries=0).remote(cell, progress)
        self._inflight[ref] = (cell, time.perf_counter())

    def wait(self) -> list[Outcome]:
        done, _ = self._ray.wait(list(self._inflight), num_returns=1)
        out = []
        for ref in done:
            cell, t0 = self._inflight.pop(ref)
            try:
                metrics, seconds = self._ray.get(ref)
                out.append(Outcome(cell, metrics, None, seconds))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a RayTaskError carries the worker's traceback
                out.append(Outcome(cell, None, str(e), time.perf_counter() - t0))
        return out


EXECUTORS: Registry[type[Executor]] = Registry("executor")
EXECUTORS.add("local", LocalExecutor)
EXECUTORS.add("processes", ProcessExecutor)
EXECUTORS.add("ray", RayExecutor)
