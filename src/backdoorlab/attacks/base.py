"""Attack kinds. Each attack is a small subclass with a typed ``Params`` dataclass and a paper.

- ``PoisoningAttack``: returns a poisoned training set (a trigger applied to chosen samples, labels
  flipped to η(y)); the victim trains on it with the shared trainer.
- ``TrainingAttack``: controls training through a batch hook (and may learn its trigger); returns a
  model and a trigger function.
- ``ModelModificationAttack``: starts from a trained clean model and changes it (MMLM).
- ``TransferAttack``: a teacher is backdoored, a student is transferred from it (Latent Backdoor).

Every attack's parameters derive from :class:`AttackParams` (the target and how labels map to
it); poisoning and training-controlled attacks use :class:`PoisonParams`, which adds the
``poison_rate`` (a share of the training set) and ``restrict``: "none" (train from scratch),
"finetune" (all parameters, starting from the clean model) or "head" (only the final layer of the
clean model: the equal-attackable-parameters comparison with MMLM).

Models an attacker trains for its own purposes (surrogates) get seeds derived from the run's seed
(:func:`derived_seed`), so their initialisation and data order differ from the victim's.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..data.core import Dataset, DatasetSpec, ImageSet, to_float, to_uint8
from ..errors import ConfigError
from ..models import Arch, Classifier, arch_for, build_model
from ..registry import Registry
from ..train.evaluate import target_labels
from ..train.trainer import TrainConfig, TrainHooks, train
from ..validate import check_choice, check_class, check_rate
from .triggers import Trigger


class AttackKind(str, Enum):
    POISONING = "data-poisoning"
    TRAINING = "training-controlled"
    MODEL = "model-modification"
    TRANSFER = "transfer"


@dataclass
class AttackParams:
    """Parameters every attack shares: the target class and the label map η."""

    target: int = 0
    target_mode: Literal["all-to-one", "all-to-all"] = "all-to-one"

    def validate(self, num_classes: int) -> None:
        check_choice("target_mode", self.target_mode, ("all-to-one", "all-to-all"))
        check_class("target", self.target, num_classes)


@dataclass
class PoisonParams(AttackParams):
    """Attacks that poison training data: the share of the training set poisoned, and which
    parameters the victim trains (``restrict``)."""

    poison_rate: float = 0.1
    restrict: Literal["none", "finetune", "head"] = "none"

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        check_rate("poison_rate", self.poison_rate)
        check_choice("restrict", self.restrict, ("none", "finetune", "head"))


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for a model or draw serving ``purpose`` (e.g. "surrogate/2"), fixed by the run's seed
    and distinct from it, so an attacker's own models never share the victim's initialisation."""
    return (seed * 1_000_003 + zlib.crc32(purpose.encode())) % 2**31


@dataclass
class AttackContext:
    """What an attack may use: data, the victim's architecture and training recipe, a clean model."""

    data: Dataset
    model_name: str
    train_cfg: TrainConfig
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    width: float = 1.0
    progress: bool = True
    clean_model_path: Path | None = None  # where the clean model is read from / saved to
    workdir: Path | None = None  # where resumable state (checkpoints) may go
    cache_dir: Path | None = None  # where results that depend only on their inputs may be shared between runs
    _clean: Classifier | None = None

    def new_model(self, seed: int | None = None) -> Classifier:
        """A freshly initialised victim architecture (seeded with the run's seed unless ``seed``)."""
        torch.manual_seed(self.seed if seed is None else seed)
        return build_model(self.model_name, self.data.spec, self.width).to(self.device)

    def checkpoint(self, name: str) -> Path | None:
        return self.workdir / f"{name}.ckpt" if self.workdir is not None else None

    def clean_model(self) -> Classifier:
        """The clean model (loaded if a file exists, else trained once with the shared trainer and saved)."""
        if self._clean is None:
            from ..artifacts import load_model, save_model

            p = self.clean_model_path
            if p is not None and p.exists():
                self._clean = load_model(p, device=self.device)
            else:
                m = self.new_model()
                train(m, self.data.train, self.data.spec, self.train_cfg, seed=self.seed, device=self.device, progress=self.progress, checkpoint=self.checkpoint("clean"), desc="clean model")
                if p is not None:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    save_model(m, p)
                self._clean = m
        return self._clean

    def copy_of_clean(self) -> Classifier:
        m = build_model(self.clean_model().arch).to(self.device)
        m.load_state_dict(self.clean_model().state_dict())
        return m


@dataclass
class AttackResult:
    model: Classifier
    poisoned_test: Tensor  # poisoned test images (uint8 or float in [0,1]) paired with ``test_labels``
    test_labels: Tensor  # true labels of those images
    trigger: Trigger | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)  # saved to tensors.safetensors
    metrics: dict = field(default_factory=dict)  # attack-specific metrics
    clean_test: Tensor | None = None  # the clean versions of ``poisoned_test`` (default: the test set)


class Attack(ABC):
    name: ClassVar[str]
    paper: ClassVar[str]
    kind: ClassVar[AttackKind]
    Params: ClassVar[type[AttackParams]] = AttackParams
    # training-recipe fields an attack needs by default, per dataset ("*": any), under the user's own
    # overrides: the default command must show the method working (e.g. WaNet learns its warp slowly)
    recipe: ClassVar[dict[str, dict]] = {}
    # whether a clean model of the whole dataset is this attack's starting clean model (a grid's
    # clean cell); a transfer attack starts from a teacher of its own task instead
    starts_from_clean_model: ClassVar[bool] = True

    @classmethod
    def recipe_for(cls, dataset: str) -> dict:
        return {**cls.recipe.get("*", {}), **cls.recipe.get(dataset, {})}

    def __init__(self, params: AttackParams | None = None) -> None:
        self.p = params if params is not None else self.Params()

    def validate(self, num_classes: int) -> None:
        self.p.validate(num_classes)

    def labels(self, y: Tensor, num_classes: int) -> Tensor:
        return target_labels(y, self.p.target_mode, self.p.target, num_classes)

    def check_data(self, data: Dataset) -> None:
        """Checks that need the loaded data (image shape, class counts), run before the output
        folder is touched; raise ConfigError naming the parameter. The default checks nothing more."""

    def clean_arch(self, model: str, spec: DatasetSpec, width: float) -> Arch:
        """The architecture a given clean model file must have (checked before it is used)."""
        return arch_for(model, spec, width)

    @classmethod
    def default_target(cls, spec: DatasetSpec) -> int:
        """The target class a run gets when none is given (default: the dataset's)."""
        return spec.default_target

    def check_model(self, model: str, spec: DatasetSpec, width: float) -> None:
        """Checks of the parameters against the victim's architecture (e.g. a layer index beyond its
        layers), run before any data is loaded; raise ConfigError naming the parameter."""

    def evaluation_target(self) -> int:
        """The target class in the labels of :meth:`evaluation_data`: ``p.target`` unless that task
        numbers its classes anew (a transfer attack's student task)."""
        return self.p.target

    def evaluation_data(self, data: Dataset) -> Dataset:
        """The data the attacked model is evaluated and defended on: ``data`` itself, unless the
        victim serves another task built from it (a transfer attack's student task). The job's
        metrics, the poisoned test labels and the defenses' held-out split all refer to it."""
        return data

    @abstractmethod
    def run(self, ctx: AttackContext) -> AttackResult: ...

    # shared by poisoning and training-controlled attacks
    def victim(self, ctx: AttackContext, seed: int | None = None) -> tuple[Classifier, TrainConfig]:
        """The model to train and its recipe, following ``restrict`` (a fresh model is seeded with
        ``seed``, default the run's; the attacker's surrogates pass a :func:`derived_seed`)."""
        if self.p.restrict == "none":
            return ctx.new_model(seed), ctx.train_cfg
        model = ctx.copy_of_clean()
        return model, replace(ctx.train_cfg, trainable="head" if self.p.restrict == "head" else "all")


ATTACKS: Registry[type[Attack]] = Registry("attack")


def eligible_for_poison(y: Tensor, p: PoisonParams) -> Tensor:
    """Indices a poisoning attack may relabel: non-target samples for all-to-one, all for all-to-all."""
    return torch.nonzero(y != p.target).flatten() if p.target_mode == "all-to-one" else torch.arange(len(y))


def poison_count(y: Tensor, p: PoisonParams) -> tuple[int, Tensor]:
    """How many training samples ``poison_rate`` poisons, and the eligible pool (an error naming
    ``poison_rate`` when the pool is too small)."""
    pool = eligible_for_poison(y.cpu(), p)
    n = max(1, round(p.poison_rate * len(y)))
    if n > len(pool):
        raise ConfigError("poison_rate", f"{p.poison_rate} asks for {n} poisoned samples but only {len(pool)} are eligible ({p.target_mode}, target {p.target})")
    return n, pool


def choose_random(y: Tensor, p: PoisonParams, seed: int) -> Tensor:
    n, pool = poison_count(y, p)
    g = torch.Generator().manual_seed(seed + 1)
    return pool[torch.randperm(len(pool), generator=g)[:n]].sort().values


class PoisoningAttack(Attack):
    """Poison a fraction of the training set with a fixed trigger; the victim trains normally."""

    kind = AttackKind.POISONING
    Params = PoisonParams
    p: PoisonParams

    @abstractmethod
    def make_trigger(self, ctx: AttackContext) -> Trigger: ...

    def check_data(self, data: Dataset) -> None:
        poison_count(data.train.y, self.p)

    def select(self, ctx: AttackContext, trigger: Trigger) -> Tensor:
        """Which training samples to poison (random by default)."""
        return choose_random(ctx.data.train.y, self.p, ctx.seed)

    def poison(self, ctx: AttackContext, trigger: Trigger, idx: Tensor) -> ImageSet:
        train = ctx.data.train
        x, y = train.x.clone(), train.y.clone()
        i = idx.to(x.device)
        x[i] = trigger.deliver(x[i])
        y[i] = self.labels(y[i], ctx.data.spec.num_classes)
        return ImageSet(x, y)

    def run(self, ctx: AttackContext) -> AttackResult:
        trigger = self.make_trigger(ctx)
        idx = self.select(ctx, trigger)
        poisoned = self.poison(ctx, trigger, idx)
        model, cfg = self.victim(ctx)
        train(model, poisoned, ctx.data.spec, cfg, seed=ctx.seed, device=ctx.device, progress=ctx.progress, checkpoint=ctx.checkpoint("victim"), desc=f"{self.name} victim")
        test = ctx.data.test
        return AttackResult(model, trigger.deliver(test.x), test.y, trigger, {"poison_indices": idx})


class TrainingAttack(Attack):
    """Control training: the attack's :class:`TrainHooks` poison every batch on the fly (and may
    train a trigger generator beside the classifier)."""

    kind = AttackKind.TRAINING
    Params = PoisonParams
    p: PoisonParams

    @abstractmethod
    def make_trigger(self, ctx: AttackContext) -> Trigger: ...

    def hooks(self, ctx: AttackContext, trigger: Trigger) -> TrainHooks:
        """Default: poison the first ``poison_rate`` of each (shuffled) batch."""
        return PoisonBatches(trigger, self.p.poison_rate, lambda y: self.labels(y, ctx.data.spec.num_classes))

    def run(self, ctx: AttackContext) -> AttackResult:
        trigger = self.make_trigger(ctx)
        model, cfg = self.victim(ctx)
        train(model, ctx.data.train, ctx.data.spec, cfg, seed=ctx.seed, device=ctx.device, hooks=self.hooks(ctx, trigger), progress=ctx.progress, checkpoint=ctx.checkpoint("victim"), desc=f"{self.name} victim")
        test = ctx.data.test
        return AttackResult(model, to_uint8(trigger(to_float(test.x))), test.y, trigger)


class PoisonBatches(TrainHooks):
    """Apply ``trigger`` to the first ``rate`` of every (shuffled) batch and relabel those with ``label``."""

    def __init__(self, trigger: Trigger, rate: float, label) -> None:
        self.trigger, self.rate, self.label = trigger, rate, label

    def batch(self, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        k = int(round(self.rate * len(y)))
        if k == 0:
            return x, y
        x, y = x.clone(), y.clone()
        x[:k] = self.trigger(x[:k])
        y[:k] = self.label(y[:k])
        return x, y


class ModelModificationAttack(Attack):
    kind = AttackKind.MODEL


class TransferAttack(Attack):
    kind = AttackKind.TRANSFER
    starts_from_clean_model = False

