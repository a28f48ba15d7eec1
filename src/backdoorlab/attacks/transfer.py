"""Transfer learning pieces shared by transfer attacks and the defenses that redo a transfer.

A *task* is a subset of a dataset's classes numbered 0..n-1 in the order given (a teacher task,
a student task). :func:`transfer` builds a student the way the Latent Backdoor paper (Yao et al.
2019, Figure 1) describes transfer learning: copy every layer of the teacher but its head, add a
new head for the student's classes, and train with the first ``K`` layers frozen ("the first K
layers" are ``stage_names[:K]``, :class:`~backdoorlab.models.Classifier`). :func:`with_head`
gives a model whose head is exactly another model's (the Latent Backdoor's trace wiping).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ..data.core import Dataset, DatasetSpec, ImageSet
from ..data.subset import by_class
from ..models import Classifier, build_model
from ..train.trainer import TrainConfig, TrainHistory, train

HEAD = "stages.head."


def task_spec(spec: DatasetSpec, classes: Sequence[int], default_target: int = 0, suffix: str = "") -> DatasetSpec:
    """The spec of a task made of ``classes`` of ``spec`` (renumbered 0..n-1 in that order)."""
    names = tuple(spec.class_names[c] for c in classes)
    return replace(spec, name=spec.name + suffix, num_classes=len(classes), class_names=names, default_target=default_target,
                   description=f"{spec.name} classes {list(classes)} as a task of {len(classes)} classes")


def cap_per_class(data: ImageSet, per_class: int, seed: int = 0) -> ImageSet:
    """At most ``per_class`` samples of every class (a fixed stratified draw; 0 keeps all)."""
    if per_class <= 0 or len(data) == 0:
        return data
    counts = torch.bincount(data.y.cpu())
    if int(counts.max()) <= per_class:
        return data
    keep = [torch.nonzero(data.y.cpu() == c).flatten() for c in range(len(counts))]
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([k[torch.randperm(len(k), generator=g)[:per_class]] for k in keep if len(k)])
    return data.subset(idx.sort().values)


def task_data(data: Dataset, classes: Sequence[int], suffix: str, default_target: int = 0, train_per_class: int = 0) -> Dataset:
    """The task of ``classes``: train and test images of those classes, labels renumbered."""
    train = cap_per_class(by_class(data.train, classes), train_per_class)
    return Dataset(task_spec(data.spec, classes, default_target, suffix), train, by_class(data.test, classes), dict(data.meta))


def with_head(body: Classifier, head_of: Classifier) -> Classifier:
    """A copy of ``body`` whose head is exactly ``head_of``'s (bit for bit), sized for its classes."""
    model = build_model(replace(body.arch, num_classes=head_of.arch.num_classes)).to(next(body.parameters()).device)
    state = {k: v for k, v in body.state_dict().items() if not k.startswith(HEAD)}
    state.update({k: v for k, v in head_of.state_dict().items() if k.startswith(HEAD)})
    model.load_state_dict(state)
    return model.eval()


def new_head(body: Classifier, num_classes: int, seed: int, keep_rows: bool = False) -> Classifier:
    """A copy of ``body`` with a freshly initialised head of ``num_classes`` outputs (seeded);
    ``keep_rows`` copies the old head's rows into the first outputs (adding a class)."""
    torch.manual_seed(seed)
    model = build_model(replace(body.arch, num_classes=num_classes)).to(next(body.parameters()).device)
    state = {k: v for k, v in body.state_dict().items() if not k.startswith(HEAD)}
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(HEAD) for k in missing), missing
    if keep_rows:
        n = min(num_classes, body.arch.num_classes)
        with torch.no_grad():
            model.head.weight[:n] = body.head.weight[:n]
            model.head.bias[:n] = body.head.bias[:n]
    return model


def transfer(teacher: Classifier, task: Dataset, k: int, cfg: TrainConfig, *, seed: int, head_seed: int, device: torch.device,
             progress: bool = False, checkpoint: Path | None = None, desc: str = "student") -> tuple[Classifier, TrainHistory]:
    """The victim's transfer learning: the teacher's layers but its head, a new head for ``task``,
    trained on ``task.train`` with the first ``k`` layers frozen (``k = 0``: everything trains)."""
    student = new_head(teacher, task.spec.num_classes, head_seed)
    hist = train(student, task.train, task.spec, replace(cfg, trainable=f"after:{k}"), seed=seed, device=device, progress=progress, checkpoint=checkpoint, desc=desc)
    return student, hist


def pick(y: torch.Tensor, cls: int, n: int, seed: int) -> torch.Tensor:
    """``n`` indices of class ``cls`` in ``y``, drawn with ``seed`` (sorted)."""
    members = torch.nonzero(y.cpu() == cls).flatten()
    g = torch.Generator().manual_seed(seed)
    return members[torch.randperm(len(members), generator=g)[:n]].sort().values


__all__ = ["cap_per_class", "new_head", "pick", "task_data", "task_spec", "transfer", "with_head"]
