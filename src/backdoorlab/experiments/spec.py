"""Experiment files: one YAML document names a paper's whole evaluation.

It lists datasets, models, attacks (each with a label, the attack name, its parameters and an
optional parameter sweep), defenses, seeds, training overrides, the resources a cell asks for,
and the tables and plots of the report. Parsing checks the shape of the file and names the field
at fault; :func:`backdoorlab.experiments.grid.expand` then checks every job (names and
parameters, through ``AttackJob.build`` and the defenses' ``DefenseJob.build``) and
:mod:`.report` checks the tables and plots, all before anything runs. For example::

    name: small
    seeds: [0, 1]
    train: {epochs: 6}                      # TrainConfig overrides: every model and victim
    resources: {cpus: 2, gpus: 0}           # per cell (cpus = its torch threads; default 1)
    datasets: [mnist5k, {name: fashion-mnist, train: {epochs: 12}}]
    models: [digit-cnn, {name: resnet18, width: 0.5}]
    attacks:
      - {label: BadNets, attack: badnets, params: {restrict: finetune}}
      - {label: BadNets (head), attack: badnets, params: {restrict: head}, train: {epochs: 3}}
      - {label: Blended, attack: blended, sweep: {alpha: [0.1, 0.2]}}  # one label per value
      - {label: WaNet, attack: wanet, datasets: [mnist5k],               # only on these datasets
         dataset_params: {mnist5k: {k: 4}}}                                # per-dataset overrides
    defenses:
      - {name: strip, attacks: [BadNets], params: {}, clean_model: true, repeats: 3}  # + control, 3 defense seeds
    tables:
      - {kind: pivot, metrics: [clean_accuracy, attack_success_rate], rows: [attack], cols: [dataset, metric]}
      - {kind: histogram, metric: change_histogram}
      - {kind: defense}
    plots:
      - {kind: images}                      # each attack's samples.png
      - {kind: sweep, metric: attack_success_rate, param: alpha, where: {attack: Blended}}
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..validate import build_params, check_device, check_range, number

TOP_KEYS = ("name", "description", "seeds", "device", "train", "resources", "datasets", "models", "attacks", "defenses", "tables", "plots")


@dataclass
class Resources:
    """What one cell asks for: CPUs (also its torch thread count, so runs match across executors) and GPUs."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        check_range("cpus", self.cpus, 0.0, 4096.0, low_open=True)
        check_range("gpus", self.gpus, 0.0, 1024.0)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


@dataclass
class DatasetEntry:
    name: str
    data_root: str | None = None
    train: dict = field(default_factory=dict)


@dataclass
class ModelEntry:
    name: str
    width: float = 1.0
    label: str = ""


@dataclass
class AttackEntry:
    label: str
    attack: str
    params: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)  # parameter -> list of values (cartesian product)
    train: dict = field(default_factory=dict)  # overrides for this attack's victim training only
    resources: Resources | None = None
    audit: bool = True
    datasets: list[str] | None = None  # run only on these datasets (None: every dataset of the file)
    dataset_params: dict = field(default_factory=dict)  # dataset -> parameter overrides on that dataset

    def runs_on(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets

    def params_on(self, dataset: str, params: dict) -> dict:
        """``params`` (one sweep point's) with this dataset's overrides applied."""
        return {**params, **self.dataset_params.get(dataset, {})}

    def variants(self) -> list[tuple[str, dict, dict]]:
        """(label, params, swept values) for every point of the sweep (one point without a sweep)."""
        if not self.sweep:
            return [(self.label, dict(self.params), {})]
        keys = list(self.sweep)
        out = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            point = dict(zip(keys, values))
            label = f"{self.label} (" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"
            out.append((label, {**self.params, **point}, point))
        return out


@dataclass
class DefenseEntry:
    label: str
    name: str
    params: dict = field(default_factory=dict)
    attacks: list[str] | None = None  # attack labels (entry labels) to defend; None = all
    resources: Resources | None = None
    heldout_fraction: float = 0.2  # the defender's clean share of the test split (DefenseJob)
    heldout_seed: int = 0
    max_inputs: int = 1000  # clean and poisoned test-time inputs presented to the defense, each (DefenseJob)
    inspect_poison_rate: float | None = None  # inspect a training set poisoned by the run's trigger (DefenseJob)
    # the control: the same defense on the clean model, beside every attack cell it defends (on the same
    # inputs); a model-inspection defense (which reads no inputs) runs it once per dataset, model and seed
    clean_model: bool = False
    repeats: int = 1  # defense seeds per attack cell: repeat r uses seed + 1000 r and heldout_seed + r


@dataclass
class OutputEntry:
    """A table or plot of the report: its kind and its kind's options (checked by :mod:`.report`)."""

    kind: str
    options: dict
    where: str  # "tables[2]" for error messages


@dataclass
class Experiment:
    name: str
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    train: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    datasets: list[DatasetEntry] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    attacks: list[AttackEntry] = field(default_factory=list)
    defenses: list[DefenseEntry] = field(default_factory=list)
    tables: list[OutputEntry] = field(default_factory=list)
    plots: list[OutputEntry] = field(default_factory=list)
    source: str = "<dict>"

    def attack_labels(self) -> list[str]:
        extra = [CLEAN_MODEL] if any(d.clean_model for d in self.defenses) else []
        return [label for a in self.attacks for label, _, _ in a.variants()] + extra

    def group_labels(self) -> list[str]:
        return [a.label for a in self.attacks]


CLEAN_MODEL = "clean model"  # the attack label of defense cells that inspect the clean model once (no inputs)
INSPECTED = ("backdoored", CLEAN_MODEL)  # which model a defense cell inspects


def slug(text: str) -> str:
    """A path-safe form of a label: lower case, runs of other characters become '-'."""
    s = re.sub(r"[^a-z0-9._=+-]+", "-", str(text).lower()).strip("-.")
    return s or "x"


def _keys(where: str, obj: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(where or "experiment", f"expected a mapping with keys {', '.join(allowed)}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}" if where else unknown[0], f"unknown key; known: {', '.join(allowed)}")
    for k in required:
        if obj.get(k) in (None, ""):
            raise ConfigError(f"{where}.{k}" if where else k, "is required")
    return obj


def _mapping(where: str, obj: Any) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(where, f"expected a mapping of key: value, got {obj!r}")
    return {str(k).replace("-", "_"): v for k, v in obj.items()}


def _list(where: str, obj: Any, required: bool = False) -> list:
    if obj is None:
        obj = []
    if not isinstance(obj, list):
        raise ConfigError(where, f"expected a list, got {type(obj).__name__}")
    if required and not obj:
        raise ConfigError(where, "must name at least one entry")
    return obj


def _resources(where: str, obj: Any) -> Resources | None:
    if obj is None:
        return None
    try:
        return build_params(Resources, _mapping(where, obj))
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.field}", str(e).split(": ", 1)[-1]) from None


def _unique(where: str, names: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for n in names:
        s = slug(n)
        if s in seen:
            same = "twice" if seen[s] == n else f"as {seen[s]!r} (same folder name {s!r})"
            raise ConfigError(where, f"{what} {n!r} appears {same}; labels must be unique")
        seen[s] = n


def _str(where: str, v: Any) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool) or str(v) == "":
        raise ConfigError(where, f"expected a name, got {v!r}")
    return str(v)


def _dataset(i: int, d: Any) -> DatasetEntry:
    w = f"datasets[{i}]"
    if not isinstance(d, dict):
        return DatasetEntry(_str(w, d))
    _keys(w, d, ("name", "data_root", "train"), ("name",))
    return DatasetEntry(_str(w + ".name", d["name"]), d.get("data_root"), _mapping(w + ".train", d.get("train")))


def _model(i: int, m: Any) -> ModelEntry:
    w = f"models[{i}]"
    if not isinstance(m, dict):
        name = _str(w, m)
        return ModelEntry(name, 1.0, name)
    _keys(w, m, ("name", "width", "label"), ("name",))
    name = _str(w + ".name", m["name"])
    width = float(number(w + ".width", m.get("width", 1.0)))
    return ModelEntry(name, width, str(m.get("label") or (name if width == 1.0 else f"{name}-w{width:g}")))


def _attack(i: int, a: Any, dataset_names: list[str]) -> AttackEntry:
    w = f"attacks[{i}]"
    _keys(w, a, ("label", "attack", "params", "sweep", "train", "resources", "audit", "datasets", "dataset_params"), ("attack",))
    only = None
    if a.get("datasets") is not None:
        only = [_str(w + ".datasets", x) for x in _list(w + ".datasets", a["datasets"], required=True)]
    per = a.get("dataset_params") or {}
    if not isinstance(per, dict):
        raise ConfigError(w + ".dataset_params", f"expected a mapping of dataset: {{param: value}}, got {per!r}")
    per = {str(k): _mapping(f"{w}.dataset_params.{k}", v) for k, v in per.items()}
    for where, names in ((".datasets", only or []), (".dataset_params", list(per))):
        for x in names:
            if x not in dataset_names:
                raise ConfigError(w + where, f"no dataset {x!r} in this file; datasets: {', '.join(dataset_names)}")
    sweep = _mapping(w + ".sweep", a.get("sweep"))
    for k, vs in sweep.items():
        if not isinstance(vs, list) or not vs:
            raise ConfigError(f"{w}.sweep.{k}", f"expected a non-empty list of values, got {vs!r}")
    audit = a.get("audit", True)
    if not isinstance(audit, bool):
        raise ConfigError(w + ".audit", f"expected true/false, got {audit!r}")
    name = _str(w + ".attack", a["attack"])
    return AttackEntry(str(a.get("label") or name), name, _mapping(w + ".params", a.get("params")), sweep, _mapping(w + ".train", a.get("train")), _resources(w + ".resources", a.get("resources")), audit, only, per)


def _defense(i: int, d: Any, groups: list[str]) -> DefenseEntry:
    w = f"defenses[{i}]"
    if not isinstance(d, dict):
        name = _str(w, d)
        return DefenseEntry(name, name)
    _keys(w, d, ("label", "name", "params", "attacks", "resources", "heldout_fraction", "heldout_seed", "max_inputs", "clean_model", "repeats", "inspect_poison_rate"), ("name",))
    attacks = d.get("attacks")
    if attacks is not None:
        attacks = [str(x) for x in _list(w + ".attacks", attacks, required=True)]
        for x in attacks:
            if x not in groups:
                raise ConfigError(w + ".attacks", f"no attack labelled {x!r}; labels: {', '.join(groups)}")
    name = _str(w + ".name", d["name"])
    held: dict[str, Any] = {}
    if "clean_model" in d:
        if not isinstance(d["clean_model"], bool):
            raise ConfigError(w + ".clean_model", f"expected true/false, got {d['clean_model']!r}")
        held["clean_model"] = d["clean_model"]
    for k, tp in (("heldout_fraction", float), ("heldout_seed", int), ("max_inputs", int), ("repeats", int), ("inspect_poison_rate", float)):
        if k in d:
            held[k] = tp(number(f"{w}.{k}", d[k], integer=tp is int))
    if not 1 <= held.get("repeats", 1) <= 100:
        raise ConfigError(w + ".repeats", f"expected 1 to 100 defense seeds per cell, got {held['repeats']!r}")
    return DefenseEntry(str(d.get("label") or name), name, _mapping(w + ".params", d.get("params")), attacks, _resources(w + ".resources", d.get("resources")), **held)


def _output(section: str, i: int, o: Any) -> OutputEntry:
    w = f"{section}[{i}]"
    if not isinstance(o, dict) or not o.get("kind"):
        raise ConfigError(w + ".kind", "each entry needs a kind")
    opts = {str(k).replace("-", "_"): v for k, v in o.items() if k != "kind"}
    return OutputEntry(str(o["kind"]), opts, w)


def parse_experiment(doc: Any, source: str = "<dict>") -> Experiment:
    """Read an experiment from a parsed YAML document; every shape error names its field."""
    _keys("", doc, TOP_KEYS, ("datasets", "models"))
    seeds = _list("seeds", doc.get("seeds", [0]), required=True)
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError("seeds", f"expected non-negative integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"repeated seed in {seeds}")
    check_device(str(doc.get("device", "auto")))  # one this machine has
    datasets = [_dataset(i, d) for i, d in enumerate(_list("datasets", doc["datasets"], required=True))]
    _unique("datasets", [d.name for d in datasets], "dataset")
    models = [_model(i, m) for i, m in enumerate(_list("models", doc["models"], required=True))]
    _unique("models", [m.label for m in models], "model")
    attacks = [_attack(i, a, [d.name for d in datasets]) for i, a in enumerate(_list("attacks", doc.get("attacks")))]
    _unique("attacks", [a.label for a in attacks], "attack label")
    groups = [a.label for a in attacks]
    defenses = [_defense(i, d, groups) for i, d in enumerate(_list("defenses", doc.get("defenses")))]
    _unique("defenses", [d.label for d in defenses], "defense label")
    exp = Experiment(
        name=str(doc.get("name") or Path(source).stem),
        description=str(doc.get("description") or ""),
        seeds=seeds,
        device=str(doc.get("device", "auto")),
        train=_mapping("train", doc.get("train")),
        resources=_resources("resources", doc.get("resources")) or Resources(),
        datasets=datasets,
        models=models,
        attacks=attacks,
        defenses=defenses,
        tables=[_output("tables", i, t) for i, t in enumerate(_list("tables", doc.get("tables")))],
        plots=[_output("plots", i, p) for i, p in enumerate(_list("plots", doc.get("plots")))],
        source=source,
    )
    for label in exp.attack_labels()[:-1] if any(d.clean_model for d in defenses) else []:
        if slug(label) == slug(CLEAN_MODEL):
            raise ConfigError("attacks", f"the label {label!r} is taken by the defenses' clean-model cells (clean_model: true); choose another")
    _unique("attacks", exp.attack_labels(), "attack label")
    return exp


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("experiment", f"{path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("experiment", f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_experiment(doc, str(path))
