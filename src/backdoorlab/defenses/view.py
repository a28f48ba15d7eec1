"""The two halves of a defense run, built from an attack run directory by :func:`load_case`.

:class:`DefenderView` is what a defender holds, and all that a defense's decision code sees:

- the model under inspection: ``model.safetensors`` (the backdoored model) or, with
  ``model="clean"``, ``clean_model.safetensors`` (the clean model of the same seed: the control);
- **clean held-out data**: a fixed stratified fraction of the run's test split,
  ``heldout_fraction`` (default 0.2, our choice) drawn by :func:`stratified_indices` with
  ``heldout_seed`` (default 0), with its true labels (the defender labelled its own clean data);
- **the inputs presented at test time**: clean and poisoned evaluation images in one fixed shuffled
  order, unmarked (at most ``max_inputs`` of each, our choice 1,000, drawn with a fixed seed);
- **the data to inspect** (data-level defenses): the training set as delivered (poisoned samples
  unmarked, labels as delivered), rebuilt deterministically from the run's poison indices and
  trigger through the attack's own ``poison``; for an attack that leaves the training set clean
  (MMLM, a test-time attack), the presented inputs labelled as the inspected model predicts them;
  with ``inspect_poison_rate``, an attack that delivers no training set but has a trigger (WB, LIRA)
  is inspected on the training set with that share of its images (drawn among the images the ASR
  counts, with the defense seed) passed through the trigger and relabelled η(y).

:class:`GroundTruth` goes only to a defense's scoring step: the attack's target and label map,
which inspected samples and which presented inputs are poisoned, the evaluation images (the test
images not held out) and their poisoned versions (the trigger applied, or the attack's saved
``poisoned_test`` whose ``poisoned_test_index`` lie in the evaluation part), counted as for the
ASR (non-target source classes for all-to-one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..artifacts import load_model
from ..attacks.triggers import Trigger
from ..data import load_dataset
from ..data.core import Dataset, DatasetSpec, ImageSet, to_uint8
from ..data.subset import stratified_indices
from ..errors import ConfigError, ModelFileError
from ..models import Classifier, arch_for, build_model
from ..train.evaluate import accuracy, asr_mask, attack_success_rate, predict, target_labels
from ..validate import build_params, check_choice

MODEL_FILES = {"backdoored": "model.safetensors", "clean": "clean_model.safetensors"}


@dataclass
class DefenderView:
    """What a defender holds: the model, clean held-out data, the presented inputs, the inspected data."""

    model: Classifier
    spec: DatasetSpec
    heldout: ImageSet  # clean, correctly labelled
    inputs: Tensor  # uint8 test-time inputs, clean and poisoned, unmarked
    inspected: ImageSet  # the delivered training set, or the presented inputs with predicted labels
    inspected_source: str  # "training-set" | "test-inputs"
    device: torch.device
    seed: int = 0
    out: Path | None = None  # where plots go
    progress: bool = False
    cache_dir: Path | None = None  # where work that depends only on the defender's data may be shared between runs (MNTD's shadow set)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def copy_model(self) -> Classifier:
        m = build_model(self.model.arch).to(self.device)
        m.load_state_dict(self.model.state_dict())
        return m.eval()

    def plot_path(self, name: str) -> Path | None:
        return self.out / name if self.out is not None else None


@dataclass
class GroundTruth:
    """What only the scoring step sees: the attack's facts and the poison flags."""

    target: int
    target_mode: str
    num_classes: int
    evaluation: ImageSet  # clean test images not held out
    poisoned: Tensor  # uint8 poisoned versions of evaluation images that count for the ASR ...
    poisoned_labels: Tensor  # ... and their true labels
    inspected_poisoned: Tensor  # bool per inspected sample
    inputs_poisoned: Tensor  # bool per presented input
    trigger: Trigger | None = None  # the attacker's trigger (premise studies in benchmarks)

    def clean_accuracy(self, model: nn.Module) -> float:
        return accuracy(model, self.evaluation)

    def attack_success_rate(self, model: nn.Module) -> float:
        return attack_success_rate(model, self.poisoned, self.poisoned_labels, self.target_mode, self.target, self.num_classes)  # type: ignore[arg-type]

    def labels(self, y: Tensor) -> Tensor:
        """η(y), the attacker's label for true labels ``y``."""
        return target_labels(y, self.target_mode, self.target, self.num_classes)  # type: ignore[arg-type]

    def permuted(self, seed: int) -> "GroundTruth":
        """The same truth with the target and both poison flags shuffled (a test's counterfactual)."""
        g = torch.Generator().manual_seed(seed)
        shuffle = lambda t: t[torch.randperm(len(t), generator=g)]  # noqa: E731
        return replace(self, target=(self.target + 1 + int(torch.randint(self.num_classes - 1, (1,), generator=g))) % self.num_classes,
                       inspected_poisoned=shuffle(self.inspected_poisoned), inputs_poisoned=shuffle(self.inputs_poisoned))


def check_run(run: str | Path, model: str = "backdoored") -> Path:
    """Fail early (naming the field) unless ``run`` is a finished attack run holding the model."""
    check_choice("model", model, tuple(MODEL_FILES))
    path = Path(run)
    if not path.is_dir():
        raise ConfigError("run", f"{path} is not a directory")
    for name in ("config.json", "metrics.json"):
        if not (path / name).exists():
            raise ConfigError("run", f"{path} is not a finished attack run (no {name})")
    if not (path / MODEL_FILES[model]).exists():
        raise ConfigError("model", f"{path} has no {MODEL_FILES[model]} to inspect as the {model} model")
    cfg = json.loads((path / "config.json").read_text())
    if "attack" not in cfg or "params" not in cfg:
        raise ConfigError("run", f"{path} holds a {cfg.get('command', 'non-attack')} run, not an attack run")
    return path


def _json_or_text(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not path.exists():
        return {}, {}
    with safe_open(str(path), "pt") as f:
        meta = {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def limit(n: int, k: int | None, seed: int) -> Tensor:
    """At most ``k`` of ``n`` indices, drawn without replacement with a fixed seed (all when k is None)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def attack_of(cfg: dict) -> Any:
    """The attack a run's config names, rebuilt from its recorded parameters."""
    from ..attacks import ATTACKS

    try:
        acls = ATTACKS.get(cfg["attack"])
        return acls(build_params(acls.Params, cfg["params"]))
    except ConfigError as e:
        raise ConfigError("run", f"its config.json names an attack this toolkit cannot rebuild ({e}); was it made by another version?") from None


def delivered_training_set(data: Dataset, cfg: dict, trigger: Trigger | None, poison_indices: Tensor) -> ImageSet:
    """The training set as the attacker delivered it, rebuilt with the attack's own ``poison`` (so
    clean-label attacks keep their labels); an attack that is not a registered poisoning attack
    gets trigger + η(y) on the indices."""
    from ..attacks import ATTACKS
    from ..attacks.base import AttackContext, PoisoningAttack
    from ..train.trainer import TrainConfig

    if trigger is None:
        raise ConfigError("run", "the run has poison_indices but no trigger to rebuild the delivered training set")
    idx = poison_indices.long()
    name = cfg.get("attack")
    acls = ATTACKS.get(name) if name in ATTACKS else None
    if acls is not None and issubclass(acls, PoisoningAttack):
        attack = acls(build_params(acls.Params, cfg["params"]))
        actx = AttackContext(data, cfg.get("model", ""), TrainConfig(epochs=0), int(cfg.get("seed", 0)), torch.device("cpu"), progress=False)
        return attack.poison(actx, trigger.cpu(), idx)
    params = cfg["params"]
    x, y = data.train.x.clone(), data.train.y.clone()
    x[idx] = trigger.cpu().deliver(x[idx])
    y[idx] = target_labels(y[idx], params.get("target_mode", "all-to-one"), int(params.get("target", data.spec.default_target)), data.spec.num_classes)
    return ImageSet(x, y)


def load_case(
    run: str | Path,
    model: str = "backdoored",
    heldout_fraction: float = 0.2,
    heldout_seed: int = 0,
    max_inputs: int = 1000,
    device: torch.device | str = "cpu",
    out: Path | None = None,
    seed: int = 0,
    progress: bool = False,
    inspect_poison_rate: float | None = None,
) -> tuple[DefenderView, GroundTruth]:
    """Build the defender's view and the ground truth of one attack run (see the module docstring)."""
    path = check_run(run, model)
    cfg = json.loads((path / "config.json").read_text())
    device = torch.device(device)
    attack = attack_of(cfg)
    data = attack.evaluation_data(load_dataset(cfg["dataset"], cfg.get("data_root")))
    try:  # the model file must be what the run says it is
        net = load_model(path / MODEL_FILES[model], arch=arch_for(cfg["model"], data.spec, float(cfg.get("width", 1.0))), device=device)
    except ModelFileError as e:
        raise ModelFileError(f"run: {e}") from None
    test, spec = data.test, data.spec
    params = cfg["params"]
    target, mode = int(attack.evaluation_target()), str(params.get("target_mode", "all-to-one"))
    n_hold = max(1, min(len(test) - 1, round(heldout_fraction * len(test))))
    hold = stratified_indices(test.y, n_hold, heldout_seed)
    rest = torch.ones(len(test), dtype=torch.bool)
    rest[hold] = False
    eval_idx = torch.nonzero(rest).flatten()
    tensors, meta = read_tensors(path / "tensors.safetensors")
    trig = {k[len("trigger."):]: v for k, v in tensors.items() if k.startswith("trigger.")}
    trigger = Trigger.from_tensors(meta["trigger_kind"], trig).to(device) if trig and meta.get("trigger_kind") else None
    if "poisoned_test" in tensors:
        px = to_uint8(tensors["poisoned_test"])
        pidx = tensors.get("poisoned_test_index", torch.arange(len(px))).long()
    elif trigger is not None:  # delivered as its attack delivers them (an L∞-bounded trigger rounds inside its ball)
        px = torch.cat([trigger.deliver(test.x[s : s + 1024].to(device)).cpu() for s in range(0, len(test), 1024)])
        pidx = torch.arange(len(test))
    else:
        raise ConfigError("run", f"{path} holds neither a trigger nor poisoned_test images in tensors.safetensors")
    py = test.y[pidx]
    keep = torch.isin(pidx, eval_idx) & asr_mask(py, mode, target)  # type: ignore[arg-type]
    px, py = px[keep], py[keep]
    # the presented inputs: at most max_inputs clean and max_inputs poisoned, in one fixed shuffled order
    k = max_inputs or None
    clean_x = test.x[eval_idx[limit(len(eval_idx), k, seed)]]
    pois_x = px[limit(len(px), k, seed + 1)]
    order = torch.randperm(len(clean_x) + len(pois_x), generator=torch.Generator().manual_seed(seed + 2))
    inputs = torch.cat([clean_x, pois_x])[order]
    inputs_poisoned = torch.cat([torch.zeros(len(clean_x), dtype=torch.bool), torch.ones(len(pois_x), dtype=torch.bool)])[order]
    poison_indices = tensors.get("poison_indices")
    if poison_indices is not None and inspect_poison_rate is not None:
        raise ConfigError("inspect_poison_rate", f"{path} delivered its own poisoned training set: it is inspected as delivered")
    if poison_indices is None and inspect_poison_rate is not None:
        if trigger is None:
            raise ConfigError("inspect_poison_rate", f"{path} holds no trigger to poison a training set with")
        eligible = torch.nonzero(asr_mask(data.train.y, mode, target)).flatten()  # type: ignore[arg-type]
        n = max(1, round(inspect_poison_rate * len(data.train)))
        poison_indices = eligible[limit(len(eligible), n, seed + 3)]
    if poison_indices is not None:
        inspected = delivered_training_set(data, cfg, trigger, poison_indices)
        inspected_poisoned = torch.zeros(len(data.train), dtype=torch.bool)
        inspected_poisoned[poison_indices.long()] = True
        source = "training-set"
    else:
        inspected = ImageSet(inputs, predict(net, inputs))
        inspected_poisoned, source = inputs_poisoned, "test-inputs"
    view = DefenderView(net, spec, test.subset(hold), inputs, inspected, source, device, seed, out, progress)
    truth = GroundTruth(target, mode, spec.num_classes, test.subset(eval_idx), px, py, inspected_poisoned, inputs_poisoned, trigger)
    return view, truth
