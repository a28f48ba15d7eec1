"""Input blurring (the Latent Backdoor paper's §7.2, Yao et al. 2019, "Latent Backdoor Attacks on
Deep Neural Networks"): every input is smoothed with a Gaussian filter before the model sees it,
which may break an optimised trigger's pattern, at a cost in clean accuracy.

For each kernel size k of ``kernel_sizes`` (odd; 1 = no blurring) the inputs are convolved with a
k x k Gaussian (separable, per channel, reflected borders as OpenCV's default). ``sigma`` = 0 takes
OpenCV's rule for a given size, σ = 0.3·((k - 1)/2 - 1) + 0.8 (our choice; the paper names only the
kernel size). The defender's operating point is chosen from its clean held-out data alone: the
largest kernel whose held-out accuracy stays within ``max_accuracy_drop`` (our choice 0.05) of the
unblurred model's. Scored per kernel size on the evaluation data: clean accuracy and ASR (the
paper's Figure 10), and at the chosen size; ``kernel_asr_below`` is the smallest size that brings
the ASR to ``asr_goal`` (0.2, the paper's example) or below, with its clean accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.core import to_float
from ..errors import ConfigError
from ..train.evaluate import accuracy, model_device
from ..validate import check_fraction, check_range
from .base import DEFENSES, Defense, DefenseKind, DefenseParams, setting_sweep, within_accuracy_drop
from .view import DefenderView, GroundTruth


@dataclass
class InputBlurringParams(DefenseParams):
    kernel_sizes: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    sigma: float = 0.0  # 0: OpenCV's σ for each kernel size (choice)
    max_accuracy_drop: float = 0.05  # (choice)
    asr_goal: float = 0.2

    def validate(self) -> None:
        if not self.kernel_sizes:
            raise ConfigError("kernel_sizes", "name at least one kernel size")
        for k in self.kernel_sizes:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 or k > 63:
                raise ConfigError("kernel_sizes", f"kernel sizes are odd integers in 1..63, got {k!r}")
        check_range("sigma", self.sigma, 0.0, 100.0)
        check_fraction("max_accuracy_drop", self.max_accuracy_drop)
        check_fraction("asr_goal", self.asr_goal)


def gaussian_kernel(k: int, sigma: float = 0.0) -> Tensor:
    """The 1-d Gaussian of size ``k`` (normalised); σ = 0 takes OpenCV's rule for the size."""
    s = sigma if sigma > 0 else 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-(r**2) / (2 * s * s))
    return (g / g.sum()).float()


def blur(x: Tensor, k: int, sigma: float = 0.0) -> Tensor:
    """A k x k Gaussian blur of a batch (uint8 or float in [0, 1]; float out), per channel, borders reflected."""
    x = to_float(x)
    if k == 1:
        return x
    c = x.shape[1]
    g = gaussian_kernel(k, sigma).to(x.device, x.dtype)
    p = k // 2
    x = F.pad(x, (p, p, p, p), mode="reflect" if p < min(x.shape[-2:]) else "replicate")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


class Blurred(torch.nn.Module):
    """``model`` behind the blurring preprocessor (what the defender deploys)."""

    def __init__(self, model: torch.nn.Module, k: int, sigma: float) -> None:
        super().__init__()
        self.model, self.k, self.sigma = model, k, sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.model(blur(x, self.k, self.sigma))


@DEFENSES.register("input-blurring")
class InputBlurring(Defense):
    name = "input-blurring"
    paper = "Yao, Li, Zheng and Zhao, Latent Backdoor Attacks on Deep Neural Networks (CCS 2019), §7.2"
    kind = DefenseKind.MITIGATION
    Params = InputBlurringParams
    headline = ("kernel_size", "clean_accuracy", "attack_success_rate", "kernel_asr_below", "clean_accuracy_asr_below")
    p: InputBlurringParams

    def _wrapped(self, view: DefenderView, k: int) -> Blurred:
        return Blurred(view.model, k, self.p.sigma).to(model_device(view.model))

    def decide(self, view: DefenderView) -> dict[str, Any]:
        sizes = sorted(set(self.p.kernel_sizes))
        held = [accuracy(self._wrapped(view, k), view.heldout) for k in sizes]
        ref = accuracy(view.model, view.heldout)
        ok = within_accuracy_drop(held, ref, self.p.max_accuracy_drop)
        k = sizes[max(ok)] if ok else 1
        return {"kernel_sizes": sizes, "heldout_accuracy": held, "heldout_accuracy_unblurred": ref, "kernel_size": k}

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        sizes = decision["kernel_sizes"]
        metrics = setting_sweep(view, truth, "kernel_size", sizes, [self._wrapped(view, k) for k in sizes], decision["kernel_size"],
                                "heldout_accuracy", decision["heldout_accuracy"], "input_blurring_curve.png", "Gaussian kernel size",
                                f"Input blurring: chosen k = {decision['kernel_size']} (acc {{acc:.3f}}, ASR {{asr:.3f}})")
        asr, acc = metrics["curve"]["attack_success_rate"], metrics["curve"]["clean_accuracy"]
        below = [j for j, r in enumerate(asr) if r <= self.p.asr_goal]
        metrics["kernel_asr_below"] = sizes[below[0]] if below else None
        metrics["clean_accuracy_asr_below"] = acc[below[0]] if below else None
        return metrics
