import pytest
import torch
from torch import nn

from backdoorlab.data import by_count
from backdoorlab.errors import ConfigError
from backdoorlab.models import Arch, build_model
from backdoorlab.train import TrainConfig, accuracy, attack_success_rate, target_labels, train
from backdoorlab.train.evaluate import per_class_accuracy
from backdoorlab.train.trainer import TrainHooks

FAST = dict(epochs=2, batch_size=64, lr=0.05)


def _model(spec, name="digit-cnn", width=0.25, seed=0):
    torch.manual_seed(seed)
    return build_model(Arch(name, spec.shape[0], spec.num_classes, spec.shape[1:], width))


def test_learns_mnist5k(mnist5k):
    m = _model(mnist5k.spec, width=1.0)
    hist = train(m, mnist5k.train, mnist5k.spec, TrainConfig(epochs=3, lr=0.05), progress=False)
    assert len(hist.epochs) == 3 and hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    assert accuracy(m, mnist5k.test) > 0.9
    assert len(per_class_accuracy(m, mnist5k.test, 10)) == 10


def test_same_seed_repeats_exactly(digits):
    a, b = _model(digits.spec), _model(digits.spec)
    for m in (a, b):
        train(m, digits.train, digits.spec, TrainConfig(**FAST), seed=5, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["digit-cnn", "resnet18"])
def test_head_only_leaves_everything_else_bitwise(digits, name):
    small = by_count(digits.train, 200)
    m = _model(digits.spec, name, 0.125)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, small, digits.spec, TrainConfig(epochs=1, batch_size=50, trainable="head"), progress=False)
    after = m.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("stages.head.") for k in changed)  # batch-norm buffers included


def test_after_k_freezes_the_first_k_stages(digits):
    m = _model(digits.spec)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, by_count(digits.train, 200), digits.spec, TrainConfig(epochs=1, trainable="after:2"), progress=False)
    changed = {k.split(".")[1] for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"fc1", "head"}


def test_resume_after_interruption_matches_uninterrupted(digits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05)
    ref = _model(digits.spec)
    train(ref, digits.train, digits.spec, cfg, seed=1, progress=False)

    calls = {"n": 0}
    steps_per_epoch = -(-len(digits.train) // 64)

    class Crash(TrainHooks):
        def batch(self, x, y, idx):
            calls["n"] += 1
            if calls["n"] == 2 * steps_per_epoch + 1:  # first batch of the third epoch
                raise KeyboardInterrupt
            return x, y

    m = _model(digits.spec)
    ck = tmp_path / "c.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(m, digits.train, digits.spec, cfg, seed=1, progress=False, hooks=Crash(), checkpoint=ck)
    resumed = _model(digits.spec, seed=99)  # weights come from the checkpoint, not from the init
    hist = train(resumed, digits.train, digits.spec, cfg, seed=1, progress=False, checkpoint=ck)
    assert [e["epoch"] for e in hist.epochs] == [1, 2, 3]
    assert all(torch.allclose(x, y) for x, y in zip(ref.state_dict().values(), resumed.state_dict().values()))


def test_train_config_validation():
    with pytest.raises(ConfigError, match="trainable"):
        TrainConfig(trainable="some")
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0)


class Const(nn.Module):
    def __init__(self, label, n=10):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.label, self.n = label, n

    def forward(self, x):
        out = torch.zeros(len(x), self.n)
        out[:, self.label] = 1
        return out + 0 * self.w


def test_attack_success_rate_counting():
    y = torch.tensor([0, 0, 1, 2, 3, 9])
    x = torch.rand(6, 1, 4, 4)
    # all-to-one: images whose true class is the target do not count
    assert attack_success_rate(Const(0), x, y, "all-to-one", 0, 10) == 1.0
    assert attack_success_rate(Const(1), x, y, "all-to-one", 0, 10) == 0.0
    # all-to-all: target (y + 1) mod C over every image
    assert torch.equal(target_labels(y, "all-to-all", 0, 10), torch.tensor([1, 1, 2, 3, 4, 0]))
    assert attack_success_rate(Const(1), x, y, "all-to-all", 0, 10) == pytest.approx(2 / 6)  # indices 0 and 1 have η(y) = 1
    with pytest.raises(ConfigError, match="target"):
        target_labels(y, "all-to-one", 10, 10)


class LearnedShift(TrainHooks):
    """A toy of what WB needs: a second optimiser (an additive trigger δ) updated before every
    classifier step from a loss on features and logits, a classifier loss on clean and shifted
    images, a per-epoch record entry, and state that travels in the checkpoint."""

    def __init__(self, shape, crash_at=None):
        self.delta = torch.zeros(shape, requires_grad=True)
        self.opt = torch.optim.Adam([self.delta], lr=0.05)
        self.steps, self.crash_at, self.feature_shapes = 0, crash_at, set()

    def before_step(self, model, x, y, idx, forward):
        if self.crash_at is not None and self.steps == self.crash_at:
            raise KeyboardInterrupt
        self.steps += 1
        logits, feats = forward.with_features((x + self.delta).clamp(0, 1))
        self.feature_shapes.add(tuple(feats.shape[1:]))
        loss = nn.functional.cross_entropy(logits, torch.zeros_like(y)) + 1e-3 * feats.pow(2).mean()
        (g,) = torch.autograd.grad(loss, self.delta)  # only δ moves here
        self.opt.zero_grad(set_to_none=True)
        self.delta.grad = g
        self.opt.step()

    def loss(self, model, x, y, idx, forward):
        out = forward(x)
        shifted = forward((x + self.delta.detach()).clamp(0, 1))
        return nn.functional.cross_entropy(out, y) + nn.functional.cross_entropy(shifted, torch.zeros_like(y)), out

    def end_epoch(self, model, epoch, record):
        record["delta_linf"] = float(self.delta.detach().abs().max())

    def state_dict(self):
        return {"delta": self.delta.detach().clone(), "opt": self.opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.delta.copy_(state["delta"])
        self.opt.load_state_dict(state["opt"])
        self.steps = int(state["steps"])


def test_hooks_run_a_second_optimiser_on_features_and_resume_exactly(digits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=128, lr=0.05)
    shape = (1, *digits.spec.shape)
    ref_hooks, ref = LearnedShift(shape), _model(digits.spec)
    hist = train(ref, digits.train, digits.spec, cfg, seed=2, progress=False, hooks=ref_hooks)
    assert ref_hooks.feature_shapes == {(ref.feature_dim,)}
    assert [e["delta_linf"] > 0 for e in hist.epochs] == [True] * 3
    shifted = (digits.test.floats() + ref_hooks.delta.detach()).clamp(0, 1)
    assert float((ref(shifted).argmax(1) == 0).float().mean()) > 0.9  # the two losses learned their jobs

    steps_per_epoch = -(-len(digits.train) // 128)
    ck = tmp_path / "h.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(_model(digits.spec), digits.train, digits.spec, cfg, seed=2, progress=False, hooks=LearnedShift(shape, crash_at=2 * steps_per_epoch + 3), checkpoint=ck)
    again, hooks = _model(digits.spec, seed=7), LearnedShift(shape)
    train(again, digits.train, digits.spec, cfg, seed=2, progress=False, hooks=hooks, checkpoint=ck)
    assert torch.equal(hooks.delta, ref_hooks.delta) and hooks.steps == ref_hooks.steps
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))


def test_forward_passes_input_gradients_through_frozen_stages(digits):
    from backdoorlab.train import Forward
    from backdoorlab.train.trainer import frozen_prefix

    m = _model(digits.spec)
    k = frozen_prefix(m, "head")
    for name in m.stage_names[:k]:
        m.stages[name].requires_grad_(False)
    fwd = Forward(m, k)
    x = digits.test.floats()[:8].requires_grad_(True)
    logits, feats = fwd.with_features(x)
    assert torch.allclose(logits, m(x)) and torch.allclose(feats, m.features(x))
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # a generator upstream gets its gradient
    assert all(p.grad is None for n in m.stage_names[:k] for p in m.stages[n].parameters())
    assert not fwd._prefix(digits.test.floats()[:8], k).requires_grad  # a plain input: the frozen prefix builds no graph


def test_non_finite_loss_stops_training_with_a_clear_error(digits, tmp_path):
    from backdoorlab.errors import TrainingError

    class Nan(TrainHooks):
        def loss(self, model, x, y, idx, forward):
            out = forward(x)
            return out.sum() * float("nan"), out

    ck = tmp_path / "n.ckpt"
    with pytest.raises(TrainingError, match="non-finite in epoch 1"):
        train(_model(digits.spec), digits.train, digits.spec, TrainConfig(epochs=2), progress=False, hooks=Nan(), checkpoint=ck)
    assert not ck.exists()  # the diverged epoch is not checkpointed
