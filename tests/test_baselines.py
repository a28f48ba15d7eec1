"""The MMLM paper's baselines: Blended, WaNet and Data-Efficient poisoning (and their restrictions)."""

from __future__ import annotations


import pytest
import torch

from backdoorlab.attacks import ATTACKS, AttackContext
from backdoorlab.attacks.blended import Blended, BlendedParams, blend_image, blend_trigger
from backdoorlab.attacks.data_efficient import DataEfficient, DataEfficientParams, ForgettingCounter, most_forgotten
from backdoorlab.attacks.triggers import WarpTrigger
from backdoorlab.attacks.wanet import WaNet, WaNetParams, backdoor_grid, control_field, identity_grid, noise_grids
from backdoorlab.data import load_dataset
from backdoorlab.errors import ConfigError
from backdoorlab.jobs import AttackJob, TrainJob, run_attack, run_train
from backdoorlab.recipes import train_config

FAST = {"epochs": 5, "batch_size": 64}
WIDTH = 0.5
SMALL = "mnist5k-1500"  # 1,500 / 500 real MNIST digits: end-to-end runs in a few seconds each




pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- trigger math


def test_blend_is_convex_combination_with_alpha():
    t = blend_trigger((1, 8, 8), 0.2, "noise", seed=3)
    x = torch.rand(5, 1, 8, 8)
    pattern = blend_image("noise", (1, 8, 8), seed=3)
    assert torch.allclose(t(x), 0.8 * x + 0.2 * pattern, atol=1e-6)
    assert torch.all(t.mask == 0.2)
    assert not torch.equal(pattern, blend_image("noise", (1, 8, 8), seed=4))  # the noise is seeded


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_blend_photo_matches_dataset_shape(shape):
    img = blend_image("astronaut", shape)
    assert img.shape == shape and 0 <= float(img.min()) and float(img.max()) <= 1 and float(img.std()) > 0.05
    if shape[0] == 3:
        assert not torch.equal(img[0], img[1])  # colour kept for colour datasets


def test_warp_grid_is_identity_when_strength_is_zero():
    field = control_field(4, 28, 28, torch.Generator().manual_seed(0))
    grid = backdoor_grid(field, 0.0)
    assert torch.allclose(grid, identity_grid(28, 28))
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(WarpTrigger(grid)(x), x, atol=1e-5)


def test_warp_field_normalised_and_bounded():
    g = torch.Generator().manual_seed(7)
    field = control_field(4, 16, 16, torch.Generator().manual_seed(7))
    p = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1
    p = p / p.abs().mean()
    # bicubic with aligned corners passes through the corner control points: (x, y) order kept
    assert torch.allclose(field[0, 0], p[0, :, 0, 0], atol=1e-5) and torch.allclose(field[-1, -1], p[0, :, -1, -1], atol=1e-5)
    grid = backdoor_grid(field, 0.5)
    assert torch.allclose(grid, (identity_grid(16, 16) + 0.5 * field / 16).clamp(-1, 1))
    assert float(backdoor_grid(field, 100.0).abs().max()) <= 1.0
    noisy = noise_grids(grid, 6, torch.Generator().manual_seed(1))
    assert noisy.shape == (6, 16, 16, 2) and float(noisy.abs().max()) <= 1.0
    assert float((noisy - grid).abs().max()) <= 1 / 16 + 1e-6 and not torch.equal(noisy[0], noisy[1])


def test_wanet_batches_backdoor_noise_and_clean_parts(digits):
    ctx = AttackContext(digits, "digit-cnn", train_config("digits", "digit-cnn", FAST))
    a = WaNet(WaNetParams(target_mode="all-to-all", poison_rate=0.1, cross_ratio=2.0, s=4.0))
    trig = a.make_trigger(ctx)
    hooks = a.hooks(ctx, trig)
    x, y = torch.rand(100, 1, 8, 8), torch.arange(100) % 10
    x2, y2 = hooks.batch(x, y, torch.arange(100))
    assert torch.allclose(x2[:10], trig(x[:10])) and torch.equal(y2[:10], (y[:10] + 1) % 10)  # backdoor mode
    assert torch.equal(y2[10:], y[10:])  # noise mode and clean keep their labels
    assert not torch.allclose(x2[10:30], x[10:30]) and not torch.allclose(x2[10:30], trig(x[10:30]))
    assert torch.equal(x2[30:], x[30:])


# ---------------------------------------------------------------------------- labels and selection


def test_all_to_all_poisoned_labels(digits):
    ctx = AttackContext(digits, "digit-cnn", train_config("digits", "digit-cnn", FAST))
    a = Blended(BlendedParams(target_mode="all-to-all", poison_rate=0.2, image="noise"))
    trig = a.make_trigger(ctx)
    idx = a.select(ctx, trig)
    poisoned = a.poison(ctx, trig, idx)
    y = digits.train.y
    assert torch.equal(poisoned.y[idx], (y[idx] + 1) % 10)
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.y[rest], y[rest]) and torch.equal(poisoned.x[rest], digits.train.x[rest])
    assert len(idx) == round(0.2 * len(y))


def test_data_efficient_all_to_all_and_base_triggers(digits):
    ctx = AttackContext(digits, "digit-cnn", train_config("digits", "digit-cnn", {"epochs": 1}), width=0.25, progress=False)
    a = DataEfficient(DataEfficientParams(target_mode="all-to-all", poison_rate=0.1, rounds=1, select_epochs=1, image="noise", alpha=0.3))
    a.validate(10)
    trig = a.make_trigger(ctx)
    assert torch.all(trig.mask == 0.3)  # the Blended trigger with our alpha
    idx = a.select(ctx, trig)
    y = digits.train.y
    assert len(idx.unique()) == len(idx) == round(0.1 * len(y)) and bool((y[idx] == 0).any())  # all-to-all: any class
    assert len(a.rounds_log) == 1 and a.rounds_log[0]["mean_forgetting_events"] >= 0
    assert torch.equal(a.poison(ctx, trig, idx).y[idx], (y[idx] + 1) % 10)
    b = DataEfficient(DataEfficientParams(base_trigger="badnets", patch_size=2))
    mask = b.make_trigger(ctx).mask
    assert set(mask.unique().tolist()) == {0.0, 1.0} and int(mask.sum()) == 4  # the BadNets 2x2 patch


def test_data_efficient_surrogates_do_not_share_the_victims_seed(digits, monkeypatch):
    from backdoorlab.attacks import derived_seed

    seeds = []
    real = AttackContext.new_model

    def spy(self, seed=None):
        seeds.append(self.seed if seed is None else seed)
        return real(self, seed)

    monkeypatch.setattr(AttackContext, "new_model", spy)
    ctx = AttackContext(digits, "digit-cnn", train_config("digits", "digit-cnn", {"epochs": 1}), seed=3, width=0.25, progress=False)
    a = DataEfficient(DataEfficientParams(rounds=2, select_epochs=1))
    a.select(ctx, a.make_trigger(ctx))
    victim, _ = a.victim(ctx)
    assert seeds[-1] == 3 and len(set(seeds[:2])) == 2 and 3 not in seeds[:2]  # two surrogates, each its own seed
    assert seeds[:2] == [derived_seed(3, "data-efficient/surrogate/1"), derived_seed(3, "data-efficient/surrogate/2")]
    torch.manual_seed(seeds[0])
    first = ctx.new_model(seeds[0])
    assert not torch.equal(first.head.weight, victim.head.weight)  # a different initialisation


def test_forgetting_counter_counts_a_known_sequence():
    # per tracked sample, correctness over 6 epochs; forgetting = correct -> wrong between visits
    seq = {2: [1, 0, 1, 0, 1, 1], 5: [0, 0, 1, 1, 1, 0], 7: [1, 1, 1, 1, 1, 1], 9: [0, 1, 0, 1, 0, 1]}
    counter = ForgettingCounter(12, torch.tensor(list(seq)))
    g = torch.Generator().manual_seed(0)
    for epoch in range(6):
        order = torch.randperm(12, generator=g)
        for batch in order.split(5):  # untracked samples ride along in shuffled batches
            y = torch.randint(0, 3, (len(batch),), generator=g)
            ok = torch.tensor([bool(seq[i][epoch]) if i in seq else bool(i % 2) for i in batch.tolist()])
            pred = torch.where(ok, y, (y + 1) % 3)
            logits = torch.nn.functional.one_hot(pred, 3).float() * 5
            loss, out = counter.loss(None, logits, y, batch, forward=lambda x: x)  # the "model" outputs these logits
            assert out is logits and torch.isclose(loss, torch.nn.functional.cross_entropy(logits, y))
    assert counter.events.tolist() == [2, 1, 0, 2]
    assert counter.seen.tolist() == [6, 6, 6, 6]


def test_most_forgotten_keeps_the_largest_counts():
    ev = torch.tensor([0, 3, 1, 3, 0, 2, 0, 5])
    keep = most_forgotten(ev, 4, torch.Generator().manual_seed(0))
    assert sorted(keep.tolist()) == [1, 3, 5, 7]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("attack,params,field", [
    ("blended", {"alpha": 1.5}, "params.alpha"),
    ("blended", {"alpha": -0.1}, "params.alpha"),
    ("blended", {"image": "hello-kitty"}, "params.image"),
    ("wanet", {"k": 1}, "params.k"),
    ("wanet", {"s": -1}, "params.s"),
    ("wanet", {"poison_rate": 0.5, "cross_ratio": 2}, "params.cross_ratio"),
    ("data-efficient", {"base_trigger": "wanet"}, "params.base_trigger"),
    ("data-efficient", {"filter_ratio": 1.0}, "params.filter_ratio"),
    ("data-efficient", {"rounds": -1}, "params.rounds"),
    ("data-efficient", {"alpha": 2.0}, "params.alpha"),
])
def test_bad_params_name_the_field(attack, params, field):
    with pytest.raises(ConfigError) as e:
        AttackJob(dataset="digits", attack=attack, params=params).build()
    assert e.value.field == field


def test_params_validate_without_the_job():
    for p, field in [(BlendedParams(alpha=3), "alpha"), (WaNetParams(k=1), "k"), (DataEfficientParams(base_trigger="x"), "base_trigger")]:  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as e:
            p.validate(10)
        assert e.value.field == field


# ---------------------------------------------------------------------------- end to end via run_attack


@pytest.fixture(scope="module")
def clean_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    m = run_train(TrainJob(dataset=SMALL, width=WIDTH, train=FAST), out, progress=False)
    assert m["clean_accuracy"] > 0.85
    return str(out / "model.safetensors")


def _run(tmp_path, clean_path, attack, **params):
    job = AttackJob(dataset=SMALL, width=WIDTH, train=FAST, attack=attack, params=params, clean_model=clean_path)
    return run_attack(job, tmp_path / f"{attack}-{params.get('restrict', 'none')}", progress=False)


def test_blended_end_to_end_learns_the_backdoor(tmp_path, clean_path):
    m = _run(tmp_path, clean_path, "blended", image="camera")
    assert m["clean_accuracy"] > 0.85 and m["clean_accuracy_before"] > 0.85
    assert m["attack_success_rate"] > 0.9 and m["attack_success_rate_clean_model"] < 0.2
    assert 0.1 < m["mean_perturbation_linf"] <= 0.2 + 1e-3  # α bounds the change of every pixel
    assert (tmp_path / "blended-none" / "samples.png").exists()


def test_data_efficient_end_to_end_reports_its_rounds(tmp_path, clean_path):
    m = _run(tmp_path, clean_path, "data-efficient", rounds=2, select_epochs=2, poison_rate=0.1, base_trigger="blended", image="camera")
    assert m["clean_accuracy"] > 0.85
    assert m["attack_success_rate"] > 0.5 and m["attack_success_rate_clean_model"] < 0.2
    assert [r["round"] for r in m["selection_rounds"]] == [1, 2]
    assert m["poison_count"] == round(0.1 * 1500)
    assert 0.0 < m["selection_overlap_with_random"] < 1.0  # FUS kept some of the random pool and replaced some
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "data-efficient-none" / "tensors.safetensors"))
    idx, y = t["poison_indices"], load_dataset(SMALL).train.y
    assert len(idx.unique()) == len(idx) and bool((y[idx] != 0).all())  # all-to-one: never the target class
    assert bool((t["random_pool_indices"] != idx).any())


def test_wanet_end_to_end(tmp_path, clean_path):
    # the paper's s = 0.5 needs hundreds of epochs; a strong warp shows the mechanism in seconds
    m = _run(tmp_path, clean_path, "wanet", s=4.0, poison_rate=0.2, cross_ratio=1.0)
    assert m["clean_accuracy"] > 0.8
    assert m["noise_mode_accuracy"] > 0.5  # noise-mode warps keep their true labels (chance: 0.1)
    assert m["attack_success_rate"] > m["attack_success_rate_clean_model"] + 0.2
    assert 0 < m["warp_mean_shift_pixels"] < m["warp_max_shift_pixels"]


@pytest.mark.parametrize("attack,params", [
    ("badnets", {}),
    ("blended", {}),
    ("wanet", {}),
    ("data-efficient", {"rounds": 1, "select_epochs": 1}),
])
def test_head_restriction_leaves_everything_else_bitwise(tmp_path, clean_path, attack, params):
    m = _run(tmp_path, clean_path, attack, restrict="head", **params)
    assert m["changed_parameters"] > 0
    assert m["changed_parameters_outside_head"] == 0 and m["outside_head_bitwise_equal"]
    assert m["clean_accuracy_before"] > 0.85 and m["clean_accuracy"] > 0.5


def test_finetune_restriction_starts_from_the_clean_model(tmp_path, clean_path):
    m = _run(tmp_path, clean_path, "blended", restrict="finetune", image="camera")
    assert m["changed_parameters_outside_head"] > 0
    assert m["attack_success_rate"] > 0.8 and m["clean_accuracy"] > 0.85


def test_registered():
    assert {"blended", "wanet", "data-efficient"} <= set(ATTACKS.names())
