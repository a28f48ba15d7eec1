"""The one training loop: every clean model, poisoned model and fine-tuning step goes through it."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.core import DatasetSpec, ImageSet, augment, iterate
from ..errors import ConfigError
from ..models.base import Classifier
from ..validate import check_positive
from .evaluate import accuracy

BatchHook = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


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
        if self.epochs < 0:
            raise ConfigError("epochs", f"must be >= 0, got {self.epochs}")
        check_positive("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        if not (self.trainable in ("all", "head") or (self.trainable.startswith("after:") and self.trainable[6:].isdigit())):
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
    # bf16 autocast pays on CPUs with native bf16 for convolution-heavy models, not for tiny ones
    big = sum(p.numel() for p in model.parameters()) > 4_000_000
    return big and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and hasattr(torch, "bfloat16")


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
    batch_hook: BatchHook | None = None,
    loss_fn: LossFn | None = None,
    eval_set: ImageSet | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    desc: str = "train",
) -> TrainHistory:
    """Train ``model`` on ``data`` (uint8 images and the labels to learn) with one shared loop.

    ``batch_hook(x, y, idx)`` may rewrite an augmented float batch (training-controlled attacks);
    ``loss_fn(logits, y, idx)`` may replace the mean cross-entropy (e.g. ABL's isolation loss).
    With ``checkpoint`` the loop saves its state after each epoch and resumes from it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
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
    data = data.to(device)
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
            if batch_hook is not None:
                x, y = batch_hook(x, y, idx)
            if amp and cfg.channels_last != "off" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                if k:
                    with torch.no_grad():
                        h = model.forward_to(x, k)
                    out = model.forward_from(h, k)
                else:
                    out = model(x)
                out = out.float()
                loss = loss_fn(out, y, idx) if loss_fn is not None else nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.detach() * len(y)
            tot_hit += (out.detach().argmax(1) == y).sum()
            tot_n += len(y)
        seen += tot_n
        rec = {"epoch": epoch + 1, "loss": float(tot_loss) / max(1, tot_n), "train_accuracy": float(tot_hit) / max(1, tot_n), "lr": opt.param_groups[0]["lr"]}
        if eval_set is not None:
            rec["test_accuracy"] = accuracy(model, eval_set)
        if sched is not None:
            sched.step(rec["loss"]) if cfg.schedule == "plateau" else sched.step()
        hist.epochs.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.3f}", **({"test": f"{rec['test_accuracy']:.3f}"} if eval_set is not None else {}))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1, "history": hist.epochs,
            })
    hist.seconds = time.perf_counter() - t0
    hist.images_per_second = seen / hist.seconds if hist.seconds > 0 else 0.0
    model.requires_grad_(True)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return hist

