"""UBW-P (Li et al., "Untargeted Backdoor Watermark: Towards Harmless and Stealthy Dataset Copyright
Protection", NeurIPS 2022), the poisoned-label untargeted backdoor, a baseline of the SIBA paper:
a BadNets patch is stamped on ``poison_rate`` of the training images, whose labels are replaced by
random ones, so that the trained model disperses its predictions on triggered inputs instead of
sending them to one target.

Our choices: the random label is uniform over the classes other than the image's own (a label
left unchanged plants nothing); the images are drawn from the whole training set. Metrics beside
the job's (targeted) ones: ``untargeted_attack_success_rate`` (the share of triggered test images
not classified as their true class, the paper's ASR-A), the same among the images whose clean
version is classified correctly (ASR-C), and ``dispersibility`` (the entropy of the predicted labels
over the triggered test set, in nats; log C at most); the untargeted rate of the same images on the
clean model is the control.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.core import ImageSet, to_float, to_uint8
from ..train.evaluate import predict
from .badnets import BadNets, BadNetsParams
from .base import ATTACKS, AttackContext, AttackResult, poison_count
from .triggers import Trigger


def random_other_labels(y: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A label drawn uniformly from the classes other than each ``y``."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator)
    return (y.cpu() + shift) % num_classes


@ATTACKS.register("ubw-p")
class UBWP(BadNets):
    name = "ubw-p"
    paper = "Li et al., Untargeted Backdoor Watermark (NeurIPS 2022): UBW-P, as a baseline of Gao et al., SIBA (TIFS 2024)"
    Params = BadNetsParams
    p: BadNetsParams

    def select(self, ctx: AttackContext, trigger: Trigger) -> Tensor:
        y = ctx.data.train.y
        n, _ = poison_count(y, self.p)
        g = torch.Generator().manual_seed(ctx.seed + 1)
        return torch.randperm(len(y), generator=g)[:n].sort().values

    def poison(self, ctx: AttackContext, trigger: Trigger, idx: Tensor) -> ImageSet:
        train = ctx.data.train
        x, y = train.x.clone(), train.y.clone()
        i = idx.to(x.device)
        x[i] = to_uint8(trigger(to_float(x[i])))
        g = torch.Generator().manual_seed(ctx.seed + 2)
        y[i] = random_other_labels(y[i], ctx.data.spec.num_classes, g).to(y.device)
        return ImageSet(x, y)

    def run(self, ctx: AttackContext) -> AttackResult:
        res = super().run(ctx)
        test, nc = ctx.data.test, ctx.data.spec.num_classes
        y = test.y.cpu()
        pred_p = predict(res.model, to_uint8(res.poisoned_test))
        pred_c = predict(res.model, test.x)
        wrong = pred_p != y
        pred_clean_model = predict(ctx.clean_model(), to_uint8(res.poisoned_test))
        counts = torch.bincount(pred_p, minlength=nc).float()
        prob = counts / counts.sum()
        entropy = float(-(prob[prob > 0] * prob[prob > 0].log()).sum())
        res.metrics.update({
            "untargeted_attack_success_rate": float(wrong.float().mean()),
            "untargeted_attack_success_rate_correct": float(wrong[pred_c == y].float().mean()) if bool((pred_c == y).any()) else float("nan"),
            "untargeted_attack_success_rate_clean_model": float((pred_clean_model != y).float().mean()),
            "dispersibility": entropy,
            "dispersibility_max": math.log(nc),
            "poison_count": len(res.tensors["poison_indices"]),
        })
        return res
