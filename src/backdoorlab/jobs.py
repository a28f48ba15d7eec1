"""Jobs behind the CLI and the experiment grid: validated up front, written to a run directory.

``TrainJob`` trains a clean model; ``AttackJob`` runs any registered attack and evaluates it the
same way for every method (clean accuracy, ASR, the same images on the clean model, a
parameter-change audit against the clean model, perturbation and image-quality metrics, a grid).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifacts import RunDir, load_model
from .data import DATASETS, load_dataset
from .data.core import to_uint8
from .errors import ConfigError, ModelFileError
from .models import MODELS
from .recipes import resolve_device, train_config
from .train.evaluate import accuracy, attack_success_rate, asr_mask, per_class_accuracy
from .train.trainer import TrainConfig, train
from .validate import build_params, check_apart, check_device, check_int, check_range


@dataclass
class TrainJob:
    dataset: str = "mnist5k"
    model: str = "digit-cnn"
    data_root: str | None = None
    width: float = 1.0
    seed: int = 0
    device: str = "auto"
    train: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        entry = DATASETS.get(self.dataset)
        MODELS.get(self.model)
        check_range("width", self.width, 0.0, 64.0, low_open=True)
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_device(self.device)
        if self.data_root is not None:
            if not (entry.needs_root or entry.default_root):
                raise ConfigError("data_root", f"{self.dataset!r} is embedded and reads no files; drop --data-root {self.data_root}")
            if not isinstance(self.data_root, str) or not Path(self.data_root).expanduser().is_dir():
                raise ConfigError("data_root", f"{self.data_root!r} is not a folder")
        if not isinstance(self.train, dict):
            raise ConfigError("train", f"expected a mapping of TrainConfig fields, got {self.train!r}")
        return train_config(self.dataset, self.model, self.overrides())

    def overrides(self) -> dict:
        """TrainConfig fields set on top of the dataset's and model's default recipe."""
        return self.train

    def config(self) -> dict:
        cfg = asdict(self)
        cfg["train"] = asdict(self.validate())
        return cfg


@dataclass
class AttackJob(TrainJob):
    attack: str = "badnets"
    params: dict = field(default_factory=dict)
    clean_model: str | None = None  # a clean model file to start from (else trained and cached)
    audit: bool = True
    cache_dir: str | None = None  # where work that depends only on the inputs may be shared between runs (e.g. MMLM's OT); not part of the config

    def overrides(self) -> dict:
        """The victim's recipe on top of the dataset's: the attack's defaults, then the user's."""
        from .attacks import ATTACKS

        return {**ATTACKS.get(self.attack).recipe_for(self.dataset), **self.train}

    def build(self) -> Any:
        """Validate everything without loading data: unknown names and bad values fail here."""
        from .attacks import ATTACKS

        cls = ATTACKS.get(self.attack)
        self.validate()
        spec = DATASETS.get(self.dataset).spec
        params = dict(self.params)
        params.setdefault("target", cls.default_target(spec))
        attack = cls(build_params(cls.Params, params, prefix="params."))
        try:
            attack.validate(spec.num_classes)
            attack.check_model(self.model, spec, self.width)
        except ConfigError as e:
            raise ConfigError("params." + e.field, str(e).split(": ", 1)[-1]) from None
        return attack

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("cache_dir")  # a cache only saves time: the same run with or without it
        cfg["params"] = asdict(self.build().p)
        return cfg


def run_train(job: TrainJob, out: str | Path, progress: bool = True, force: bool = False) -> dict:
    cfg = job.validate()
    run = RunDir(out)
    check_apart("out", out, {"data_root": job.data_root})
    if run.check(job.config(), force=force):
        return run.read_metrics()
    from .models import build_model

    t0 = time.perf_counter()
    # everything is loaded and checked before the folder is touched (--force empties it only then)
    data = load_dataset(job.dataset, job.data_root)
    device = resolve_device(job.device)
    torch.manual_seed(job.seed)
    model = build_model(job.model, data.spec, job.width).to(device)
    run.prepare(job.config(), force=force)
    hist = train(model, data.train, data.spec, cfg, seed=job.seed, device=device, eval_set=data.test, progress=progress, checkpoint=run.file("train.ckpt"))
    run.save_model(model)
    metrics = {
        "clean_accuracy": accuracy(model, data.test),
        "per_class_accuracy": per_class_accuracy(model, data.test, data.spec.num_classes),
        "train_seconds": hist.seconds,
        "images_per_second": hist.images_per_second,
        "history": hist.epochs,
        "device": str(device),
        "seconds": time.perf_counter() - t0,
    }
    run.write_metrics(metrics)
    run.file("train.ckpt").unlink(missing_ok=True)
    return metrics


def run_attack(job: AttackJob, out: str | Path, progress: bool = True, force: bool = False) -> dict:
    from .attacks.base import AttackContext
    from .metrics import image_quality, parameter_audit
    from .plots import clean_poison_grid

    attack = job.build()
    cfg = job.validate()
    run = RunDir(out)
    check_apart("out", out, {"data_root": job.data_root, "clean_model": job.clean_model})
    if run.check(job.config(), force=force):
        return run.read_metrics()
    t0 = time.perf_counter()
    # every input is loaded and checked before the folder is touched (--force empties it only then)
    data = load_dataset(job.dataset, job.data_root)
    try:
        attack.check_data(data)  # e.g. a poison rate the eligible samples cannot meet, a patch larger than the image
    except ConfigError as e:
        raise ConfigError("params." + e.field, str(e).split(": ", 1)[-1]) from None
    device = resolve_device(job.device)
    clean_path = Path(job.clean_model) if job.clean_model else run.file("clean_model.safetensors")
    if job.clean_model and not clean_path.is_file():
        raise ConfigError("clean_model", f"{clean_path} does not exist")
    try:
        clean = load_model(clean_path, arch=attack.clean_arch(job.model, data.spec, job.width), device=device) if job.clean_model else None
    except ModelFileError as e:
        raise ModelFileError(f"clean_model: {e}") from None
    run.prepare(job.config(), force=force)
    ctx = AttackContext(data, job.model, cfg, job.seed, device, job.width, progress, clean_path, run.path, Path(job.cache_dir) if job.cache_dir else None)
    if clean is not None:
        ctx._clean = clean
    res = attack.run(ctx)
    res.poisoned_test = to_uint8(res.poisoned_test)  # every ASR is measured on what is delivered: 8-bit images
    data = attack.evaluation_data(data)  # the task the attacked model serves (a transfer attack's student task)
    nc = data.spec.num_classes
    p = attack.p
    target = attack.evaluation_target()  # in the evaluated task's labels
    metrics: dict[str, Any] = {
        "attack": job.attack,
        "kind": attack.kind.value,
        "paper": attack.paper,
        "clean_accuracy": accuracy(res.model, data.test),
        "attack_success_rate": attack_success_rate(res.model, res.poisoned_test, res.test_labels, p.target_mode, target, nc),
    }
    clean_x = res.clean_test if res.clean_test is not None else data.test.x
    if job.audit or attack.kind.value in ("model-modification",) or getattr(p, "restrict", "none") != "none":
        clean = ctx.clean_model()
        metrics["clean_accuracy_before"] = accuracy(clean, data.test)
        metrics["attack_success_rate_clean_model"] = attack_success_rate(clean, res.poisoned_test, res.test_labels, p.target_mode, target, nc)
        if clean.arch == res.model.arch:
            metrics.update(parameter_audit(clean, res.model))
    metrics.update(image_quality(clean_x, res.poisoned_test))
    metrics["per_class_accuracy"] = per_class_accuracy(res.model, data.test, nc)
    metrics.update(res.metrics)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["device"] = str(device)
    run.save_model(res.model)
    tensors = dict(res.tensors)
    if res.trigger is not None:
        tensors.update({f"trigger.{k}": v for k, v in res.trigger.tensors().items()})
    if tensors:
        run.save_tensors("tensors.safetensors", tensors, {"trigger_kind": res.trigger.kind if res.trigger is not None else None})
    show = asr_mask(res.test_labels.cpu(), p.target_mode, target)
    sel = torch.nonzero(show).flatten()
    sel = sel[torch.linspace(0, len(sel) - 1, min(8, len(sel))).long()] if len(sel) else sel  # spread over the classes
    clean_poison_grid(clean_x[sel.to(clean_x.device)], res.poisoned_test[sel.to(res.poisoned_test.device)], run.file("samples.png"), title=f"{job.attack} on {job.dataset}")
    run.write_metrics(metrics)  # last: marks the run finished
    for ck in run.path.glob("*.ckpt"):
        ck.unlink()
    return metrics
