"""The defense contract: what a defender has (:class:`DefenseContext`), the :class:`Defense` base
class, and the job behind ``backdoorlab defend NAME --run DIR --out DIR2``.

A defense runs on any attack run directory (see :mod:`backdoorlab.jobs`) and uses only what a
defender would have:

- the model under inspection: ``model.safetensors`` (the backdoored model) or, with
  ``model="clean"``, ``clean_model.safetensors`` (the clean model of the same seed, for
  false-positive checks);
- **clean held-out data**: a fixed stratified fraction of the run's test split,
  ``heldout_fraction`` (default 0.2, our choice) drawn by :func:`stratified_indices` with
  ``heldout_seed`` (default 0). Thresholds, reverse-engineered triggers, pruning levels and
  fine-tuning use this part only;
- for data-level defenses, the training set **as delivered** (poisoned samples unmarked), rebuilt
  deterministically from ``poison_indices`` and the trigger through the attack's own ``poison``.

Ground truth (which samples are poisoned, the target, the ASR) is used only to score a defense
afterwards, on the **evaluation** part: the test images not in the held-out part, and their
poisoned versions (the trigger applied, or the attack's saved ``poisoned_test`` whose
``poisoned_test_index`` lie in the evaluation part), counted as for the ASR (non-target source
classes for all-to-one).
"""

from __future__ import annotations

import contextlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..artifacts import RunDir, load_model
from ..attacks.triggers import Trigger
from ..data import load_dataset
from ..data.core import Dataset, ImageSet, to_float, to_uint8
from ..data.subset import stratified_indices
from ..errors import ConfigError
from ..metrics.ranking import auroc
from ..models import Classifier, build_model
from ..registry import Registry
from ..train.evaluate import accuracy, asr_mask, attack_success_rate, target_labels
from ..validate import build_params, check_choice

DEFENSES: Registry[type["Defense"]] = Registry("defense")
ModelChoice = Literal["backdoored", "clean"]
MODEL_FILES = {"backdoored": "model.safetensors", "clean": "clean_model.safetensors"}


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


def check_int(field: str, value: int, low: int = 1) -> None:
    if int(value) < low:
        raise ConfigError(field, f"must be >= {low}, got {value}")


def check_open_rate(field: str, value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(field, f"must lie in (0, 1), got {value}")


# --------------------------------------------------------------------------- batched helpers


@torch.no_grad()
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


def detection_metrics(clean: Tensor, poisoned: Tensor, heldout: Tensor, frr_target: float) -> dict[str, float]:
    """Scores for input detection, oriented so that higher means "more likely poisoned".

    The threshold is fixed on the defender's clean held-out scores only: the ``1 - frr_target``
    quantile, so that ``frr_target`` of held-out clean inputs are rejected. ``frr`` is the fraction
    of clean evaluation inputs rejected, ``far`` the fraction of poisoned inputs accepted.
    """
    thr = float(torch.quantile(heldout.double().cpu(), 1.0 - frr_target))
    return {
        "auroc": auroc(clean, poisoned) if len(clean) and len(poisoned) else float("nan"),
        "threshold": thr,
        "frr": float((clean.double() > thr).float().mean()) if len(clean) else float("nan"),
        "far": float((poisoned.double() <= thr).float().mean()) if len(poisoned) else float("nan"),
    }


def limit(n: int, k: int | None, seed: int) -> Tensor:
    """At most ``k`` of ``n`` indices, drawn without replacement with a fixed seed (all when k is None)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


# --------------------------------------------------------------------------- the defender's view


@dataclass
class DefenseContext:
    """Everything a defense may use, built from an attack run directory by :meth:`from_run`."""

    run: Path
    attack_config: dict
    data: Dataset
    model: Classifier
    model_choice: str
    device: torch.device
    heldout_idx: Tensor  # indices into the test split: the defender's clean data
    eval_idx: Tensor  # the disjoint rest: used only to score the defense
    poisoned_test: Tensor  # uint8 poisoned versions of test images ...
    poisoned_test_index: Tensor  # ... at these test indices
    trigger: Trigger | None = None
    poison_indices: Tensor | None = None  # training samples the attacker poisoned (ground truth)
    out: Path | None = None  # where plots go
    seed: int = 0
    progress: bool = False
    _delivered: tuple[ImageSet, Tensor] | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- construction
    @staticmethod
    def check_run(run: str | Path, model: str = "backdoored") -> Path:
        """Fail early (naming the field) unless ``run`` is a finished attack run holding the model."""
        check_choice("model", model, tuple(MODEL_FILES))
        path = Path(run)
        if not path.is_dir():
            raise ConfigError("run", f"{path} is not a directory")
        for name in ("config.json", "metrics.json"):
            if not (path / name).exists():
                raise ConfigError("run", f"{path} is not a finished attack run (no {name})")
        if not (path / MODEL_FILES[model]).exists():
            raise ConfigError("model", f"{path} has no {MODEL_FILES[model]} to inspect as the {model} model")
        cfg = json.loads((path / "config.json").read_text())
        if "attack" not in cfg or "params" not in cfg:
            raise ConfigError("run", f"{path} holds a {cfg.get('command', 'non-attack')} run, not an attack run")
        return path

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        model: ModelChoice = "backdoored",
        heldout_fraction: float = 0.2,
        heldout_seed: int = 0,
        device: torch.device | str = "cpu",
        out: Path | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> "DefenseContext":
        path = cls.check_run(run, model)
        check_open_rate("heldout_fraction", heldout_fraction)
        cfg = json.loads((path / "config.json").read_text())
        device = torch.device(device)
        data = load_dataset(cfg["dataset"], cfg.get("data_root"))
        net = load_model(path / MODEL_FILES[model], device=device)
        test = data.test
        n_hold = max(1, min(len(test) - 1, round(heldout_fraction * len(test))))
        hold = stratified_indices(test.y, n_hold, heldout_seed)
        rest = torch.ones(len(test), dtype=torch.bool)
        rest[hold] = False
        tensors, meta = _read_tensors(path / "tensors.safetensors")
        trig = {k[len("trigger."):]: v for k, v in tensors.items() if k.startswith("trigger.")}
        trigger = Trigger.from_tensors(meta["trigger_kind"], trig).to(device) if trig and meta.get("trigger_kind") else None
        if "poisoned_test" in tensors:
            px = tensors["poisoned_test"]
            pidx = tensors.get("poisoned_test_index", torch.arange(len(px))).long()
            px = px if px.dtype == torch.uint8 else to_uint8(px)
        elif trigger is not None:
            px = torch.cat([to_uint8(trigger(to_float(test.x[s : s + 1024]).to(device)).cpu()) for s in range(0, len(test), 1024)])
            pidx = torch.arange(len(test))
        else:
            raise ConfigError("run", f"{path} holds neither a trigger nor poisoned_test images in tensors.safetensors")
        return cls(
            path, cfg, data, net, model, device, hold, torch.nonzero(rest).flatten(), px, pidx, trigger,
            tensors.get("poison_indices"), out, seed, progress,
        )

    # ----------------------------------------------------------------- attack facts (for scoring)
    @property
    def num_classes(self) -> int:
        return self.data.spec.num_classes

    @property
    def target(self) -> int:
        return int(self.attack_config["params"].get("target", self.data.spec.default_target))

    @property
    def target_mode(self) -> str:
        return str(self.attack_config["params"].get("target_mode", "all-to-one"))

    # ----------------------------------------------------------------- data
    @property
    def heldout(self) -> ImageSet:
        """The defender's clean held-out images (a fixed stratified part of the test split)."""
        return self.data.test.subset(self.heldout_idx)

    @property
    def evaluation(self) -> ImageSet:
        """The clean test images not in the held-out part (scoring only)."""
        return self.data.test.subset(self.eval_idx)

    def eval_poisoned(self) -> tuple[Tensor, Tensor]:
        """Poisoned versions of evaluation images that count for the ASR, and their true labels."""
        y = self.data.test.y[self.poisoned_test_index]
        keep = torch.isin(self.poisoned_test_index, self.eval_idx) & asr_mask(y, self.target_mode, self.target)  # type: ignore[arg-type]
        return self.poisoned_test[keep], y[keep]

    def delivered_train(self) -> tuple[ImageSet, Tensor] | None:
        """The training set as delivered and the (ground-truth) poison flag, or None without poison_indices.

        Rebuilt with the attack's own ``poison`` (so clean-label attacks keep their labels); an
        attack that is not a registered poisoning attack gets trigger + η(y) on the indices.
        """
        if self.poison_indices is None:
            return None
        if self._delivered is None:
            from ..attacks import ATTACKS
            from ..attacks.base import AttackContext, PoisoningAttack
            from ..train.trainer import TrainConfig

            idx = self.poison_indices.long()
            train = self.data.train
            name = self.attack_config.get("attack")
            acls = ATTACKS.get(name) if name in ATTACKS else None
            if self.trigger is None:
                raise ConfigError("run", f"{self.run} has poison_indices but no trigger to rebuild the delivered training set")
            if acls is not None and issubclass(acls, PoisoningAttack):
                attack = acls(build_params(acls.Params, self.attack_config["params"]))
                actx = AttackContext(self.data, self.attack_config.get("model", ""), TrainConfig(epochs=0), int(self.attack_config.get("seed", 0)), torch.device("cpu"), progress=False)
                delivered = attack.poison(actx, self.trigger.cpu(), idx)
            else:
                x, y = train.x.clone(), train.y.clone()
                x[idx] = to_uint8(self.trigger.cpu()(to_float(x[idx])))
                y[idx] = target_labels(y[idx], self.target_mode, self.target, self.num_classes)  # type: ignore[arg-type]
                delivered = ImageSet(x, y)
            flag = torch.zeros(len(train), dtype=torch.bool)
            flag[idx] = True
            self._delivered = (delivered, flag)
        return self._delivered

    def inspected_set(self) -> tuple[ImageSet, Tensor, str]:
        """What a data-level defense inspects: (images with their delivered labels, poison flag, source).

        With poison_indices: the delivered training set. Without (attacks that do not poison the
        training set, e.g. MMLM): the evaluation images with their true labels plus their poisoned
        versions labelled η(y), as the MMLM paper examines the target class's clean and poisoned
        test images.
        """
        got = self.delivered_train()
        if got is not None:
            return got[0], got[1], "training-set"
        ev = self.evaluation
        px, py = self.eval_poisoned()
        lab = target_labels(py, self.target_mode, self.target, self.num_classes)  # type: ignore[arg-type]
        x = torch.cat([ev.x, px])
        flag = torch.cat([torch.zeros(len(ev), dtype=torch.bool), torch.ones(len(px), dtype=torch.bool)])
        return ImageSet(x, torch.cat([ev.y, lab])), flag, "test-set"

    # ----------------------------------------------------------------- models and scores
    def copy_model(self) -> Classifier:
        m = build_model(self.model.arch).to(self.device)
        m.load_state_dict(self.model.state_dict())
        return m.eval()

    def clean_accuracy(self, model: nn.Module | None = None) -> float:
        return accuracy(model or self.model, self.evaluation)

    def attack_success_rate(self, model: nn.Module | None = None) -> float:
        px, py = self.eval_poisoned()
        return attack_success_rate(model or self.model, px, py, self.target_mode, self.target, self.num_classes)  # type: ignore[arg-type]

    def plot_path(self, name: str) -> Path | None:
        return self.out / name if self.out is not None else None


def _json_or_text(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not path.exists():
        return {}, {}
    with safe_open(str(path), "pt") as f:
        meta = {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


# --------------------------------------------------------------------------- the contract


class Defense(ABC):
    """One defense: a paper, a kind, typed ``Params`` and ``run(ctx) -> metrics``."""

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
    def run(self, ctx: DefenseContext) -> dict[str, Any]: ...


@dataclass
class DefenseJob:
    """``backdoorlab defend``: a defense, an attack run, which model, the held-out split, params."""

    defense: str
    run: str
    model: ModelChoice = "backdoored"
    heldout_fraction: float = 0.2
    heldout_seed: int = 0
    seed: int = 0
    device: str = "auto"
    params: dict = field(default_factory=dict)

    def build(self, check_run: bool = True) -> Defense:
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
        if check_run:
            DefenseContext.check_run(self.run, self.model)
        return defense

    def config(self) -> dict:
        """What the run directory records (the attack run need not exist yet: a grid compares configs first)."""
        cfg = asdict(self)
        cfg["run"] = str(Path(self.run).resolve())
        cfg["params"] = asdict(self.build(check_run=False).p)
        return cfg


def run_defense(job: DefenseJob, out: str | Path, progress: bool = True, force: bool = False) -> dict:
    """Run one defense on one attack run; writes config.json, the plot(s) and metrics.json (last)."""
    from ..recipes import resolve_device

    defense = job.build()
    rd = RunDir(out)
    if rd.check(job.config(), force=force):
        return rd.read_metrics()
    t0 = time.perf_counter()
    device = resolve_device(job.device)
    # the attack run's data and model are loaded (and checked) before the output folder is touched
    ctx = DefenseContext.from_run(job.run, job.model, job.heldout_fraction, job.heldout_seed, device, rd.path, job.seed, progress)
    rd.prepare(job.config(), force=force)
    torch.manual_seed(job.seed)
    px, _ = ctx.eval_poisoned()
    metrics: dict[str, Any] = {
        "defense": job.defense,
        "kind": defense.kind.value,
        "paper": defense.paper,
        "attack": ctx.attack_config.get("attack"),
        "dataset": ctx.attack_config.get("dataset"),
        "model": job.model,
        "target": ctx.target,
        "target_mode": ctx.target_mode,
        "heldout_size": len(ctx.heldout_idx),
        "evaluation_size": len(ctx.eval_idx),
        "evaluation_poisoned": len(px),
        "clean_accuracy_before": ctx.clean_accuracy(),
        "attack_success_rate_before": ctx.attack_success_rate(),
    }
    metrics.update(defense.run(ctx))
    metrics["seconds"] = time.perf_counter() - t0
    metrics["device"] = str(device)
    rd.write_metrics(metrics)
    return metrics

