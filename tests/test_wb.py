"""WB and LIRA: trigger generators, the ε bound, DSWD's known answers, the two-stage hooks (and their
resume), bad input, and a small end-to-end run on scikit-learn's 8x8 digits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from backdoorlab.attacks import ATTACKS, GeneratorTrigger, Trigger
from backdoorlab.attacks.wb import LIRA, WB, LatentHooks, LIRAParams, WBParams, dswd, load_trigger
from backdoorlab.errors import ConfigError
from backdoorlab.jobs import AttackJob, run_attack
from backdoorlab.models import Arch, build_model
from backdoorlab.models.generators import GENERATORS, generator_name
from backdoorlab.train.trainer import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- generators and the bound


@pytest.mark.parametrize("name", GENERATORS.names())
def test_every_generator_keeps_the_shape_and_the_linf_bound(name):
    entry = GENERATORS.get(name)
    side = entry.made_for
    for channels in (1, 3):
        torch.manual_seed(0)
        trig = GeneratorTrigger.build(name, channels, 2, eps=0.03)
        with torch.no_grad():
            trig.net[-1].weight.mul_(50) if isinstance(trig.net, torch.nn.Sequential) else trig.net.out.weight.mul_(50)  # saturate tanh
        x = torch.rand(4, channels, side, side)
        x[0] = 0.0
        x[1] = 1.0
        with torch.no_grad():
            out = trig(x)
        assert out.shape == x.shape
        d = (out - x).abs()
        assert float(d.max()) <= 0.03 + 1e-6 and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert float(d.max()) > 0.02  # saturated: the bound is reached, not merely respected
    assert generator_name("auto", (3, side, side)) == name


def test_generator_choice_fails_on_a_shape_it_does_not_fit():
    assert generator_name("auto", (1, 8, 8)) == "conv-ae"  # no generator made for 8x8: the first that fits
    with pytest.raises(ConfigError) as e:
        generator_name("unet", (1, 28, 28))
    assert e.value.field == "generator" and "multiples of 8" in str(e.value)
    with pytest.raises(ConfigError):
        generator_name("auto", (1, 30, 30))


def test_the_trigger_rebuilds_from_its_tensors():
    torch.manual_seed(1)
    trig = GeneratorTrigger.build("conv-ae", 1, 3, eps=0.05).eval()
    again = Trigger.from_tensors(trig.kind, trig.tensors())
    x = torch.rand(3, 1, 28, 28)
    assert isinstance(again, GeneratorTrigger) and again.kind == "generator/conv-ae"
    assert torch.equal(trig(x), again(x)) and float(again.eps) == pytest.approx(0.05)


# ---------------------------------------------------------------------------- DSWD


def test_dswd_is_zero_for_identical_batches_with_a_finite_gradient():
    torch.manual_seed(0)
    f = torch.randn(64, 12, requires_grad=True)
    w = torch.randn(10, 12)
    d = dswd(f.detach(), f, w)
    assert float(d.detach()) == 0.0
    d.backward()
    assert torch.isfinite(f.grad).all()
    assert float(dswd(f.detach(), f.detach()[torch.randperm(64)], w)) == pytest.approx(0.0, abs=1e-6)  # order does not matter


def test_dswd_of_a_shift_along_one_row_direction():
    torch.manual_seed(0)
    w = torch.randn(10, 12)
    u = w / w.norm(dim=1, keepdim=True)
    f = torch.randn(200, 12)
    c, k = 0.7, 3
    got = float(dswd(f, f + c * u[k], w))
    cos = u @ u[k]  # each direction sees the shift c·<u_j, u_k>
    assert got == pytest.approx(c * math.sqrt(float(cos.pow(2).mean())), rel=1e-4)
    assert got == pytest.approx(float(dswd(f, f + c * u[k], 5 * w)), rel=1e-5)  # only the directions count
    orth = torch.linalg.qr(torch.randn(12, 12)).Q[:10]  # orthonormal rows: c / sqrt(C)
    assert float(dswd(f, f + c * orth[k], orth)) == pytest.approx(c / math.sqrt(10), rel=1e-4)
    with pytest.raises(ValueError):
        dswd(f, f[:10], w)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("attack,params,field", [
    ("wb", {"epsilon": 0}, "params.epsilon"),
    ("wb", {"epsilon": 1.5}, "params.epsilon"),
    ("wb", {"stage2_epsilon": -0.1}, "params.stage2_epsilon"),
    ("wb", {"lam": -1}, "params.lam"),
    ("wb", {"alpha": 1.0}, "params.alpha"),
    ("wb", {"generator": "vae"}, "params.generator"),
    ("wb", {"stage1_epochs": 0}, "params.stage1_epochs"),
    ("wb", {"residual_weight": -0.1}, "params.residual_weight"),
    ("wb", {"ssim_weight": -1}, "params.ssim_weight"),
    ("wb", {"attempts": 0}, "params.attempts"),
    ("wb", {"min_poison_accuracy": 1.5}, "params.min_poison_accuracy"),
    ("lira", {"lam": 0.5}, "params.lam"),
])
def test_bad_params_name_the_field(attack, params, field):
    with pytest.raises(ConfigError) as e:
        AttackJob(dataset="digits", attack=attack, params=params).build()
    assert e.value.field == field


def test_a_generator_that_does_not_fit_fails_before_the_run_folder_exists(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_attack(AttackJob(dataset="digits", attack="wb", params={"generator": "strided-ae"}), tmp_path / "run", progress=False)
    assert e.value.field == "params.generator"
    assert not (tmp_path / "run").exists()


def test_one_implementation_two_entries():
    assert ATTACKS.get("wb") is WB and ATTACKS.get("lira") is LIRA and issubclass(LIRA, WB)
    assert LIRAParams().lam == 0.0 and WBParams().lam > 0


# ---------------------------------------------------------------------------- the two stages, resumable


class Crash(LatentHooks):
    def __init__(self, *a, at: int, **k):
        super().__init__(*a, **k)
        self.calls, self.at = 0, at

    def loss(self, *a, **k):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().loss(*a, **k)


def _setup(digits, hooks_cls=LatentHooks, residual_weight=0.0, ssim_weight=0.0, **kw):
    attack = WB(WBParams(epsilon=0.1, stage1_epochs=2, poison_rate=0.5, gen_width=2, residual_weight=residual_weight, ssim_weight=ssim_weight))
    torch.manual_seed(5)
    trig = GeneratorTrigger.build("conv-ae", 1, 2, 0.1)
    torch.manual_seed(6)
    model = build_model(Arch("digit-cnn", 1, 10, (8, 8), 0.25))
    return model, hooks_cls(attack, trig, 10, **kw)


def test_stages_alternate_then_freeze_and_resume_exactly(digits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=128, lr=0.05, augment=False)
    model, hooks = _setup(digits)
    hist = train(model, digits.train, digits.spec, cfg, seed=3, progress=False, hooks=hooks)
    assert [e["stage"] for e in hist.epochs] == [1, 1, 2]
    assert hist.epochs[0]["generator_loss"] > 0 and hist.epochs[0]["dswd"] > 0 and hist.epochs[2]["generator_loss"] == 0
    assert not any(p.requires_grad for p in hooks.trigger.parameters())  # frozen in stage 2

    steps = -(-len(digits.train) // 128)
    ck = tmp_path / "wb.ckpt"
    for at in (steps + 2, steps + 3):  # interrupted in stage 1 (epoch 2), then, resumed after epoch 1, in stage 2 (epoch 3)
        m2, h2 = _setup(digits, Crash, at=at)
        with pytest.raises(KeyboardInterrupt):
            train(m2, digits.train, digits.spec, cfg, seed=3, progress=False, hooks=h2, checkpoint=ck)
    m3, h3 = _setup(digits)
    train(m3, digits.train, digits.spec, cfg, seed=3, progress=False, hooks=h3, checkpoint=ck)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m3.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(hooks.trigger.state_dict().values(), h3.trigger.state_dict().values()))


def test_the_residual_term_shrinks_the_trigger(digits):
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.05, augment=False)
    x = digits.test.x[:200].float() / 255
    sizes = {}
    for w in (0.0, 1.0):
        model, hooks = _setup(digits, residual_weight=w)
        train(model, digits.train, digits.spec, cfg, seed=3, progress=False, hooks=hooks)
        with torch.no_grad():
            sizes[w] = float((hooks.trigger.eval()(x) - x).abs().mean())
    assert sizes[1.0] < 0.5 * sizes[0.0]  # the same run and seeds: only the generator's loss differs


def test_the_ssim_term_raises_the_ssim_of_the_poisoned_images(digits):
    from backdoorlab.metrics.images import ssim, ssim_per_image

    x = digits.test.x[:200].float() / 255
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    per = ssim_per_image(x, y)
    per.mean().backward()  # the loss and the metric are one function, differentiable
    assert y.grad is not None and float(y.grad.abs().sum()) > 0
    assert float(per.mean()) == pytest.approx(ssim(x, y.detach()), abs=1e-6) and ssim(x, x) == pytest.approx(1.0)
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.05, augment=False)
    got = {}
    for w in (0.0, 10.0):
        model, hooks = _setup(digits, ssim_weight=w)
        train(model, digits.train, digits.spec, cfg, seed=3, progress=False, hooks=hooks)
        with torch.no_grad():
            got[w] = ssim(x, hooks.trigger.eval()(x))
    assert 1 - got[10.0] < 0.5 * (1 - got[0.0])  # the same run and seeds: only the generator's loss differs


# ---------------------------------------------------------------------------- end to end


FAST = {"epochs": 8, "batch_size": 128, "augment": False}


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
def test_end_to_end_on_digits(tmp_path, mode):
    params = {"target_mode": mode, "epsilon": 0.1, "stage1_epochs": 6, "gen_width": 2}
    m = run_attack(AttackJob(dataset="digits", attack="wb", params=params, train=FAST), tmp_path / mode, progress=False)
    assert m["clean_accuracy"] > 0.8 and m["clean_accuracy_before"] > 0.85
    if mode == "all-to-one":  # all-to-all needs a class-dependent trigger: more epochs than a test affords
        assert m["attack_success_rate"] > m["attack_success_rate_clean_model"] + 0.3
    assert m["mean_perturbation_linf"] <= 0.1 + 1e-6  # delivered 8-bit images stay inside ε
    assert 0 < m["ssim"] < 1 and m["psnr"] > 20
    per = m["per_class_attack_success_rate"]
    assert len(per) == 10 and (per[0] is None) == (mode == "all-to-one")
    assert m["stage1_epochs_run"] == 6 and m["stage2_epochs_run"] == 2
    run = tmp_path / mode
    assert (run / "samples.png").exists()
    meta = json.loads((run / "config.json").read_text())
    assert meta["params"]["lam"] == 1.0
    # new images on demand from the run folder: the same as the evaluated ones
    from backdoorlab.data import load_dataset

    test = load_dataset("digits").test
    again = WB(WBParams()).poison_images(test.x, run)
    assert again.dtype == torch.uint8 and int((again.int() - test.x.int()).abs().max()) <= int(0.1 * 255)
    assert isinstance(load_trigger(run), GeneratorTrigger)
    # the defenses' view rebuilds the same delivered images, inside ε
    from backdoorlab.defenses import load_case

    view, truth = load_case(run)
    delivered = {bytes(row.numpy().tobytes()) for row in again}
    assert len(truth.poisoned) > 0 and all(bytes(row.numpy().tobytes()) in delivered for row in truth.poisoned)
    assert view.inspected_source == "test-inputs"
    # the poster-like inspection: the training set with 10% of it poisoned by the trained generator
    view, truth = load_case(run, inspect_poison_rate=0.1)
    train_set = load_dataset("digits").train
    flags = truth.inspected_poisoned
    assert view.inspected_source == "training-set" and int(flags.sum()) == round(0.1 * len(train_set))
    assert torch.equal(view.inspected.x[~flags], train_set.x[~flags]) and torch.equal(view.inspected.y[~flags], train_set.y[~flags])
    assert torch.equal(view.inspected.y[flags], truth.labels(train_set.y[flags]))
    if mode == "all-to-one":
        assert not bool((train_set.y[flags] == truth.target).any())  # drawn among the images the ASR counts
    assert int((view.inspected.x[flags].int() - train_set.x[flags].int()).abs().max()) <= int(0.1 * 255)


def test_the_attacker_retries_with_fresh_seeds_only_when_its_own_check_fails(tmp_path):
    short = {"epochs": 2, "batch_size": 128, "augment": False}
    base = {"epsilon": 0.1, "stage1_epochs": 1, "gen_width": 2}
    once = run_attack(AttackJob(dataset="digits", attack="wb", params={**base, "min_poison_accuracy": 0.0}, train=short), tmp_path / "a", progress=False)
    assert once["attempts_made"] == 1 and len(once["poison_accuracy_per_attempt"]) == 1
    # a faint trigger and a full bar: the first attempt fails its check, so the attacker retries with fresh seeds
    faint = {"epsilon": 0.004, "stage1_epochs": 6, "gen_width": 2, "min_poison_accuracy": 1.0, "attempts": 3}
    three = run_attack(AttackJob(dataset="digits", attack="wb", params=faint, train=FAST), tmp_path / "b", progress=False)
    checks = three["poison_accuracy_per_attempt"]
    assert checks[0] < 1.0 and three["attempts_made"] == len(checks) >= 2
    passed = [i for i, c in enumerate(checks) if c >= 1.0]
    assert passed in ([], [len(checks) - 1]) and (passed or len(checks) == 3)  # stops at the first pass, else makes all three
    assert len(set(checks)) == len(checks)  # each attempt trained with its own seeds
