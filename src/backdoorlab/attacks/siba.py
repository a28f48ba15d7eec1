"""SIBA (Gao et al., "Backdoor Attack with Sparse and Invisible Trigger", IEEE TIFS 2024) and its
"Sparse" baseline: one universal additive trigger δ with ||δ||0 ≤ k pixel positions and
||δ||∞ ≤ ε, optimised on a pre-trained clean surrogate, then added to ``poison_rate`` (1%) of the
non-target training images, which are relabelled to the target; the victim trains from scratch.

SIBA (paper Algorithm 1, with the official code's details): δ = 0; for ``epochs`` passes over the
attacker's data in mini-batches of ``batch_size``: at the first batch of every ``mask_every``-th
epoch (K = 5) the mask becomes the top-k pixel positions of the batch-mean gradient magnitude at the
current δ, summed over channels (one 2-D mask for all channels; Lemma 1: the L0 projection);
every batch δ <- clip(δ - α·ε·sign(∇), -ε, ε)·mask with the per-sample loss min(CE(f(x+δ), η(y)), 10);
the δ of the epoch with the lowest mean loss is kept. Paper: α = 0.2, official code: α = 0.8
(default here), ε = 8/255, k = 100 on 32x32 CIFAR-10, 200 epochs.

Sparse ("the improved version of Random where its trigger magnitude is optimised using Line 8 of
Algorithm 1"): the same steps on Random's mask (the same positions as ``random`` with the same seed),
never refreshed.

What k means here: pixel *positions* of the image, one mask shared by all channels, so an RGB
trigger with k = 100 changes at most 100 positions (up to 300 values). Default (``k`` unset): the
paper's density, 100 / 1,024 positions of CIFAR-10 (its VGGFace2 setting, 1,600 / 16,384, is the
same density), which is 77 of the 784 positions of a 28x28 MNIST image: a fixed k would mean a
different share of the image at every size, so k scales with the image area. Our choices: 20
epochs by default (the official 200 are over CIFAR-10's 50,000 images, ~78,000 steps; on MNIST-5k's
4,000 images 20 epochs are 640 steps and 4 mask refreshes, and the surrogate loss no longer falls,
see docs/reproductions/siba.md), the surrogate (see :mod:`.universal`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.core import Dataset
from ..validate import check_int
from .base import ATTACKS, AttackContext, derived_seed
from .universal import AdditiveParams, OptimisedAttack, OptimisedParams, SparsityParams, check_k, random_mask, scaled_k


@dataclass
class SparseParams(AdditiveParams, OptimisedParams, SparsityParams):
    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        self.validate_optimiser()
        self.validate_k()


@dataclass
class SIBAParams(SparseParams):
    """``mask_every``: K, the mask is refreshed at the start of every K-th epoch (paper: 5)."""

    mask_every: int = 5

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        check_int("mask_every", self.mask_every, 1)


def top_k_mask(grad: Tensor, k: int) -> Tensor:
    """A (1, H, W) 0/1 mask of the ``k`` positions with the largest gradient magnitude summed over
    channels (``grad``: (C, H, W))."""
    score = grad.abs().sum(0).flatten()
    m = torch.zeros_like(score)
    m[torch.topk(score, k).indices] = 1
    return m.view(1, *grad.shape[1:])


@ATTACKS.register("sparse")
class Sparse(OptimisedAttack):
    name = "sparse"
    paper = "Gao et al., Backdoor Attack with Sparse and Invisible Trigger (TIFS 2024): the 'Sparse' baseline"
    Params = SparseParams
    p: SparseParams

    def check_data(self, data: Dataset) -> None:
        super().check_data(data)
        check_k(scaled_k(self.p.k, data.spec.shape), data.spec.shape)

    def projection(self, ctx: AttackContext, shape: tuple[int, int, int]):
        k = scaled_k(self.p.k, shape)
        check_k(k, shape)
        mask = random_mask(k, shape, torch.Generator().manual_seed(derived_seed(ctx.seed, "sparse/mask"))).to(ctx.device)
        return lambda delta, grad, epoch, batch: delta * mask


@ATTACKS.register("siba")
class SIBA(Sparse):
    name = "siba"
    paper = "Gao et al., Backdoor Attack with Sparse and Invisible Trigger (IEEE TIFS 2024)"
    Params = SIBAParams
    p: SIBAParams

    def projection(self, ctx: AttackContext, shape: tuple[int, int, int]):
        k = scaled_k(self.p.k, shape)
        check_k(k, shape)
        state: dict[str, Tensor] = {}
        self.mask_refreshes = 0

        def project(delta: Tensor, grad: Tensor, epoch: int, batch: int) -> Tensor:
            if batch == 0 and epoch % self.p.mask_every == 0:
                state["mask"] = top_k_mask(grad, k)
                self.mask_refreshes += 1
            return delta * state["mask"]

        return project
