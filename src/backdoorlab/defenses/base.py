"""The defense contract: a :class:`Defense` decides from the :class:`DefenderView` alone and is
scored against the :class:`GroundTruth` afterwards; the job behind ``backdoorlab defend NAME --run
DIR --out DIR2`` runs both (:mod:`backdoorlab.defenses.view` builds the two halves).

``decide(view)`` returns the defense's decision: flags, scores, thresholds, a repaired model.
Nothing in the view says which sample is poisoned, which class is the target, or what the trigger
is, so no threshold, pruning level or flag can be chosen with them. ``score(view, decision,
truth)`` then measures the decision (AUROC, ARI, recall, ASR after a repair) and draws the figures
that need the truth. ``run_defense`` writes the decision's scalars to ``decision.json`` and its
tensors to ``decision.safetensors``, and every number to ``metrics.json`` (last).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from torch import Tensor, nn

from ..artifacts import RunDir
from ..errors import ConfigError
from ..metrics.ranking import auroc
from ..registry import Registry
from ..validate import build_params, check_apart, check_device, check_int, check_range, check_rate  # noqa: F401  (check_int: the defenses' import)
from .memo import locked, memo_dir, restore, store
from .view import DefenderView, GroundTruth, check_run, load_case

DEFENSES: Registry[type["Defense"]] = Registry("defense")
ModelChoice = Literal["backdoored", "clean"]


class DefenseKind(StrEnum):
    MODEL = "model-inspection"
    INPUT = "input-detection"
    DATA = "data-inspection"
    MITIGATION = "mitigation"


@dataclass
class DefenseParams:
    """Parameters of a defense; subclasses add fields and range checks in ``validate``."""

    def validate(self) -> None:
        pass


def check_open_rate(field: str, value: float) -> None:
    check_range(field, value, 0.0, 1.0, low_open=True, high_open=True)


# --------------------------------------------------------------------------- batched helpers


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients while a defense optimises inputs, masks or triggers."""
    was = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)


def heldout_threshold(heldout: Tensor, frr_target: float) -> float:
    """A decision threshold for scores oriented "higher = more likely poisoned", fixed on the
    defender's clean held-out scores only: their ``1 - frr_target`` quantile, so that
    ``frr_target`` of held-out clean inputs are rejected."""
    return float(torch.quantile(heldout.double().cpu(), 1.0 - frr_target))


def detection_metrics(clean: Tensor, poisoned: Tensor, threshold: float) -> dict[str, float]:
    """Scoring of an input detector (higher = "more likely poisoned"): AUROC over clean vs
    poisoned inputs, ``frr`` the fraction of clean inputs rejected at ``threshold``, ``far`` the
    fraction of poisoned inputs accepted."""
    return {
        "auroc": auroc(clean, poisoned) if len(clean) and len(poisoned) else float("nan"),
        "frr": float((clean.double() > threshold).float().mean()) if len(clean) else float("nan"),
        "far": float((poisoned.double() <= threshold).float().mean()) if len(poisoned) else float("nan"),
    }


def within_accuracy_drop(accuracies: list[float], reference: float, max_drop: float) -> list[int]:
    """Indices of the settings whose (defender's held-out) accuracy stays within ``max_drop`` of
    ``reference``: how a mitigation picks its strength without the ASR."""
    return [i for i, a in enumerate(accuracies) if a >= reference - max_drop]


def setting_sweep(view: DefenderView, truth: GroundTruth, axis: str, settings: list, models: list[nn.Module], chosen: Any,
                  defender_key: str, defender_curve: list[float], plot: str, xlabel: str, title: str) -> dict[str, Any]:
    """A mitigation scored at every setting it could have chosen (a kernel size, a number of frozen
    layers): clean accuracy and ASR on the evaluation split per setting, the values at the
    defender's ``chosen`` setting, the curve beside the defender's own accuracies (``defender_key``),
    and its plot (``title`` may use {acc} and {asr}, the chosen setting's values)."""
    from ..plots import line_plot

    acc = [truth.clean_accuracy(m) for m in models]
    asr = [truth.attack_success_rate(m) if len(truth.poisoned) else float("nan") for m in models]
    i = settings.index(chosen)
    metrics: dict[str, Any] = {"clean_accuracy": acc[i], "attack_success_rate": asr[i],
                               "curve": {axis: settings, "clean_accuracy": acc, "attack_success_rate": asr, defender_key: defender_curve}}
    path = view.plot_path(plot)
    if path is not None:
        label = f"clean acc. (defender {defender_key.split('_')[0]})"
        line_plot(settings, {"clean acc. (evaluation)": acc, "ASR (evaluation)": asr, label: defender_curve}, path, xlabel, "rate",
                  title=title.format(acc=acc[i], asr=asr[i]))
        metrics["plot"] = path.name
    return metrics


# --------------------------------------------------------------------------- the contract


class Defense(ABC):
    """One defense: a paper, a kind, typed ``Params``, ``decide(view)`` and ``score(...)``."""

    name: ClassVar[str]
    paper: ClassVar[str]
    kind: ClassVar[DefenseKind]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    headline: ClassVar[tuple[str, ...]] = ()  # the metrics a summary table shows

    def __init__(self, params: DefenseParams | None = None) -> None:
        self.p = params if params is not None else self.Params()

    def validate(self) -> None:
        self.p.validate()

    @abstractmethod
    def decide(self, view: DefenderView) -> dict[str, Any]:
        """The defense's decision from what a defender holds (scalars, lists, tensors, models)."""

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        """Measure ``decision`` against the ground truth (and draw the figures that need it)."""
        return {}


@dataclass
class DefenseJob:
    """``backdoorlab defend``: a defense, an attack run, which model, the defender's data, params.

    ``heldout_fraction`` / ``heldout_seed`` fix the defender's clean held-out part of the test
    split; ``max_inputs`` caps the clean and the poisoned test-time inputs presented to it (each;
    0 = all); ``seed`` drives the defense's own randomness and which inputs are presented;
    ``inspect_poison_rate`` (attacks that deliver no training set, e.g. WB/LIRA): inspect the
    training set with this share of its images passed through the attack's trigger and relabelled
    (a poisoned training set as a data-level defense expects it) instead of the presented test inputs.
    """

    defense: str
    run: str
    model: ModelChoice = "backdoored"
    heldout_fraction: float = 0.2
    heldout_seed: int = 0
    seed: int = 0
    device: str = "auto"
    params: dict = field(default_factory=dict)
    max_inputs: int = 1000
    cache_dir: str | None = None  # work shared between runs (MNTD's shadow set); not part of the config
    inspect_poison_rate: float | None = None

    def build(self, check: bool = True) -> Defense:
        """Validate everything without loading data: unknown names, bad values, a missing run fail here."""
        cls = DEFENSES.get(self.defense)
        params = build_params(cls.Params, dict(self.params), prefix="params.")
        defense = cls(params)
        try:
            defense.validate()
        except ConfigError as e:
            raise ConfigError("params." + e.field, str(e).split(": ", 1)[-1]) from None
        check_open_rate("heldout_fraction", self.heldout_fraction)
        check_int("heldout_seed", self.heldout_seed, 0)
        check_int("max_inputs", self.max_inputs, 0)
        if self.inspect_poison_rate is not None:
            check_rate("inspect_poison_rate", self.inspect_poison_rate)
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_device(self.device)
        if check:
            check_run(self.run, self.model)
        return defense

    def config(self) -> dict:
        """What the run directory records (the attack run need not exist yet: a grid compares configs first)."""
        cfg = asdict(self)
        cfg.pop("cache_dir")  # a cache only saves time: the same run with or without it
        if cfg["inspect_poison_rate"] is None:  # runs made before the option keep their config
            cfg.pop("inspect_poison_rate")
        cfg["run"] = str(Path(self.run).resolve())
        cfg["params"] = asdict(self.build(check=False).p)
        return cfg


def split_decision(decision: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The decision's JSON-able entries and its tensors; models, other objects and entries whose key
    starts with "_" (working data passed on to ``score``, e.g. features) are not written."""
    scalars, tensors = {}, {}
    for k, v in decision.items():
        if k.startswith("_"):
            continue
        if isinstance(v, Tensor):
            tensors[k] = v
        elif isinstance(v, (int, float, str, bool, list, tuple, dict)) or v is None:
            scalars[k] = v
    return scalars, tensors


def run_defense(job: DefenseJob, out: str | Path, progress: bool = True, force: bool = False, truth_hook: Any = None) -> dict:
    """Run one defense on one attack run: decide from the defender's view, then score against the
    ground truth. Writes config.json, decision.json / decision.safetensors, the plots and
    metrics.json (last). ``truth_hook`` (tests only) may replace the ground truth before scoring."""
    from ..recipes import resolve_device

    defense = job.build()
    rd = RunDir(out)
    check_apart("out", out, {"run": job.run})
    if rd.check(job.config(), force=force):
        return rd.read_metrics()
    t0 = time.perf_counter()
    device = resolve_device(job.device)
    # the attack run's data and model are loaded (and checked) before the output folder is touched
    view, truth = load_case(job.run, job.model, job.heldout_fraction, job.heldout_seed, job.max_inputs, device, rd.path, job.seed, progress,
                            inspect_poison_rate=job.inspect_poison_rate)
    view.cache_dir = Path(job.cache_dir) if job.cache_dir else None
    if truth_hook is not None:
        truth = truth_hook(truth)
    rd.prepare(job.config(), force=force)
    torch.manual_seed(job.seed)
    # a model-inspection defense decides from the model and the held-out data alone: one decision per model
    memo = memo_dir(defense, view, job.defense) if defense.kind == DefenseKind.MODEL else None
    with locked(memo):  # a second cell on the same model waits for this decision instead of repeating it
        decision = restore(memo, rd) if memo is not None else None
        reused = decision is not None
        if decision is None:
            decision = defense.decide(view)
        scalars, tensors = split_decision(decision)
        rd.write_json("decision.json", scalars)
        if tensors:
            rd.save_tensors("decision.safetensors", tensors)
        if memo is not None and not reused:
            store(memo, rd, decision, set(scalars) | set(tensors))
    attack_cfg = RunDir(job.run).read_config()
    metrics: dict[str, Any] = {
        "defense": job.defense,
        "kind": defense.kind.value,
        "paper": defense.paper,
        "attack": attack_cfg.get("attack"),
        "dataset": attack_cfg.get("dataset"),
        "model": job.model,
        "target": truth.target,
        "target_mode": truth.target_mode,
        "heldout_size": len(view.heldout),
        "evaluation_size": len(truth.evaluation),
        "evaluation_poisoned": len(truth.poisoned),
        "inputs_presented": len(view.inputs),
        "inspected": view.inspected_source,
        "clean_accuracy_before": truth.clean_accuracy(view.model),
        "attack_success_rate_before": truth.attack_success_rate(view.model),
    }
    metrics.update(scalars)
    metrics.update(defense.score(view, decision, truth))
    if memo is not None:
        metrics["decision_reused"] = reused  # the same model, data and settings were decided on by an earlier run
    metrics["seconds"] = time.perf_counter() - t0
    metrics["device"] = str(device)
    rd.write_metrics(metrics)
    return metrics
