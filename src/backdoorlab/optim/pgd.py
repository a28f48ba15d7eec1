"""The one PGD routine (Madry et al. 2018): L∞-bounded perturbations minimising a batched loss.

Every attack and defense that crafts bounded perturbations (MMLM's poisoned test images, universal
perturbations, adversarial examples) calls :func:`pgd` (one perturbation per image) or
:func:`universal_pgd` (one perturbation shared by every image: TUAP, SIBA, Sparse). The loss is
given per sample; both take the same signed step (:func:`signed_step_`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..data.core import to_float
from ..validate import check_epsilon, check_int, check_positive

LossPerSample = Callable[[Tensor, Tensor], Tensor]  # (x_adv, batch index) -> loss per sample (B,)


def signed_step_(delta: Tensor, grad: Tensor, step: float | Tensor, epsilon: float) -> Tensor:
    """δ <- clip(δ - step·sign(grad), -ε, ε), in place (``step`` may be a tensor that broadcasts)."""
    delta -= step * grad.sign()
    return delta.clamp_(-epsilon, epsilon)


@dataclass
class PGDConfig:
    epsilon: float = 8 / 255
    steps: int = 100
    step_size: float | None = None  # default: 2.5·ε/steps (Madry et al.), at least ε/50
    random_start: bool = False
    keep_best: bool = True  # return, per sample, the iterate with the lowest loss
    early_stop: Callable[[Tensor, Tensor], Tensor] | None = None  # (x_adv, idx) -> bool (B,) samples that are done

    def __post_init__(self) -> None:
        check_epsilon("epsilon", self.epsilon)
        check_positive("steps", self.steps)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else max(2.5 * self.epsilon / self.steps, self.epsilon / 50)


def pgd(x: Tensor, loss_fn: LossPerSample, cfg: PGDConfig, generator: torch.Generator | None = None) -> Tensor:
    """Minimise ``loss_fn`` over x + δ with ||δ||∞ ≤ ε and x + δ ∈ [0, 1]; signed-gradient steps."""
    x = to_float(x.detach())
    idx = torch.arange(len(x), device=x.device)
    if cfg.epsilon == 0:
        return x.clone()
    delta = torch.zeros_like(x)
    if cfg.random_start:
        delta = (torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1) * cfg.epsilon
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    best = x.clone()
    best_loss = torch.full((len(x),), float("inf"), device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    live = idx  # the samples still stepping: those that stopped early leave the batch (same result, less work)
    for _ in range(cfg.steps):
        d = delta[live].detach().requires_grad_(True) if len(live) < len(x) else delta
        xa = x[live] + d
        loss = loss_fn(xa, live)
        (grad,) = torch.autograd.grad(loss.sum(), d)
        with torch.no_grad():
            if cfg.keep_best:
                better = loss.detach() < best_loss[live]
                best_loss[live] = torch.where(better, loss.detach(), best_loss[live])
                best[live[better]] = xa[better]
            if cfg.early_stop is not None:
                stop = cfg.early_stop(xa, live)
                active[live[stop]] = False
                if not bool(active.any()):
                    break
                keep = ~stop
                live, grad = live[keep], grad[keep]
            step = delta[live]
            signed_step_(step, grad, cfg.alpha, cfg.epsilon)
            delta[live] = (x[live] + step).clamp(0, 1) - x[live]
    with torch.no_grad():
        final = x + delta
        if cfg.keep_best:
            last = loss_fn(final, idx)
            better = last < best_loss
            best[better] = final[better]
            if cfg.early_stop is not None:  # samples that stopped early keep the iterate that succeeded
                done = ~active
                best[done] = final[done]
            return best.detach()
    return final.detach()


@dataclass
class UniversalConfig:
    """One perturbation δ for a whole data set: ``epochs`` passes of mini-batch signed steps of
    size ``step`` (absolute, pixel scale), ||δ||∞ ≤ ``epsilon``; the δ at the end of the epoch with
    the lowest mean loss is returned."""

    epsilon: float = 8 / 255
    step: float = 0.8 * 8 / 255
    epochs: int = 10
    batch_size: int = 128

    def __post_init__(self) -> None:
        check_epsilon("epsilon", self.epsilon)
        check_positive("step", self.step)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)


# (δ after the step and the L∞ clip, the step's gradient, epoch from 0, batch number) -> projected δ
Projection = Callable[[Tensor, Tensor, int, int], Tensor]


def universal_pgd(x: Tensor, loss_fn: LossPerSample, cfg: UniversalConfig, project: Projection | None = None,
                  generator: torch.Generator | None = None, shape: tuple[int, ...] | None = None) -> tuple[Tensor, list[float]]:
    """Minimise the mean of ``loss_fn(clip(x + δ, 0, 1), idx)`` over one δ shared by all images.

    ``x``: images (uint8 or float in [0, 1]); batches are drawn in a shuffled order (``generator``)
    and ``idx`` are their positions in ``x``. After every step δ is clipped to [-ε, ε] and passed
    to ``project`` (a mask, a sparsity constraint). Returns the best epoch's δ and the mean loss of
    every epoch (each batch's loss is taken at the δ its step starts from).
    """
    delta = torch.zeros(shape if shape is not None else x.shape[1:], device=x.device)
    best, best_loss, history = delta.clone(), float("inf"), []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        total = torch.zeros((), device=x.device)
        for b, s in enumerate(range(0, len(x), cfg.batch_size)):
            idx = order[s : s + cfg.batch_size]
            xb = to_float(x[idx])
            d = delta.clone().requires_grad_(True)
            loss = loss_fn((xb + d).clamp(0, 1), idx)
            (grad,) = torch.autograd.grad(loss.mean(), d)
            total += loss.detach().sum()
            with torch.no_grad():
                signed_step_(delta, grad, cfg.step, cfg.epsilon)
                if project is not None:
                    delta = project(delta, grad, epoch, b)
        history.append(float(total) / len(x))
        if history[-1] < best_loss:
            best, best_loss = delta.clone(), history[-1]
    return best, history


def quantize(x: Tensor, x_adv: Tensor, epsilon: float) -> Tensor:
    """The 8-bit image an attacker delivers for ``x_adv``: rounded to the nearest level, then pulled
    back inside the L∞ ball of radius ``epsilon`` around the 8-bit clean image ``x`` (rounding alone
    can overshoot the budget by half a level)."""
    c = to_float(x).mul(255).round()
    q = x_adv.detach().clamp(0, 1).mul(255).round()
    r = float(int(epsilon * 255 + 1e-6))
    return torch.minimum(torch.maximum(q, c - r), c + r).clamp(0, 255).to(torch.uint8)
