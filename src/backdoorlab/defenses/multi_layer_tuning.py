"""Multi-layer tuning (the Latent Backdoor paper's §7.3, Yao et al. 2019, "Latent Backdoor Attacks
on Deep Neural Networks"): the student trainer tunes more layers than the teacher's instructions
advise. A latent backdoor lives in the first Kt layers; tuning from a layer below Kt rewrites them.

For each j of ``frozen`` (default every j from 0 to N-1 for a model of N layers; j = N-1 tunes
the head only) the inspected model's first j layers are kept and the rest are trained on the
defender's clean data (``trainable = after:j``, the shared trainer), with a new head
(``new_head``, default: the transfer redone as the student trainer would; else the model's own
head is tuned). The defender's held-out data is split (stratified, ``validation_fraction`` = 0.25,
our choice) into the tuning data and a validation part; the defender picks the j that tunes the
most layers while the validation accuracy stays within ``max_accuracy_drop`` (0.05, our choice) of
the best j's, without the ASR. Scored per j on the evaluation data: clean accuracy and ASR (the
paper's Figure 11), and at the chosen j. Tuning recipe (our choices): ``epochs`` = 20, SGD lr 0.01,
momentum 0.9, batch 32, the dataset's augmentation. The data the paper's student tunes on is its
whole training set; here it is the defender's held-out part of the test split, so raise
``--heldout-fraction`` for a fairer comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


from ..attacks.base import derived_seed
from ..attacks.transfer import new_head
from ..data.subset import split
from ..errors import ConfigError
from ..train.evaluate import accuracy
from ..train.trainer import TrainConfig, train
from ..validate import check_fraction, check_positive
from .base import DEFENSES, Defense, DefenseKind, DefenseParams, check_int, check_open_rate, setting_sweep, within_accuracy_drop
from .view import DefenderView, GroundTruth


@dataclass
class MultiLayerTuningParams(DefenseParams):
    frozen: tuple[int, ...] = ()  # layers kept frozen, one run each (empty: 0 .. N-1)
    new_head: bool = True
    epochs: int = 20  # (choice)
    lr: float = 0.01  # (choice)
    batch_size: int = 32  # (choice)
    augment: bool = True
    validation_fraction: float = 0.25  # (choice)
    max_accuracy_drop: float = 0.05  # (choice)

    def validate(self) -> None:
        for j in self.frozen:
            check_int("frozen", j, 0)
        check_int("epochs", self.epochs)
        check_positive("lr", self.lr)
        check_int("batch_size", self.batch_size)
        check_open_rate("validation_fraction", self.validation_fraction)
        check_fraction("max_accuracy_drop", self.max_accuracy_drop)


@DEFENSES.register("multi-layer-tuning")
class MultiLayerTuning(Defense):
    name = "multi-layer-tuning"
    paper = "Yao, Li, Zheng and Zhao, Latent Backdoor Attacks on Deep Neural Networks (CCS 2019), §7.3"
    kind = DefenseKind.MITIGATION
    Params = MultiLayerTuningParams
    headline = ("frozen_layers", "clean_accuracy", "attack_success_rate")
    p: MultiLayerTuningParams

    def levels(self, view: DefenderView) -> list[int]:
        js = sorted(set(self.p.frozen)) if self.p.frozen else list(range(len(view.model.stages)))
        if js and js[-1] >= len(view.model.stages):
            raise ConfigError("frozen", f"{js[-1]} layers frozen leaves nothing to tune in a model of {len(view.model.stages)} layers ({', '.join(view.model.stage_names)})")
        return js

    def decide(self, view: DefenderView) -> dict[str, Any]:
        js = self.levels(view)
        tune, val = split(view.heldout, 1.0 - self.p.validation_fraction, view.seed)
        cfg = TrainConfig(epochs=self.p.epochs, batch_size=self.p.batch_size, lr=self.p.lr, schedule="cosine", augment=self.p.augment)
        models, val_acc = [], []
        for j in js:
            seed = derived_seed(view.seed, f"multi-layer-tuning/{j}")
            m = new_head(view.model, view.num_classes, seed) if self.p.new_head else view.copy_model()
            train(m, tune, view.spec, replace(cfg, trainable=f"after:{j}"), seed=seed, device=view.device, progress=view.progress, desc=f"tune after {j} layers")
            models.append(m)
            val_acc.append(accuracy(m, val))
        ok = within_accuracy_drop(val_acc, max(val_acc), self.p.max_accuracy_drop)
        i = min(ok)  # the most layers tuned within the accuracy budget
        return {"frozen": js, "validation_accuracy": val_acc, "frozen_layers": js[i], "tuning_size": len(tune), "validation_size": len(val),
                "layer_names": view.model.stage_names, "_models": models}

    def score(self, view: DefenderView, decision: dict[str, Any], truth: GroundTruth) -> dict[str, Any]:
        js = decision["frozen"]
        return setting_sweep(view, truth, "frozen", js, decision["_models"], decision["frozen_layers"], "validation_accuracy",
                             decision["validation_accuracy"], "multi_layer_tuning_curve.png", "layers frozen (tuning starts after them)",
                             f"Multi-layer tuning: {decision['frozen_layers']} frozen (acc {{acc:.3f}}, ASR {{asr:.3f}})")
