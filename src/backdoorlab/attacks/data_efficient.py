"""Data-Efficient poisoning (Xia et al. 2022, "Data-Efficient Backdoor Attacks", IJCAI): choose
*which* samples to poison with the Filtering-and-Updating Strategy (FUS), then poison them with an
ordinary trigger (BadNets or Blended, ``base_trigger``).

FUS (paper Algorithm 1): start from a random pool U of the poison budget; for N rounds train a model
on the data poisoned at U while counting, per poisoned sample, its forgetting events (Toneva et al.
2019: the sample was classified as its poisoned label when last seen and is not now; the model's
prediction on the training mini-batch, as in the authors' code); keep the ``filter_ratio`` fraction
of U with the most events, refill U at random from the eligible samples not kept. The pool after the
last round is poisoned for the victim. ``rounds = 0`` is plain random selection.

Forgetting events are recorded inside the shared trainer through its ``loss`` hook
(:class:`ForgettingCounter`), so there is no second training loop. The selection models are the
attacker's surrogates: each round's model is initialised and shuffled with its own
:func:`derived_seed`, never the victim's.

Our choices where the paper leaves room: each round trains the victim's own setting (architecture,
recipe and ``restrict``) for ``select_epochs`` epochs (paper: the full 70-epoch schedule; default
6 here, configurable) with a fresh seed per round; poisoned samples *replace* their clean originals
as for every poisoning attack here (the authors' code appends poisoned copies); ties in the event
count are broken at random (seeded); the refill excludes the samples kept.
Defaults of the trigger: those of BadNets and Blended (``base_trigger`` default ``blended``, our
choice; the paper's Blended uses α = 0.15, set ``alpha`` to match).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models import Classifier
from ..train.trainer import Forward, TrainHooks, train
from ..validate import check_choice
from .badnets import BadNetsParams
from .base import ATTACKS, AttackContext, AttackResult, PoisoningAttack, choose_random, derived_seed, eligible_for_poison
from .blended import BlendedParams
from .triggers import Trigger

BASE_TRIGGERS = ("badnets", "blended")


@dataclass
class DataEfficientParams(BadNetsParams, BlendedParams):
    """BadNets' and Blended's trigger fields, plus ``base_trigger`` (badnets | blended), ``rounds``
    (paper: 10; default 5, our choice), ``filter_ratio`` (fraction kept per round, paper: 0.5) and
    ``select_epochs`` (training epochs per round; our choice, 6)."""

    base_trigger: Literal["badnets", "blended"] = "blended"
    rounds: int = 5
    filter_ratio: float = 0.5
    select_epochs: int = 6

    def validate(self, num_classes: int) -> None:
        super().validate(num_classes)
        check_choice("base_trigger", self.base_trigger, BASE_TRIGGERS)
        if self.rounds < 0:
            raise ConfigError("rounds", f"must be >= 0, got {self.rounds}")
        if not 0.0 <= self.filter_ratio < 1.0:
            raise ConfigError("filter_ratio", f"must lie in [0, 1) (the fraction kept each round), got {self.filter_ratio}")
        if self.select_epochs < 1:
            raise ConfigError("select_epochs", f"must be >= 1, got {self.select_epochs}")


class ForgettingCounter(TrainHooks):
    """Forgetting events of tracked training samples, fed from the trainer's ``loss`` hook.

    ``tracked`` are indices into the training set. Each time a tracked sample is seen, it counts one
    event if it was classified correctly when last seen and is misclassified now; with one visit per
    epoch that is the count of correct -> wrong transitions between consecutive epochs.
    """

    def __init__(self, n_total: int, tracked: Tensor, device: torch.device | str = "cpu") -> None:
        tracked = tracked.to(device)
        self.pos = torch.full((n_total,), -1, dtype=torch.long, device=device)
        self.pos[tracked] = torch.arange(len(tracked), device=device)
        self.last = torch.zeros(len(tracked), dtype=torch.bool, device=device)
        self.events = torch.zeros(len(tracked), dtype=torch.long, device=device)
        self.seen = torch.zeros(len(tracked), dtype=torch.long, device=device)

    def record(self, idx: Tensor, correct: Tensor) -> None:
        """Record whether the samples ``idx`` (training-set indices, unique) are classified correctly."""
        p = self.pos[idx.to(self.pos.device)]
        keep = p >= 0
        p, c = p[keep], correct.to(self.pos.device)[keep]
        self.events[p] += (self.last[p] & ~c).long()
        self.last[p] = c
        self.seen[p] += 1

    def loss(self, model: Classifier, x: Tensor, y: Tensor, idx: Tensor, forward: Forward) -> tuple[Tensor, Tensor]:
        logits = forward(x)
        self.record(idx, logits.detach().argmax(1) == y)
        return F.cross_entropy(logits, y), logits


def most_forgotten(events: Tensor, keep: int, generator: torch.Generator) -> Tensor:
    """Positions of the ``keep`` largest counts, ties broken at random."""
    perm = torch.randperm(len(events), generator=generator)
    order = torch.argsort(events.cpu()[perm], descending=True, stable=True)
    return perm[order[:keep]]


@ATTACKS.register("data-efficient")
class DataEfficient(PoisoningAttack):
    name = "data-efficient"
    paper = "Xia et al., Data-Efficient Backdoor Attacks (IJCAI 2022)"
    Params = DataEfficientParams
    p: DataEfficientParams

    def make_trigger(self, ctx: AttackContext) -> Trigger:
        base = ATTACKS.get(self.p.base_trigger)
        names = {f.name for f in fields(base.Params)}
        return base(base.Params(**{n: getattr(self.p, n) for n in names})).make_trigger(ctx)  # type: ignore[abstract, attr-defined]

    def select(self, ctx: AttackContext, trigger: Trigger) -> Tensor:
        y = ctx.data.train.y.cpu()
        pool = eligible_for_poison(y, self.p)
        chosen = choose_random(y, self.p, ctx.seed)  # round 0: exactly the random baseline's pick
        self.initial = chosen
        n, n_keep = len(chosen), int(len(chosen) * self.p.filter_ratio)
        gen = torch.Generator().manual_seed(ctx.seed + 17)
        self.rounds_log: list[dict] = []
        state_path = ctx.checkpoint("fus-selection")
        if state_path is not None and state_path.exists():  # resume after the last finished round
            st = torch.load(state_path, weights_only=True)
            chosen, self.rounds_log = st["chosen"], list(st["rounds"])
            gen.set_state(st["generator"])
        for r in range(len(self.rounds_log), self.p.rounds):
            counter = ForgettingCounter(len(y), chosen, ctx.device)
            seed = derived_seed(ctx.seed, f"data-efficient/surrogate/{r + 1}")
            model, cfg = self.victim(ctx, seed)
            train(model, self.poison(ctx, trigger, chosen), ctx.data.spec, replace(cfg, epochs=self.p.select_epochs),
                  seed=seed, device=ctx.device, hooks=counter, progress=ctx.progress, desc=f"FUS round {r + 1}/{self.p.rounds}")
            ev = counter.events.cpu()
            keep = most_forgotten(ev, n_keep, gen)
            kept = chosen[keep]
            free = pool[~torch.isin(pool, kept)]
            chosen = torch.cat([kept, free[torch.randperm(len(free), generator=gen)[: n - n_keep]]]).sort().values
            self.rounds_log.append({
                "round": r + 1,
                "mean_forgetting_events": float(ev.float().mean()),
                "max_forgetting_events": int(ev.max()),
                "forgotten_at_least_once": float((ev > 0).float().mean()),
                "kept_mean_forgetting_events": float(ev[keep].float().mean()) if n_keep else 0.0,
                "overlap_with_random": float(torch.isin(chosen, self.initial).float().mean()),
            })
            if state_path is not None:
                torch.save({"chosen": chosen, "rounds": self.rounds_log, "generator": gen.get_state()}, state_path)
        return chosen

    def run(self, ctx: AttackContext) -> AttackResult:
        res = super().run(ctx)
        res.metrics.update({
            "poison_count": len(res.tensors["poison_indices"]),
            "selection_rounds": self.rounds_log,
            "selection_overlap_with_random": float(torch.isin(res.tensors["poison_indices"], self.initial).float().mean()),
        })
        res.tensors["random_pool_indices"] = self.initial.clone()
        return res
