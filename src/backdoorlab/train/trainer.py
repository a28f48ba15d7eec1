"""The one training loop: every clean model, poisoned model and fine-tuning step goes through it."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.core import DatasetSpec, ImageSet, augment, iterate
from ..errors import ConfigError, TrainingError
from ..models.base import Classifier
from ..validate import check_choice, check_int, check_range

MAX_EPOCHS = 100_000  # a typo's guard (1e9 epochs would never end), far above any real schedule
from .evaluate import accuracy



class Forward:
    """The model's forward pass as the loop runs it: frozen leading stages under ``no_grad`` (unless
    the input itself needs a gradient, as a trigger generator's output does), inside the loop's
    autocast. ``forward(x)`` gives logits; ``forward.with_features(x)`` gives (logits, penultimate
    features), the pair that latent-space losses (WB's DSWD) need."""

    def __init__(self, model: Classifier, frozen: int) -> None:
        self.model, self.frozen = model, frozen

    def _prefix(self, x: Tensor, stop: int) -> Tensor:
        k = min(self.frozen, stop)
        if not k:
            return x
        if x.requires_grad:
            return self.model.forward_to(x, k)
        with torch.no_grad():
            return self.model.forward_to(x, k)

    def with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        last = len(self.model.stages) - 1
        feats = self.model.forward_range(self._prefix(x, last), min(self.frozen, last), last)
        return self.model.head(feats).float(), feats.float()

    def __call__(self, x: Tensor) -> Tensor:
        return self.model.forward_from(self._prefix(x, self.frozen), self.frozen).float()


class TrainHooks:
    """Extension points of the one training loop; attacks and defenses override what they need.

    Per batch, in this order: ``batch`` rewrites the augmented float batch (poison a fraction of it);
    ``before_step`` runs a second optimiser's update first (a trigger generator trained with the
    classifier); ``loss`` returns the classifier's loss and the logits it came from (default: mean
    cross-entropy; ABL's isolation loss, a feature-matching term, gradient ascent for unlearning).
    After each epoch ``end_epoch`` may switch stages or add entries to the epoch's record; setting
    ``record["stop"] = True`` ends training after that epoch (ABL's unlearning stops once done).
    ``state_dict`` / ``load_state_dict`` carry the hooks' own state (a generator and its optimiser)
    in the loop's checkpoint, so an interrupted run resumes in whichever stage it was.
    """

    def batch(self, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        return x, y

    def before_step(self, model: Classifier, x: Tensor, y: Tensor, idx: Tensor, forward: Forward) -> None:
        pass

    def loss(self, model: Classifier, x: Tensor, y: Tensor, idx: Tensor, forward: Forward) -> tuple[Tensor, Tensor]:
        out = forward(x)
        return nn.functional.cross_entropy(out, y), out

    def end_epoch(self, model: Classifier, epoch: int, record: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["none", "step", "multistep", "cosine", "plateau"] = "cosine"
    step_size: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    plateau_patience: int = 10
    augment: bool = True
    trainable: str = "all"  # "all" | "head" | "after:K" (stages after the first K)
    amp: Literal["auto", "on", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 0, MAX_EPOCHS)
        check_int("batch_size", self.batch_size, 1, 1 << 20)
        check_range("lr", self.lr, 0.0, 100.0, low_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("gamma", self.gamma, 0.0, 1.0, low_open=True)
        check_int("step_size", self.step_size, 1)
        check_int("plateau_patience", self.plateau_patience, 0)
        for m in self.milestones:
            check_int("milestones", m, 1)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_choice("schedule", self.schedule, ("none", "step", "multistep", "cosine", "plateau"))
        for f in ("amp", "channels_last"):
            check_choice(f, getattr(self, f), ("auto", "on", "off"))
        if not isinstance(self.augment, bool):
            raise ConfigError("augment", f"expected true/false, got {self.augment!r}")
        if not isinstance(self.trainable, str) or not (self.trainable in ("all", "head") or (self.trainable.startswith("after:") and self.trainable[6:].isdigit())):
            raise ConfigError("trainable", f"must be 'all', 'head' or 'after:K', got {self.trainable!r}")


@dataclass
class TrainHistory:
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def frozen_prefix(model: Classifier, trainable: str) -> int:
    """How many leading stages are frozen for a parameter selector."""
    if trainable == "all":
        return 0
    if trainable == "head":
        return len(model.stages) - 1
    k = int(trainable.split(":")[1])
    if not 0 <= k < len(model.stages):
        raise ConfigError("trainable", f"after:{k} leaves nothing to train in a model with {len(model.stages)} stages")
    return k


def use_amp(cfg: TrainConfig, device: torch.device, model: nn.Module) -> bool:
    if cfg.amp != "auto":
        return cfg.amp == "on"
    if device.type == "cuda":
        return True
    # bf16 autocast on AVX-512 / AMX CPUs: the Digit-CNN trains 1.7x faster than with channels-last
    # alone, same clean accuracy within 0.2 points (docs/results.md section 16; ResNet-18 1.6x,
    # section 4); off elsewhere
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and hasattr(torch, "bfloat16")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    s = cfg.schedule
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma)
    if s == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma)
    if s == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs))
    if s == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=cfg.gamma, patience=cfg.plateau_patience)
    return None


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    model: Classifier,
    data: ImageSet,
    spec: DatasetSpec,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    hooks: TrainHooks | None = None,
    eval_set: ImageSet | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    desc: str = "train",
) -> TrainHistory:
    """Train ``model`` on ``data`` (uint8 images and the labels to learn) with one shared loop.

    ``hooks`` (:class:`TrainHooks`) may rewrite batches, add a second optimiser's step, replace the
    loss and act after each epoch. With ``checkpoint`` the loop saves its state (the hooks' too)
    after each epoch and resumes from it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    hooks = hooks if hooks is not None else TrainHooks()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    k = frozen_prefix(model, cfg.trainable)
    frozen = model.stage_names[:k]
    for name, stage in model.stages.items():
        stage.requires_grad_(name not in frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = use_amp(cfg, device, model)
    if cfg.channels_last == "on" or (cfg.channels_last == "auto" and amp):
        model.to(memory_format=torch.channels_last)
    opt = _optimizer(params, cfg)
    steps = math.ceil(len(data) / cfg.batch_size)
    sched = _scheduler(opt, cfg, steps)
    hist = TrainHistory()
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])
        hist.epochs = list(state["history"])
        hooks.load_state_dict(state.get("hooks", {}))
    data = data.to(device)
    forward = Forward(model, k)
    do_augment = cfg.augment and data.x.dtype == torch.uint8  # feature views are never augmented
    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for epoch in bar:
        model.train()
        for name in frozen:
            model.stages[name].eval()  # frozen stages keep their batch-norm statistics
        tot_loss, tot_hit, tot_n = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for x, y, idx in iterate(data, cfg.batch_size, shuffle=True, generator=gen):
            if do_augment:
                x = augment(x, spec, gen)
            x, y = hooks.batch(x, y, idx)
            if amp and cfg.channels_last != "off" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                hooks.before_step(model, x, y, idx, forward)
                loss, out = hooks.loss(model, x, y, idx, forward)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.detach() * len(y)
            tot_hit += (out.detach().argmax(1) == y).sum()
            tot_n += len(y)
        seen += tot_n
        if not bool(torch.isfinite(tot_loss)):
            raise TrainingError(f"{desc}: the loss became non-finite in epoch {epoch + 1} (lr {opt.param_groups[0]['lr']:g}); nothing was saved for this epoch: lower the learning rate")
        rec = {"epoch": epoch + 1, "loss": float(tot_loss) / max(1, tot_n), "train_accuracy": float(tot_hit) / max(1, tot_n), "lr": opt.param_groups[0]["lr"]}
        if eval_set is not None:
            rec["test_accuracy"] = accuracy(model, eval_set)
        hooks.end_epoch(model, epoch + 1, rec)
        if sched is not None:
            sched.step(rec["loss"]) if cfg.schedule == "plateau" else sched.step()
        hist.epochs.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.3f}", **({"test": f"{rec['test_accuracy']:.3f}"} if eval_set is not None else {}))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1, "history": hist.epochs, "hooks": hooks.state_dict(),
            })
        if rec.get("stop"):
            break
    hist.seconds = time.perf_counter() - t0
    hist.images_per_second = seen / hist.seconds if hist.seconds > 0 else 0.0
    model.requires_grad_(True)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return hist

