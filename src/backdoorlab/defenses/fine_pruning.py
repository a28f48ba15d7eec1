"""Fine-Pruning (Liu, Dolan-Gavitt and Garg 2018, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks"): prune the channels of the last convolutional layer that stay
dormant on clean data, then fine-tune on clean data.

The mean activation of every channel of ``model.conv_stage``'s output is measured on the
defender's clean held-out images; channels are pruned in increasing order of activation, ``step``
channels at a time, by a channel mask applied with a forward hook on that stage. Each pruning level
is evaluated from the stage's cached output (``forward_from``), so the whole curve costs one
forward pass per level of the layers after the stage only. At each level the curve records clean
accuracy on the defender's held-out data, and (ground truth, for the plot and the report) clean
accuracy and ASR on the evaluation data. The pruning level is chosen without the ASR: the largest
fraction whose held-out accuracy stays within ``max_accuracy_drop`` (default 0.05, i.e. 5 points,
our choice) of the unpruned model's, capped at ``max_fraction`` (default 1.0). Then the pruned
model (mask kept) is fine-tuned on the held-out data with the shared trainer: ``finetune_epochs``
= 10, SGD lr 0.01, momentum 0.9, batch 64, the dataset's augmentation (our choices; the paper
fine-tunes on its clean validation data until accuracy recovers). Reported: the curve (PNG),
``pruned_fraction``, accuracy / ASR after pruning, and ``clean_accuracy`` / ``attack_success_rate``
after fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import Classifier
from ..plots import line_plot
from ..train.evaluate import attack_success_rate, batched, predict
from ..train.trainer import TrainConfig, train
from ..validate import check_fraction, check_positive
from .base import DEFENSES, Defense, DefenseKind, DefenseParams, check_int
from .view import DefenderView, GroundTruth


@dataclass
class FinePruningParams(DefenseParams):
    step: int = 1  # channels pruned per level
    max_accuracy_drop: float = 0.05  # (choice) allowed drop of held-out clean accuracy
    max_fraction: float = 1.0
    finetune_epochs: int = 10  # (choice)
    finetune_lr: float = 0.01  # (choice)
    finetune_batch_size: int = 64  # (choice)
    finetune_augment: bool = True

    def validate(self) -> None:
        check_int("step", self.step)
        check_fraction("max_accuracy_drop", self.max_accuracy_drop)
        check_fraction("max_fraction", self.max_fraction)
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_positive("finetune_lr", self.finetune_lr)
        check_int("finetune_batch_size", self.finetune_batch_size)


class _AfterStage(nn.Module):
    """The layers after ``stage`` applied to a cached stage output with pruned channels zeroed."""

    def __init__(self, model: Classifier, stage: str, keep: Tensor) -> None:
        super().__init__()
        self.model, self.stage, self.keep = model, stage, keep

    def forward(self, h: Tensor) -> Tensor:
        return self.model.forward_from(h * self.keep.view(1, -1, *[1] * (h.dim() - 2)).to(h), self.stage)


def prune_hook(model: Classifier, keep: Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the pruned channels of ``model.conv_stage``'s output on every forward pass (training too)."""
    def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
        return out * keep.view(1, -1, *[1] * (out.dim() - 2)).to(out)

    return model.stages[model.conv_stage].register_forward_hook(hook)


@DEFENSES.register("fine-pruning")
class FinePruning(Defense):
    name = "fine-pruning"
    paper = "Liu, Dolan-Gavitt and Garg, Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks (RAID 2018)"
    kind = DefenseKind.MITIGATION
    Params = FinePruningParams
    headline = ("pruned_fraction", "clean_accuracy_pruned", "attack_success_rate_pruned", "clean_accuracy", "attack_success_rate", "fraction_asr_halved", "clean_accuracy_asr_halved")
    p: FinePruningParams

    def decide(self, view: DefenderView) -> dict[str, Any]:
        model = view.copy_model()
        stage, hold = model.conv_stage, view.heldout
        h_hold = batched(lambda x: model.forward_to(x, stage), model, hold.x)
        order = h_hold.transpose(0, 1).flatten(1).mean(1).argsort()  # mean activation per channel on clean data
        n_ch = len(order)
        counts = list(range(0, n_ch + 1, self.p.step))
        if counts[-1] != n_ch:
            counts.append(n_ch)
        held_acc = [float((predict(_AfterStage(model, stage, keep_mask(order, k).to(view.device)), h_hold) == hold.y.cpu()).float().mean()) for k in counts]
        ok = [i for i, k in enumerate(counts) if held_acc[i] >= held_acc[0] - self.p.max_accuracy_drop and k / n_ch <= self.p.max_fraction]
        k = counts[max(ok)]
        handle = prune_hook(model, keep_mask(order, k).to(view.device))
        if self.p.finetune_epochs > 0:
            cfg = TrainConfig(epochs=self.p.finetune_epochs, batch_size=self.p.finetune_batch_size, lr=self.p.finetune_lr, schedule="none", augment=self.p.finetune_augment)
            train(model, hold, view.spec, cfg, seed=view.seed, device=view.device, progress=view.progress, desc="fine-pruning fine-tune")
        return {"pruned_channels": k, "channels": n_ch, "pruned_fraction": k / n_ch, "stage": stage, "levels": counts,
                "heldout_accuracy": held_acc, "channel_order": order, "_model": model, "_hook": handle}

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        model, stage, order, n_ch = view.copy_model(), decision["stage"], decision["channel_order"], decision["channels"]
        ev = truth.evaluation
        h_ev, h_px = (batched(lambda x: model.forward_to(x, stage), model, x) for x in (ev.x, truth.poisoned))
        curve: dict[str, list[float]] = {"fraction": [k / n_ch for k in decision["levels"]], "heldout_accuracy": decision["heldout_accuracy"], "clean_accuracy": [], "attack_success_rate": []}
        for k in decision["levels"]:
            head = _AfterStage(model, stage, keep_mask(order, k).to(view.device))
            curve["clean_accuracy"].append(float((predict(head, h_ev) == ev.y.cpu()).float().mean()))
            curve["attack_success_rate"].append(attack_success_rate(head, h_px, truth.poisoned_labels, truth.target_mode, truth.target, truth.num_classes) if len(h_px) else float("nan"))  # type: ignore[arg-type]
        handle = prune_hook(model, keep_mask(order, decision["pruned_channels"]).to(view.device))
        fine_tuned = decision["_model"]
        metrics: dict[str, Any] = {
            "clean_accuracy_pruned": truth.clean_accuracy(model),
            "attack_success_rate_pruned": truth.attack_success_rate(model),
            "min_attack_success_rate_on_curve": min(curve["attack_success_rate"]),
            "clean_accuracy": truth.clean_accuracy(fine_tuned),
            "attack_success_rate": truth.attack_success_rate(fine_tuned),
        }
        handle.remove()
        decision["_hook"].remove()
        halved = [i for i, r in enumerate(curve["attack_success_rate"]) if r <= 0.5 * curve["attack_success_rate"][0]]
        metrics["fraction_asr_halved"] = curve["fraction"][halved[0]] if halved else None
        metrics["clean_accuracy_asr_halved"] = curve["clean_accuracy"][halved[0]] if halved else None
        metrics["curve"] = curve
        path = view.plot_path("fine_pruning_curve.png")
        if path is not None:
            line_plot(curve["fraction"], {"clean acc. (evaluation)": curve["clean_accuracy"], "ASR (evaluation)": curve["attack_success_rate"], "clean acc. (defender held-out)": curve["heldout_accuracy"]},
                      path, f"fraction of {stage} channels pruned", "rate", title=f"Fine-pruning {decision['pruned_channels']}/{n_ch}; fine-tuned: acc {metrics['clean_accuracy']:.3f}, ASR {metrics['attack_success_rate']:.3f}")
            metrics["plot"] = path.name
        return metrics


def keep_mask(order: Tensor, k: int) -> Tensor:
    """1 for kept channels, 0 for the ``k`` least active (the first ``k`` of ``order``)."""
    keep = torch.ones(len(order))
    keep[order[:k]] = 0
    return keep
