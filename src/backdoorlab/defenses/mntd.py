"""MNTD, Meta Neural Trojan Detection (Xu et al. 2021, "Detecting AI Trojans Using Meta Neural
Analysis"): train many small shadow models yourself, half of them backdoored with triggers drawn
from a broad ("jumbo") distribution, then learn a few query inputs and a meta-classifier that tell
the two kinds apart from the models' outputs on those queries alone; a suspect model is scored
by the same queries.

Shadow set (:func:`train_shadows`): ``shadow_models`` = 32 (half clean, half backdoored; our
choice, the paper trains 2,048, SIBA's evaluation 20) of the inspected model's architecture,
trained on the defender's clean held-out data only, ``shadow_epochs`` = 30 (our choice) with the
dataset's recipe, ``shadow_batch`` = 8 models at a time in one loop of the shared trainer
(:class:`ModelStack`: each batch is poisoned per model by :class:`JumboPoison`, then the models'
losses are summed, so each model gets the gradient it would get alone). The jumbo distribution
(ranges our choice, the shape the paper's): with probability 1/2 a patch (side 2-5 pixels,
random position, random binary pattern, opacity U(0.8, 1)), else a blend of a full-image random
pattern with opacity U(0.05, 0.2); a random target class; a poison rate U(0.05, 0.5). The shadow
set is written as one safetensors file (stacked parameters) into the job's cache folder
(``--cache-dir``), keyed by the architecture, the held-out data, the seed and these parameters:
a second model with the same defender data is then scored in seconds (the trained queries and
meta-classifier are cached beside it, keyed by the shadow set and the meta parameters).

Meta-classifier (:func:`train_meta`): ``queries`` = 10 query images (SIBA's setting), kept in
[0, 1] as sigmoid(θ), θ ~ N(0, 1); the feature of a model is the concatenation of its softmax
outputs on the queries; a two-layer MLP (``hidden`` = 20, the paper's) maps it to a logit.
Queries and MLP are trained together with Adam lr 1e-3 (SIBA's setting) on the binary
cross-entropy over the whole shadow set for ``meta_steps`` = 500 steps. All shadow models run as
one ``torch.func`` vmap over their stacked parameters. The decision: ``meta_score`` = the
meta-classifier's probability that the inspected model is backdoored, flagged above ``threshold``
= 0.5 (the classifier's own boundary, set by the shadow set alone). The AUROC between clean and
backdoored suspect models needs many suspects: ``benchmarks/bench_mntd.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from ..artifacts import write_safetensors
from ..attacks.triggers import MaskPatternTrigger
from ..data.core import DatasetSpec, ImageSet
from ..models import Arch, Classifier, build_model
from ..train.trainer import Forward, TrainConfig, TrainHooks, train
from ..validate import check_positive, check_range
from .memo import locked
from .base import DEFENSES, Defense, DefenseKind, DefenseParams, check_int
from .view import DefenderView, read_tensors


@dataclass
class MNTDParams(DefenseParams):
    shadow_models: int = 32  # (choice) half clean, half jumbo-backdoored
    shadow_epochs: int = 30  # (choice)
    shadow_batch: int = 8  # models trained side by side in one trainer loop
    queries: int = 10
    hidden: int = 20
    meta_steps: int = 500  # (choice)
    meta_lr: float = 1e-3
    threshold: float = 0.5

    def validate(self) -> None:
        check_int("shadow_models", self.shadow_models, 2)
        check_int("shadow_epochs", self.shadow_epochs)
        check_int("shadow_batch", self.shadow_batch)
        check_int("queries", self.queries)
        check_int("hidden", self.hidden)
        check_int("meta_steps", self.meta_steps)
        check_positive("meta_lr", self.meta_lr)
        check_range("threshold", self.threshold, 0.0, 1.0)


# --------------------------------------------------------------------------- shadow models


class ModelStack(nn.Module):
    """K classifiers of one architecture as the trainer's "stages" (one per model, all trainable),
    so the one training loop trains them side by side; ``forward`` takes (K, B, ...) inputs."""

    def __init__(self, models: list[Classifier]) -> None:
        super().__init__()
        self.stages = nn.ModuleDict({f"m{i}": m for i, m in enumerate(models)})

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def models(self) -> list[Classifier]:
        return list(self.stages.values())  # type: ignore[arg-type]

    def forward(self, xs: Tensor) -> Tensor:
        return torch.stack([m(x) for m, x in zip(self.models, xs)])


def jumbo_triggers(k: int, shape: tuple[int, int, int], num_classes: int, g: torch.Generator) -> tuple[MaskPatternTrigger, Tensor, Tensor]:
    """``k`` triggers from the jumbo distribution, stacked (masks and patterns (k, 1, C, H, W)),
    their target classes and poison rates (see the module docstring)."""
    c, h, w = shape
    masks, patterns = torch.zeros(k, 1, c, h, w), torch.rand(k, 1, c, h, w, generator=g)
    u = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=g))  # noqa: E731
    for i in range(k):  # k triggers, not samples: a short loop
        if torch.rand((), generator=g) < 0.5:
            s = int(torch.randint(2, 6, (), generator=g))
            r, col = int(torch.randint(0, h - s + 1, (), generator=g)), int(torch.randint(0, w - s + 1, (), generator=g))
            masks[i, 0, :, r : r + s, col : col + s] = u(0.8, 1.0)
            patterns[i] = (patterns[i] > 0.5).float()
        else:
            masks[i] = u(0.05, 0.2)
    targets = torch.randint(0, num_classes, (k,), generator=g)
    rates = 0.05 + 0.45 * torch.rand(k, generator=g)
    return MaskPatternTrigger(masks, patterns), targets, rates


class JumboPoison(TrainHooks):
    """Per model of a :class:`ModelStack`: poison each sample of the batch with that model's rate
    (0 for clean models) by its trigger and target; the loss is the sum of the models' losses."""

    def __init__(self, trigger: MaskPatternTrigger, targets: Tensor, rates: Tensor, seed: int) -> None:
        self.trigger, self.targets, self.rates = trigger, targets, rates
        self.g = torch.Generator().manual_seed(seed)

    def loss(self, model: ModelStack, x: Tensor, y: Tensor, idx: Tensor, forward: Forward) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        k = len(self.rates)
        sel = (torch.rand(k, len(x), generator=self.g) < self.rates[:, None]).to(x.device)
        xs = torch.where(sel[:, :, None, None, None], self.trigger.to(x.device)(x[None]), x[None])
        ys = torch.where(sel, self.targets[:, None].to(y.device), y[None])
        out = model(xs)
        return F.cross_entropy(out.flatten(0, 1), ys.flatten(), reduction="sum") / len(x), out[0]


def train_models(arch: Arch, data: ImageSet, spec: DatasetSpec, epochs: int, batch: int, trigger: MaskPatternTrigger, targets: Tensor, rates: Tensor,
                 seed: int, device: torch.device, progress: bool = False, desc: str = "models") -> dict[str, Tensor]:
    """Train ``len(rates)`` models of ``arch`` on ``data`` (the dataset's recipe), ``batch`` at a time
    in one trainer loop each, model i poisoned by trigger i (stacked masks/patterns), target i, rate i
    (0 = clean); returns their stacked parameters and buffers (name -> (K, ...))."""
    from ..recipes import default_train_config

    recipe = default_train_config(spec.name, arch.name)
    cfg = TrainConfig(epochs=epochs, batch_size=min(recipe.batch_size, len(data)), lr=recipe.lr, momentum=recipe.momentum,
                      weight_decay=recipe.weight_decay, schedule=recipe.schedule, augment=recipe.augment, amp="off")
    n = len(rates)
    states: list[dict[str, Tensor]] = []
    for s in range(0, n, batch):
        part = slice(s, min(n, s + batch))
        models = []
        for i in range(part.start, part.stop):
            torch.manual_seed(seed * 100_003 + i)
            models.append(build_model(arch))
        stack = ModelStack(models)
        hooks = JumboPoison(MaskPatternTrigger(trigger.mask[part], trigger.pattern[part]), targets[part], rates[part], seed + s)
        train(stack, data, spec, cfg, seed=seed + s, device=device, hooks=hooks, progress=progress, desc=f"{desc} {part.start}-{part.stop - 1}")  # type: ignore[arg-type]
        states += [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in stack.models]
    return {k: torch.stack([st[k] for st in states]) for k in states[0]}


def train_shadows(arch: Arch, data: ImageSet, spec: DatasetSpec, p: MNTDParams, seed: int, device: torch.device, progress: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Train the shadow set; returns stacked parameters/buffers (name -> (K, ...)) and labels (K,), 1 = backdoored."""
    n = p.shadow_models
    labels = (torch.arange(n) >= n // 2).long()
    trig, targets, rates = jumbo_triggers(n, spec.shape, spec.num_classes, torch.Generator().manual_seed(seed))
    state = train_models(arch, data, spec, p.shadow_epochs, p.shadow_batch, trig, targets, rates * labels, seed, device, progress, "MNTD shadows")
    return state, labels


def stacked_state(models: list[Classifier]) -> dict[str, Tensor]:
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    return {k: v.detach() for k, v in {**params, **buffers}.items()}


def model_outputs(arch: Arch, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """Softmax outputs (K, Q, classes) of K stacked models (eval mode) on the same inputs ``x``, one vmap."""
    base = build_model(arch).to(x.device).eval()
    call = lambda st, q: functional_call(base, st, (q,))  # noqa: E731
    return torch.softmax(torch.vmap(call, in_dims=(0, None))(state, x).float(), -1)


# --------------------------------------------------------------------------- meta-classifier


class MetaClassifier(nn.Module):
    """Query images (sigmoid(θ)) and a two-layer MLP on the concatenated softmax outputs."""

    def __init__(self, queries: int, shape: tuple[int, int, int], num_classes: int, hidden: int, g: torch.Generator) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(queries, *shape, generator=g))
        self.mlp = nn.Sequential(nn.Linear(queries * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @property
    def queries(self) -> Tensor:
        return torch.sigmoid(self.theta)

    def forward(self, arch: Arch, state: dict[str, Tensor]) -> Tensor:
        return self.mlp(model_outputs(arch, state, self.queries).flatten(1))[:, 0]


def train_meta(arch: Arch, state: dict[str, Tensor], labels: Tensor, p: MNTDParams, seed: int, device: torch.device) -> tuple[MetaClassifier, list[float]]:
    """Queries and MLP trained together on the shadow set (full batch, Adam); returns the losses."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    meta = MetaClassifier(p.queries, (arch.in_channels, *arch.image_size), arch.num_classes, p.hidden, g).to(device)
    state = {k: v.to(device) for k, v in state.items()}
    opt = torch.optim.Adam(meta.parameters(), lr=p.meta_lr)
    y = labels.float().to(device)
    losses = []
    for _ in range(p.meta_steps):
        loss = F.binary_cross_entropy_with_logits(meta(arch, state), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return meta.eval(), losses


def cache_key(arch: Arch, data: ImageSet, p: MNTDParams, seed: int) -> str:
    shadow = {k: v for k, v in asdict(p).items() if k.startswith("shadow_")}
    h = hashlib.sha256(json.dumps({"arch": arch.to_dict(), "shadow": shadow, "seed": seed}, sort_keys=True).encode())
    h.update(data.x.cpu().numpy().tobytes())
    h.update(data.y.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def shadow_set(view: DefenderView, p: MNTDParams) -> tuple[dict[str, Tensor], Tensor, bool, str]:
    """The shadow set of this defender (data, architecture, seed): from the cache folder when it
    is there, else trained (and written there). Returns state, labels, reused, key."""
    arch = view.model.arch
    key = cache_key(arch, view.heldout, p, view.seed)
    path = Path(view.cache_dir) / f"mntd-shadows-{key}.safetensors" if view.cache_dir else None
    with locked(path):  # two runs of a grid that start side by side train the shadow set once
        if path is not None and path.exists():
            tensors, _ = read_tensors(path)
            labels = tensors.pop("__labels__")
            return tensors, labels, True, key
        state, labels = train_shadows(arch, view.heldout, view.spec, p, view.seed, view.device, view.progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, {**state, "__labels__": labels}, {"arch": json.dumps(arch.to_dict()), "key": key})
    return state, labels, False, key


@DEFENSES.register("mntd")
class MNTD(Defense):
    name = "mntd"
    paper = "Xu et al., Detecting AI Trojans Using Meta Neural Analysis (IEEE S&P 2021)"
    kind = DefenseKind.MODEL
    Params = MNTDParams
    headline = ("meta_score", "flagged", "shadow_reused")
    p: MNTDParams

    def fit(self, view: DefenderView) -> tuple[MetaClassifier, dict[str, Any]]:
        """The shadow set (cached) and the meta-classifier trained on it, with its record."""
        state, labels, reused, key = shadow_set(view, self.p)
        meta_cfg = {k: getattr(self.p, k) for k in ("queries", "hidden", "meta_steps", "meta_lr")}
        mkey = hashlib.sha256(json.dumps({"shadows": key, "meta": meta_cfg, "seed": view.seed}, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(view.cache_dir) / f"mntd-meta-{mkey}.safetensors" if view.cache_dir else None
        with locked(path):
            if path is not None and path.exists():  # the meta-classifier of these shadows: scoring a new model is one forward pass
                tensors, meta_info = read_tensors(path)
                arch = view.model.arch
                meta = MetaClassifier(self.p.queries, (arch.in_channels, *arch.image_size), arch.num_classes, self.p.hidden, torch.Generator()).to(view.device)
                meta.load_state_dict(tensors)
                meta.eval()
                losses = [float(meta_info["loss_first"]), float(meta_info["loss_last"])]
            else:
                meta, losses = train_meta(view.model.arch, state, labels, self.p, view.seed, view.device)
                if path is not None:
                    write_safetensors(path, {k: v.detach() for k, v in meta.state_dict().items()}, {"loss_first": str(losses[0]), "loss_last": str(losses[-1])})
        with torch.no_grad():
            s = torch.sigmoid(meta(view.model.arch, {k: v.to(view.device) for k, v in state.items()})).cpu()
        acc = float(((s > self.p.threshold).long() == labels).float().mean())
        return meta, {"shadow_key": key, "shadow_reused": reused, "shadow_labels": labels, "shadow_scores": s,
                      "meta_train_accuracy": acc, "meta_loss_first": losses[0], "meta_loss_last": losses[-1]}

    def decide(self, view: DefenderView) -> dict[str, Any]:
        meta, record = self.fit(view)
        score = meta_scores(meta, view.model.arch, [view.model])
        return {**record, "meta_score": float(score[0]), "flagged": bool(score[0] > self.p.threshold), "queries": meta.queries.detach().cpu(), "_meta": meta}


@torch.no_grad()
def meta_scores(meta: MetaClassifier, arch: Arch, models: list[Classifier]) -> Tensor:
    """The meta-classifier's probabilities that each of ``models`` is backdoored."""
    dev = meta.theta.device
    state = {k: v.to(dev) for k, v in stacked_state(models).items()}
    return torch.sigmoid(meta(arch, state)).cpu()
