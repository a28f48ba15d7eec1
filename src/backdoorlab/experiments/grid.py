"""Expand an experiment into cells that share work, and check every cell before anything runs.

A **clean** cell trains one clean model per dataset, model and seed; every **attack** cell of that
dataset, model and seed starts from it (``AttackJob.clean_model``; a transfer attack trains its
own teacher instead, ``Attack.starts_from_clean_model``); a **defense** cell runs on its
attack cell's run directory. Each cell has its own run directory under ``OUT/cells/<id>``, whose
``metrics.json`` marks it finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..artifacts import RunDir, dump_json
from ..errors import ConfigError
from ..jobs import AttackJob, TrainJob
from ..validate import check_positive
from .spec import CLEAN_MODEL, DefenseEntry, Experiment, Resources, slug


def _reraise(where: str, e: ConfigError, context: str = "") -> ConfigError:
    msg = str(e).split(": ", 1)[-1] + (f" [{context}]" if context else "")
    return ConfigError(f"{where}.{e.field}" if e.field else where, msg)


def check_defense(job: Any) -> None:
    """Validate a defense job before its attack run exists: everything ``DefenseJob.build`` checks
    except the run folder itself (checked last there; the attack cell has not run yet)."""
    try:
        job.build()
    except ConfigError as e:
        if e.field not in ("run", "model") or Path(job.run, "metrics.json").exists():
            raise


@dataclass
class Cell:
    id: str
    kind: str  # "clean" | "attack" | "defense"
    dataset: str
    model: str  # the model's label
    seed: int
    job: Any  # TrainJob | AttackJob | defenses.DefenseJob
    dir: Path
    resources: Resources
    deps: tuple[str, ...] = ()
    attack: str | None = None  # full attack label (with swept values)
    group: str | None = None  # the attack entry's label
    sweep: dict = field(default_factory=dict)
    defense: str | None = None
    inspected: str | None = None  # defense cells: "backdoored" or "clean model" (the control)
    repeat: int | None = None  # defense cells: the index of the defense seed

    @property
    def finished(self) -> bool:
        return (self.dir / "metrics.json").exists()

    def identity(self) -> dict:
        """The fields every table row of this cell carries."""
        return {"cell": self.id, "kind": self.kind, "dataset": self.dataset, "model": self.model, "attack": self.attack,
                "group": self.group, "sweep": dict(self.sweep), "defense": self.defense, "inspected": self.inspected,
                "seed": self.seed, "repeat": self.repeat}

    def config_text(self) -> str:
        return dump_json(self.job.config())


class Grid:
    """The cells of an experiment in dependency order (every cell after the cells it needs)."""

    def __init__(self, exp: Experiment, out: Path, cells: list[Cell]) -> None:
        self.exp, self.out, self.cells = exp, out, cells
        self.by_id = {c.id: c for c in cells}

    def __iter__(self) -> Iterator[Cell]:
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    def dependents(self, cell_id: str) -> list[Cell]:
        """Cells that need ``cell_id``, directly or not."""
        out, todo = [], [cell_id]
        while todo:
            cur = todo.pop()
            for c in self.cells:
                if cur in c.deps and c not in out:
                    out.append(c)
                    todo.append(c.id)
        return out

    def check_run_dirs(self) -> None:
        """Fail before running when a cell's folder holds a run with another config (the file changed).

        Paths into the grid (a clean model, a defended run) are compared from ``cells/`` on, so an
        output folder that was moved or copied still resumes; an unfinished cell's config is then
        rewritten with the new paths so that its job resumes from its checkpoints. A finished cell
        whose inputs are to be redone (a needed cell's folder was deleted) no longer matches them:
        the run stops, naming the folder to delete.
        """
        for c in self.cells:
            path = c.dir / "config.json"
            if not path.exists():
                continue
            redo = [d for d in c.deps if not self.by_id[d].finished]
            if redo and c.finished:
                raise ConfigError(f"cell {c.id}", f"{c.dir} is finished but {redo[0]}, which it needs, is to be redone; delete {c.dir} as well to redo it")
            want = c.config_text()
            have = path.read_text()
            if have == want:
                continue
            if _portable(json.loads(have)) != _portable(json.loads(want)):
                raise ConfigError(f"cell {c.id}", f"{c.dir} holds a run with another config (was the experiment file changed?); use another --out or delete that folder")
            if not c.finished:
                RunDir(c.dir).write_json("config.json", json.loads(want))


def _portable(obj: Any) -> Any:
    """A config with paths inside a grid's ``cells/`` folder cut to start at ``cells/``."""
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    if isinstance(obj, str) and "/cells/" in obj:
        return obj[obj.rindex("/cells/") + 1 :]
    return obj


def _validate_names(exp: Experiment) -> None:
    from ..attacks import ATTACKS
    from ..data import DATASETS
    from ..models import MODELS

    for i, d in enumerate(exp.datasets):
        try:
            DATASETS.get(d.name)
        except ConfigError as e:
            raise ConfigError(f"datasets[{i}].name", str(e).split(": ", 1)[-1]) from None
    for i, m in enumerate(exp.models):
        try:
            MODELS.get(m.name)
            check_positive("width", m.width)
        except ConfigError as e:
            raise ConfigError(f"models[{i}].{'width' if e.field == 'width' else 'name'}", str(e).split(": ", 1)[-1]) from None
    for i, a in enumerate(exp.attacks):
        try:
            ATTACKS.get(a.attack)
        except ConfigError as e:
            raise ConfigError(f"attacks[{i}].attack", str(e).split(": ", 1)[-1]) from None


def expand(exp: Experiment, out: str | Path) -> Grid:
    """Build and validate every cell's job (names, parameters, training overrides) without loading data."""
    from ..recipes import train_config

    _validate_names(exp)
    out = Path(out).resolve()
    root = out / "cells"
    # every training override is checked where it is written, so the error names the right field
    for i, d in enumerate(exp.datasets):
        for m in exp.models:
            for where, overrides in (("", exp.train), (f"datasets[{i}].", {**exp.train, **d.train})):
                try:
                    train_config(d.name, m.name, overrides)
                except ConfigError as e:
                    raise ConfigError(where + e.field, str(e).split(": ", 1)[-1]) from None
    attack_jobs: dict[tuple, AttackJob] = {}
    for i, a in enumerate(exp.attacks):
        for label, params, _ in a.variants():
            for d in exp.datasets:
                if not a.runs_on(d.name):
                    continue
                for m in exp.models:
                    job = AttackJob(d.name, m.name, d.data_root, m.width, 0, exp.device, {**exp.train, **d.train, **a.train}, a.attack, a.params_on(d.name, params), None, a.audit)
                    try:
                        job.build()
                    except ConfigError as e:
                        raise _reraise(f"attacks[{i}]", e, f"attack {label!r} on {d.name} with {m.label}") from None
                    attack_jobs[(label, d.name, m.label)] = job
    from ..attacks import ATTACKS
    from ..defenses import DefenseJob

    for i, df in enumerate(exp.defenses):
        try:
            check_defense(DefenseJob(df.name, str(root / "not-yet-run"), heldout_fraction=df.heldout_fraction, heldout_seed=df.heldout_seed, params=dict(df.params),
                                     max_inputs=df.max_inputs, inspect_poison_rate=df.inspect_poison_rate))
        except ConfigError as e:
            field_ = "name" if e.field == "defense" else e.field
            raise ConfigError(f"defenses[{i}].{field_}", str(e).split(": ", 1)[-1]) from None

    cells: list[Cell] = []
    for seed in exp.seeds:
        for d in exp.datasets:
            for m in exp.models:
                base = f"{slug(d.name)}/{slug(m.label)}"
                clean_id = f"clean/{base}/s{seed}"
                clean = Cell(clean_id, "clean", d.name, m.label, seed, TrainJob(d.name, m.name, d.data_root, m.width, seed, exp.device, {**exp.train, **d.train}), root / clean_id, exp.resources)
                if any(ATTACKS.get(a.attack).starts_from_clean_model for a in exp.attacks if a.runs_on(d.name)):
                    cells.append(clean)
                on_clean: set[tuple[str, int]] = set()
                for a in (a for a in exp.attacks if a.runs_on(d.name)):
                    for label, params, point in a.variants():
                        proto = attack_jobs[(label, d.name, m.label)]
                        shared = ATTACKS.get(proto.attack).starts_from_clean_model  # else the attack trains its own teacher
                        job = AttackJob(**{**asdict(proto), "seed": seed, "clean_model": str(clean.dir / "model.safetensors") if shared else None, "cache_dir": str(out / "cache")})
                        aid = f"attack/{base}/{slug(label)}/s{seed}"
                        cell = Cell(aid, "attack", d.name, m.label, seed, job, root / aid, a.resources or exp.resources, (clean_id,) if shared else (), label, a.label, point)
                        cells.append(cell)
                        for df in exp.defenses:
                            if df.attacks is None or a.label in df.attacks:
                                cells += _defense_cells(df, cell, base, label, a.label, point, exp, root, on_clean)
    return Grid(exp, out, cells)


def _defense_cells(df: DefenseEntry, attack: Cell, base: str, label: str, group: str, point: dict, exp: Experiment, root: Path, on_clean: set[tuple[str, int]]) -> list[Cell]:
    """One defense entry's cells on one attack cell: every repeat (defense seed) on the backdoored
    model, and with ``clean_model`` its control on the clean model beside each: per attack cell, on
    the same inputs, or once per dataset, model and seed for a defense that reads no inputs."""
    from ..defenses import DEFENSES, DefenseJob
    from ..defenses.base import DefenseKind

    once = DEFENSES.get(df.name).kind == DefenseKind.MODEL
    cells = []
    for r in range(df.repeats):
        rep = "" if r == 0 else f"/r{r}"  # the first repeat keeps the id of a grid without repeats
        seed, held = attack.seed + 1000 * r, df.heldout_seed + r
        for model in ("backdoored", "clean") if df.clean_model else ("backdoored",):
            on, lab, grp, pt = label, label, group, point
            if model == "clean":
                if once and (df.label, r) in on_clean:
                    continue
                on_clean.add((df.label, r))
                if once:  # the clean model inspected once, through the first attack run it defends
                    on, lab, grp, pt = CLEAN_MODEL, CLEAN_MODEL, CLEAN_MODEL, {}
                else:
                    on = f"{label}/{CLEAN_MODEL}"
            cid = f"defense/{base}/{slug(on)}/{slug(df.label)}/s{attack.seed}{rep}"
            job = DefenseJob(df.name, str(attack.dir), model, df.heldout_fraction, held, seed, exp.device, dict(df.params), df.max_inputs, str(root.parent / "cache"),
                             inspect_poison_rate=df.inspect_poison_rate)
            cells.append(Cell(cid, "defense", attack.dataset, attack.model, attack.seed, job, root / cid, df.resources or exp.resources,
                              (attack.id,), lab, grp, pt, df.label, "backdoored" if model == "backdoored" else CLEAN_MODEL, r))
    return cells
