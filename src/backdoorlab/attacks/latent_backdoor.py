"""Latent Backdoor (Yao, Li, Zheng and Zhao 2019, "Latent Backdoor Attacks on Deep Neural Networks",
CCS; shared/papers/latent-backdoor-teacher-student.txt): a backdoor planted in a *teacher* model for
a class the teacher does not have, which a victim's ordinary transfer learning turns into a live
backdoor of the *student*.

The whole workflow runs as visible stages, each with its own files under ``RUN/stages/`` (a model
or tensors, and ``NAME.json`` with its figures and seconds); a stage whose files exist is read back
instead of redone, so an interrupted run resumes at the stage it was in (and inside a training
stage at its last epoch, through the trainer's checkpoint):

1. ``1-teacher``: a clean model on the teacher task (``teacher_classes``), or the given
   ``--clean-model`` (a model of the teacher task).
2. ``2-adjusted`` / ``2-trigger``: the attacker adds the target class (``target``, a class of the
   student task that the teacher lacks) as a new output and retrains on the teacher's training data
   plus ``target_images`` images of the target (paper step 1), then optimises the trigger: a mask
   (a bottom-right square of side ``trigger_size``·width, ``trigger_margin`` px from the border:
   about 4% of the image) and a pattern in tanh space, Adam (lr 0.1, betas 0.5/0.9), minimising the
   MSE between the layer-``kt`` features of triggered images and of randomly paired target images
   (eq. 2). ``trigger="random"`` skips the optimisation (the paper's control, Figure 5).
3. ``3-injected``: the adjusted model retrained on CE + ``feature_weight``·MSE(F^kt(x + trigger), φ)
   (eq. 4), φ the mean layer-``kt`` features of the target images under the present weights
   (eq. 3), computed in every step (the gradient flows through it too).
4. ``4-infected-teacher``: the trace is wiped: the added output goes, and the head is the
   original teacher's, bit for bit.
5. ``5-student`` / ``5-clean-student``: the victim's transfer learning (:func:`transfer`): the
   teacher's layers but its head, a new head for the student task (``student_classes``, which
   holds the target), the first ``k`` layers frozen, trained on clean student data only (the
   attacker's target images are not in it, as in the paper). The same from the clean teacher, with
   the same seeds, is the control; it is also the run's ``clean_model.safetensors``.
6. ``6-evaluation``: accuracy of both students on the student test set; ASR (triggered non-target
   student test images classified as the target) on both; and the paper's X_eval ASR (triggered
   images of the teacher's test set, the attacker's own source) on both.

The run's model is the student, evaluated on the student task (:meth:`evaluation_data`, classes
renumbered in the order of ``student_classes``); ``target`` names the class in the dataset's labels.

Facts from the official code (shared/notes/algorithms.md): mask, tanh pattern, Adam settings, MSE,
the head restored, Digit: teacher MNIST 0-4, student 5-9, Kt = K = 3 (the layers before
the head of the Digit CNN). Our choices (all parameters): λ = ``feature_weight`` = 2 (the official code's 0.05 left the
layer-Kt distance of triggered images at 0.24, the teacher-side ASR at 1.6% and the student's at
5.5% after 10 injection epochs on MNIST-5k, docs/results.md §10; the attacker picks λ on its own
data: the injected model's teacher-side ASR on X_eval), the number of optimisation steps and
their batch, the epochs of the retraining with the target class (``adjust_epochs``) and of the
injection (``inject_epochs``, at the run's learning rate unless ``inject_lr``), the target images
replicated to the mean class size in the attacker's training set (class balance), the pattern
stored at 8-bit levels (training and delivered images agree), φ recomputed per step,
``image_seed`` fixing which target images the attacker holds, ``train_per_class`` capping every
task's training set (Fashion-MNIST on a CPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..artifacts import dump_json, load_model, save_model, write_safetensors
from ..data.core import Dataset, DatasetSpec, ImageSet, to_float, to_uint8
from ..errors import ConfigError
from ..models import Classifier, arch_for, build_model
from ..train.evaluate import accuracy, attack_success_rate, batched
from ..train.trainer import Forward, TrainHooks, train
from ..validate import check_choice, check_class, check_int, check_positive, check_range
from .base import ATTACKS, AttackContext, AttackParams, AttackResult, TransferAttack, derived_seed
from .transfer import new_head, pick, task_data, transfer, with_head
from .triggers import MaskPatternTrigger, place_patch


@dataclass
class LatentBackdoorParams(AttackParams):
    target: int = 9  # in the dataset's labels: a class of the student task, absent from the teacher's
    teacher_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    student_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    kt: int = 3  # the layer whose output the trigger is matched at (the paper's Kt)
    k: int = 3  # the layers the student freezes (the paper's K); k < kt tunes layers the backdoor lives in
    target_images: int = 45  # target-class images the attacker holds (paper, Digit: 45; single image: 1)
    image_seed: int = 0  # which target images the attacker holds
    trigger: Literal["optimized", "random"] = "optimized"
    trigger_size: float = 0.2  # side of the square mask as a fraction of the width
    trigger_margin: int = 1
    trigger_steps: int = 200  # (choice)
    trigger_batch_size: int = 128  # (choice)
    trigger_lr: float = 0.1
    adjust_epochs: int = 4  # (choice) retraining with the target class added (paper step 1)
    inject_epochs: int = 10  # (choice)
    inject_lr: float | None = None  # (choice) None: the run's learning rate
    feature_weight: float = 2.0  # λ (choice: the official code's 0.05 left the features unmatched in 10 epochs here)
    student_epochs: int | None = None  # None: the run's training recipe
    train_per_class: int = 0  # (choice) cap on every task's training images per class (0: all)

    def validate(self, num_classes: int) -> None:
        if self.target_mode != "all-to-one":
            raise ConfigError("target_mode", "the latent backdoor has one target class (all-to-one)")
        for name in ("teacher_classes", "student_classes"):
            classes = getattr(self, name)
            if not classes:
                raise ConfigError(name, "the split leaves this task empty: name at least one class")
            for c in classes:
                check_class(name, c, num_classes)
            if len(set(classes)) != len(classes):
                raise ConfigError(name, f"names a class twice: {list(classes)}")
        check_class("target", self.target, num_classes)
        if self.target in self.teacher_classes:
            raise ConfigError("target", f"class {self.target} is in the teacher task {list(self.teacher_classes)}: the latent backdoor targets a class the teacher does not have")
        if self.target not in self.student_classes:
            raise ConfigError("target", f"class {self.target} is not in the student task {list(self.student_classes)}")
        if len(self.student_classes) < 2:
            raise ConfigError("student_classes", "the student task needs the target and at least one other class")
        check_int("kt", self.kt, 1)
        check_int("k", self.k, 0)
        check_int("target_images", self.target_images, 1)
        check_int("image_seed", self.image_seed, 0)
        check_choice("trigger", self.trigger, ("optimized", "random"))
        check_range("trigger_size", self.trigger_size, 0.0, 1.0, low_open=True)
        check_int("trigger_margin", self.trigger_margin, 0)
        check_int("trigger_steps", self.trigger_steps, 0)
        check_int("trigger_batch_size", self.trigger_batch_size, 1)
        check_positive("trigger_lr", self.trigger_lr)
        check_int("adjust_epochs", self.adjust_epochs, 0)
        check_int("inject_epochs", self.inject_epochs, 0)
        if self.inject_lr is not None:
            check_range("inject_lr", self.inject_lr, 0.0, 100.0, low_open=True)
        check_range("feature_weight", self.feature_weight, 0.0, 1e6)
        if self.student_epochs is not None:
            check_int("student_epochs", self.student_epochs, 1)
        check_int("train_per_class", self.train_per_class, 0)


class FeatureMatching(TrainHooks):
    """The injection loss (eq. 4): cross-entropy on the clean batch plus ``weight``·MSE between the
    layer-``kt`` output of the triggered batch and φ, the mean layer-``kt`` output of the target
    images under the present weights (eq. 3). Clean and triggered images go through the first
    ``kt`` layers as one batch. φ is a function of the weights like the triggered features, and
    the gradient flows through both (held constant, a step can move φ away faster than it moves
    the triggered features towards it). Every layer trains (the injection has no frozen prefix)."""

    def __init__(self, trigger: MaskPatternTrigger, kt: int, target_x: Tensor, weight: float) -> None:
        self.trigger, self.kt, self.target_x, self.weight = trigger, kt, target_x, weight
        self._dist: list[Tensor] = []

    def loss(self, model: Classifier, x: Tensor, y: Tensor, idx: Tensor, forward: Forward) -> tuple[Tensor, Tensor]:
        n = len(y)
        h = model.forward_to(torch.cat([x, self.trigger(x)]), self.kt)
        out = model.forward_from(h[:n], self.kt).float()
        phi = model.forward_to(self.target_x, self.kt).float().mean(0, keepdim=True)  # φθ: a function of θ
        dist = (h[n:].float() - phi).pow(2).flatten(1).mean()
        self._dist.append(dist.detach())
        return F.cross_entropy(out, y) + self.weight * dist, out

    def end_epoch(self, model: Classifier, epoch: int, record: dict) -> None:
        record["feature_distance"] = float(torch.stack(self._dist).mean()) if self._dist else float("nan")
        self._dist = []


class Stages:
    """The attack's stages on disk: ``stages/NAME.safetensors`` (a model or tensors) and
    ``stages/NAME.json`` (its figures and seconds). ``get`` reads a finished stage back, or runs it
    and writes both (the JSON last: it marks the stage finished). Without a work folder nothing is
    written."""

    def __init__(self, workdir: Path | None, device: torch.device) -> None:
        self.root = workdir / "stages" if workdir is not None else None
        self.device = device
        self.info: dict[str, dict] = {}
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path | None:
        return self.root / name if self.root is not None else None

    def get(self, name: str, make: Callable[[], tuple[Any, dict]], kind: Literal["model", "tensors"] = "model") -> Any:
        from safetensors.torch import load_file

        js, st = self.file(f"{name}.json"), self.file(f"{name}.safetensors")
        if js is not None and st is not None and js.exists() and st.exists():
            self.info[name] = json.loads(js.read_text())
            if kind == "model":
                return load_model(st, device=self.device)
            return {k: v.to(self.device) for k, v in load_file(str(st)).items()}
        t0 = time.perf_counter()
        obj, info = make()
        info["seconds"] = time.perf_counter() - t0
        self.info[name] = info
        if st is not None and js is not None:
            save_model(obj, st) if kind == "model" else write_safetensors(st, obj)
            js.write_text(dump_json(info))
        return obj


def attacker_set(teacher_train: ImageSet, x_target: Tensor) -> ImageSet:
    """The attacker's training set of the adjusted task: the teacher's data (the non-target data)
    and the target images as the new last class, replicated to the mean class size."""
    t = int(teacher_train.y.max()) + 1
    reps = max(1, round(len(teacher_train) / t / len(x_target)))
    x = torch.cat([teacher_train.x, x_target.to(teacher_train.x.device).repeat(reps, 1, 1, 1)])
    y = torch.cat([teacher_train.y, torch.full((reps * len(x_target),), t, dtype=torch.long, device=teacher_train.y.device)])
    return ImageSet(x, y)


def trigger_mask(shape: tuple[int, int, int], size: float, margin: int) -> Tensor:
    """The binary (1, H, W) mask: a bottom-right square of side round(size·W), ``margin`` px in."""
    side = max(1, round(size * shape[2]))
    return place_patch(shape, torch.zeros(1, side, side), "bottom-right", margin).mask


def optimise_pattern(model: Classifier, kt: int, mask: Tensor, pool: Tensor, x_target: Tensor, steps: int, batch_size: int, lr: float,
                     seed: int, device: torch.device) -> tuple[Tensor, dict]:
    """The trigger pattern (eq. 2): Adam in tanh space on the MSE between the layer-``kt`` features
    of triggered ``pool`` images and of randomly paired target images; the model is not changed.
    Returns the pattern (C, H, W) at 8-bit levels and the mean feature distance before/after."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = pool.shape[1:]
    was = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    ft = batched(lambda x: model.forward_to(x, kt), model, x_target).to(device)
    probe_i = torch.randint(len(pool), (min(512, len(pool)),), generator=g)
    probe_j = torch.randint(len(ft), (len(probe_i),), generator=g).to(device)
    probe = to_float(pool[probe_i].to(device))

    def distance(pattern: Tensor) -> float:
        with torch.no_grad():
            f = model.forward_to(MaskPatternTrigger(mask, pattern).apply(probe), kt).float()
            return float((f - ft[probe_j]).pow(2).flatten(1).mean())

    wt = (torch.rand(c, h, w, generator=g) * 2 - 1).to(device).requires_grad_(True)
    start = distance((torch.tanh(wt.detach()) + 1) / 2)
    opt = torch.optim.Adam([wt], lr=lr, betas=(0.5, 0.9))
    m = mask.to(device)
    for _ in range(steps):
        i = torch.randint(len(pool), (batch_size,), generator=g)
        j = torch.randint(len(ft), (batch_size,), generator=g).to(device)
        xb = MaskPatternTrigger(m, (torch.tanh(wt) + 1) / 2).apply(to_float(pool[i].to(device)))
        loss = (model.forward_to(xb, kt).float() - ft[j]).pow(2).flatten(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p, r in zip(model.parameters(), was):
        p.requires_grad_(r)
    pattern = to_float(to_uint8((torch.tanh(wt.detach()) + 1) / 2)) * m
    return pattern, {"feature_mse_start": start, "feature_mse": distance(pattern)}


@ATTACKS.register("latent-backdoor")
class LatentBackdoor(TransferAttack):
    name = "latent-backdoor"
    paper = "Yao, Li, Zheng and Zhao, Latent Backdoor Attacks on Deep Neural Networks (CCS 2019)"
    Params = LatentBackdoorParams
    p: LatentBackdoorParams

    @classmethod
    def default_target(cls, spec: DatasetSpec) -> int:
        return min(LatentBackdoorParams.target, spec.num_classes - 1)

    def evaluation_target(self) -> int:
        return list(self.p.student_classes).index(self.p.target)

    def _layers(self, model: str, spec: DatasetSpec, width: float) -> list[str]:
        return build_model(arch_for(model, self._teacher_spec(spec), width)).stage_names[:-1]

    def check_model(self, model: str, spec: DatasetSpec, width: float) -> None:
        layers = self._layers(model, spec, width)
        for name in ("kt", "k"):
            v = getattr(self.p, name)
            if v > len(layers):
                raise ConfigError(name, f"layer {v} is beyond the {len(layers)} layers of {model} before its head ({', '.join(layers)})")

    def _teacher_spec(self, spec: DatasetSpec) -> DatasetSpec:
        return replace(spec, num_classes=len(self.p.teacher_classes))

    def clean_arch(self, model: str, spec: DatasetSpec, width: float):
        """A given clean model is a teacher: a model of the teacher task."""
        return arch_for(model, self._teacher_spec(spec), width)

    def tasks(self, data: Dataset) -> tuple[Dataset, Dataset, Tensor]:
        """The teacher task, the student task (without the attacker's target images) and those images."""
        p = self.p
        teacher = task_data(data, p.teacher_classes, ":teacher", 0, p.train_per_class)
        student = task_data(data, p.student_classes, ":student", self.evaluation_target(), p.train_per_class)
        t = self.evaluation_target()
        held = pick(student.train.y, t, p.target_images, p.image_seed).to(student.train.y.device)
        rest = torch.ones(len(student.train), dtype=torch.bool, device=student.train.y.device)
        rest[held] = False
        x_target = student.train.x[held]
        return teacher, student.with_train(student.train.subset(torch.nonzero(rest).flatten())), x_target

    def evaluation_data(self, data: Dataset) -> Dataset:
        return self.tasks(data)[1]

    def check_data(self, data: Dataset) -> None:
        p = self.p
        c, h, w = data.spec.shape
        side = max(1, round(p.trigger_size * w))
        if side + p.trigger_margin > min(h, w):
            raise ConfigError("trigger_size", f"a {side}x{side} square {p.trigger_margin} px from the border does not fit a {h}x{w} image")
        for name in ("teacher_classes", "student_classes"):
            for split in ("train", "test"):
                y = getattr(data, split).y.cpu()
                empty = [cl for cl in getattr(p, name) if not bool((y == cl).any())]
                if empty:
                    raise ConfigError(name, f"classes {empty} have no {split} images in {data.spec.name}: the split leaves the task without them")
        have = int((data.train.y.cpu() == p.target).sum())
        if p.train_per_class:
            have = min(have, p.train_per_class)
        if p.target_images >= have:
            raise ConfigError("target_images", f"{p.target_images} of the {have} training images of class {p.target} leave none for the student")

    # ------------------------------------------------------------------ the stages

    def run(self, ctx: AttackContext) -> AttackResult:
        p, dev, seed = self.p, ctx.device, ctx.seed
        teacher_task, student_task, x_target = self.tasks(ctx.data)
        x_target = x_target.to(dev)
        given = ctx._clean  # a given clean teacher (--clean-model)
        st = Stages(ctx.workdir, dev)
        cfg = replace(ctx.train_cfg, trainable="all")
        T = teacher_task.spec.num_classes

        def teacher_stage() -> tuple[Classifier, dict]:
            if given is not None:
                return given, {"source": "given", "accuracy": accuracy(given, teacher_task.test)}
            torch.manual_seed(seed)
            m = build_model(arch_for(ctx.model_name, teacher_task.spec, ctx.width)).to(dev)
            hist = train(m, teacher_task.train, teacher_task.spec, cfg, seed=seed, device=dev, progress=ctx.progress, checkpoint=ctx.checkpoint("teacher"), desc="1/6 teacher")
            return m, {"source": "trained", "accuracy": accuracy(m, teacher_task.test), "train_seconds": hist.seconds}

        teacher = st.get("1-teacher", teacher_stage)
        adj_set = attacker_set(teacher_task.train, x_target)
        adj_spec = replace(teacher_task.spec, num_classes=T + 1, class_names=(*teacher_task.spec.class_names, ctx.data.spec.class_names[p.target]))

        def adjusted_stage() -> tuple[Classifier, dict]:
            m = new_head(teacher, T + 1, derived_seed(seed, "target-head"), keep_rows=True)
            if p.adjust_epochs:
                train(m, adj_set, adj_spec, replace(cfg, epochs=p.adjust_epochs), seed=derived_seed(seed, "adjust"), device=dev, progress=ctx.progress, checkpoint=ctx.checkpoint("adjusted"), desc="2/6 add the target class")
            return m, {"accuracy_teacher_task": accuracy(m, teacher_task.test), "target_accuracy": accuracy(m, ImageSet(x_target, torch.full((len(x_target),), T, device=x_target.device))),
                       "attacker_set_size": len(adj_set), "target_images": len(x_target)}

        adjusted = st.get("2-adjusted", adjusted_stage)
        mask = trigger_mask(ctx.data.spec.shape, p.trigger_size, p.trigger_margin).to(dev)

        def trigger_stage() -> tuple[dict, dict]:
            if p.trigger == "random":
                g = torch.Generator().manual_seed(derived_seed(seed, "random-trigger"))
                pattern = to_float(to_uint8(torch.rand(ctx.data.spec.shape, generator=g))).to(dev) * mask
                info = {"kind": "random"}
            else:
                pattern, info = optimise_pattern(adjusted, p.kt, mask, adj_set.x, x_target, p.trigger_steps, p.trigger_batch_size, p.trigger_lr, derived_seed(seed, "trigger"), dev)
                info["kind"] = "optimized"
            info["mask_fraction"] = float(mask.mean())
            return {"mask": mask, "pattern": pattern}, info

        tt = st.get("2-trigger", trigger_stage, kind="tensors")
        trigger = MaskPatternTrigger(tt["mask"], tt["pattern"]).to(dev)
        x_eval = teacher_task.test  # the paper's X_eval: images of the attacker's own source

        def inject_stage() -> tuple[Classifier, dict]:
            m = build_model(adjusted.arch).to(dev)
            m.load_state_dict(adjusted.state_dict())
            hooks = FeatureMatching(trigger, p.kt, to_float(x_target), p.feature_weight)
            icfg = replace(cfg, epochs=p.inject_epochs, lr=p.inject_lr if p.inject_lr is not None else cfg.lr)
            hist = train(m, adj_set, adj_spec, icfg, seed=derived_seed(seed, "inject"), device=dev, hooks=hooks, progress=ctx.progress, checkpoint=ctx.checkpoint("injected"), desc="3/6 injection")
            trig = to_uint8(trigger(to_float(x_eval.x.to(dev))))
            return m, {"accuracy_teacher_task": accuracy(m, x_eval), "teacher_side_asr": attack_success_rate(m, trig, torch.zeros_like(x_eval.y), "all-to-one", T, T + 1),
                       "feature_distance": [e.get("feature_distance") for e in hist.epochs]}

        injected = st.get("3-injected", inject_stage)

        def wipe_stage() -> tuple[Classifier, dict]:
            m = with_head(injected, teacher)
            restored = all(torch.equal(a, b) for a, b in zip(m.head.state_dict().values(), teacher.head.state_dict().values()))
            return m, {"head_restored_exactly": restored, "accuracy": accuracy(m, teacher_task.test), "teacher_accuracy": accuracy(teacher, teacher_task.test)}

        infected = st.get("4-infected-teacher", wipe_stage)
        scfg = replace(cfg, epochs=p.student_epochs) if p.student_epochs is not None else cfg

        def student_stage(source: Classifier, tag: str) -> Callable[[], tuple[Classifier, dict]]:
            def make() -> tuple[Classifier, dict]:
                m, hist = transfer(source, student_task, p.k, scfg, seed=derived_seed(seed, "student"), head_seed=derived_seed(seed, "student-head"),
                                   device=dev, progress=ctx.progress, checkpoint=ctx.checkpoint(tag), desc=f"5/6 {tag}")
                frozen = m.stage_names[: p.k]
                same = all(torch.equal(a, b) for n in frozen for a, b in zip(m.stages[n].state_dict().values(), source.stages[n].state_dict().values()))
                return m, {"accuracy": accuracy(m, student_task.test), "frozen_layers": frozen, "frozen_layers_unchanged": same, "train_seconds": hist.seconds}
            return make

        student = st.get("5-student", student_stage(infected, "student"))
        clean_student = st.get("5-clean-student", student_stage(teacher, "clean-student"))

        # 6: evaluation (the job adds accuracy and ASR on the student test set beside these)
        t = self.evaluation_target()
        test = student_task.test
        poisoned = to_uint8(trigger(to_float(test.x.to(dev))))
        eval_trig = to_uint8(trigger(to_float(x_eval.x.to(dev))))
        nc = student_task.spec.num_classes

        def asr_eval(m: Classifier) -> float:  # X_eval images belong to no student class: all count
            return float((batched(m, m, eval_trig).argmax(1) == t).float().mean())

        evaluation = {
            "student_accuracy": accuracy(student, test), "attack_success_rate_student": attack_success_rate(student, poisoned, test.y, "all-to-one", t, nc),
            "attack_success_rate_xeval": asr_eval(student),
            "clean_teacher_student_accuracy": accuracy(clean_student, test),
            "clean_teacher_student_asr": attack_success_rate(clean_student, poisoned, test.y, "all-to-one", t, nc),
            "clean_teacher_student_asr_xeval": asr_eval(clean_student),
        }
        if st.root is not None:
            (st.root / "6-evaluation.json").write_text(dump_json(evaluation))
            save_model(clean_student, ctx.workdir / "clean_model.safetensors")  # the control the defenses inspect with --model clean
            self._figures(st.root, ctx.data, x_eval.x[:8], eval_trig[:8], tt)
        ctx._clean = clean_student  # the job's clean-model metrics are the clean-teacher student's
        metrics = {**evaluation, "stages": st.info, "k": p.k, "kt": p.kt, "target_images": len(x_target), "trigger_kind": p.trigger,
                   "teacher_accuracy": st.info["1-teacher"]["accuracy"], "infected_teacher_accuracy": st.info["4-infected-teacher"]["accuracy"],
                   "head_restored_exactly": st.info["4-infected-teacher"]["head_restored_exactly"],
                   "frozen_layers_unchanged": st.info["5-student"]["frozen_layers_unchanged"],
                   "student_task": list(p.student_classes), "teacher_task": list(p.teacher_classes), "target_student_label": t}
        return AttackResult(student, poisoned, test.y, trigger.cpu(), {"target_images": x_target.cpu()}, metrics)

    @staticmethod
    def _figures(root: Path, data: Dataset, clean: Tensor, triggered: Tensor, tt: dict) -> None:
        from ..plots import clean_poison_grid, image_grid

        clean_poison_grid(clean, triggered, root / "2-trigger.png", title="latent backdoor trigger on X_eval images")
        image_grid([tt["mask"].expand_as(tt["pattern"])[None].cpu(), tt["pattern"][None].cpu()], ["mask", "pattern"], root / "2-trigger-pattern.png", n=1)
