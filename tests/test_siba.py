"""SIBA and its baselines (Random, Sparse, TUAP): the trigger's budget, the shared 2-D mask, the
optimiser, determinism, bad input before any work, and one small run end to end."""

from __future__ import annotations


import pytest
import torch

from backdoorlab.attacks import ATTACKS, AttackContext
from backdoorlab.attacks.siba import SIBA, SIBAParams, Sparse, SparseParams, top_k_mask
from backdoorlab.attacks.universal import TUAP, RandomParams, RandomSparse, TUAPParams, scaled_k
from backdoorlab.data import load_dataset
from backdoorlab.data.core import Dataset, DatasetSpec, ImageSet
from backdoorlab.errors import ConfigError, ModelFileError
from backdoorlab.jobs import AttackJob, TrainJob, run_attack, run_train
from backdoorlab.optim import UniversalConfig, universal_pgd
from backdoorlab.train.trainer import TrainConfig

SMALL = "mnist5k-1500"  # 1,500 / 500 real MNIST digits (conftest.py)


pytestmark = pytest.mark.usefixtures("one_thread")




def _rgb_ctx(seed: int = 0) -> AttackContext:
    """Random 3x12x12 images of 4 classes and a tiny untrained clean model: enough for the mechanics."""
    g = torch.Generator().manual_seed(1)
    spec = DatasetSpec("rgb-toy", (3, 12, 12), 4, ("a", "b", "c", "d"))
    x = torch.randint(0, 256, (96, 3, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(96) % 4
    data = Dataset(spec, ImageSet(x, y), ImageSet(x[:16], y[:16]))
    ctx = AttackContext(data, "digit-cnn", TrainConfig(epochs=1, batch_size=32), seed=seed, width=0.25, progress=False)
    ctx._clean = ctx.new_model(123).eval()
    return ctx


# ---------------------------------------------------------------------------- the mechanics


def test_k_scales_with_the_image_area():
    assert scaled_k(None, (3, 32, 32)) == 100  # the paper's CIFAR-10 setting
    assert scaled_k(None, (3, 128, 128)) == 1600  # ... and its VGGFace2 setting: the same density
    assert scaled_k(None, (1, 28, 28)) == 77  # MNIST: 100 * 784 / 1024
    assert scaled_k(200, (1, 28, 28)) == 200  # an explicit k is taken as given


def test_top_k_mask_sums_the_gradient_magnitude_over_channels():
    g = torch.zeros(3, 4, 4)
    g[0, 0, 0], g[1, 0, 0], g[2, 0, 0] = 1.0, -1.0, 1.0  # 3 in total, split over channels
    g[0, 1, 1] = -2.5  # largest single value, smaller sum
    g[2, 3, 3] = 2.0
    m = top_k_mask(g, 2)
    assert m.shape == (1, 4, 4) and int(m.sum()) == 2
    assert m[0, 0, 0] == 1 and m[0, 1, 1] == 1 and m[0, 3, 3] == 0


def test_universal_pgd_keeps_the_budget_and_the_best_epoch():
    x = torch.full((8, 1, 2, 2), 0.5)
    goal = torch.tensor([0.3, -0.3, 0.05, 0.0]).view(1, 2, 2)
    loss = lambda xa, idx: ((xa - 0.5) - goal).flatten(1).abs().sum(1)  # noqa: E731
    eps, ends = 0.1, {}

    def record(d, g, epoch, batch):  # δ after each epoch's last batch (2 batches of 4)
        if batch == 1:
            ends[epoch] = d.clone()
        return d

    cfg = UniversalConfig(epsilon=eps, step=0.04, epochs=6, batch_size=4)
    delta, hist = universal_pgd(x, loss, cfg, project=record, generator=torch.Generator().manual_seed(0))
    assert float(delta.abs().max()) <= eps + 1e-7
    assert torch.allclose(delta.flatten()[:2], torch.tensor([0.1, -0.1]))  # pushed to the budget and clipped
    assert len(hist) == 6 and min(hist) < hist[0]
    best = min(range(6), key=hist.__getitem__)
    assert torch.equal(delta, ends[best])  # the δ of the epoch with the lowest mean loss
    masked, _ = universal_pgd(x, loss, UniversalConfig(epsilon=eps, step=0.04, epochs=3, batch_size=4),
                              project=lambda d, g, e, b: d * torch.tensor([0.0, 1.0, 1.0, 1.0]).view(1, 2, 2))
    assert masked.flatten()[0] == 0 and masked.flatten()[1] < 0


@pytest.mark.parametrize("cls,params", [
    (SIBA, SIBAParams(k=10, epsilon=12 / 255, epochs=3, surrogate="clean", batch_size=32)),
    (Sparse, SparseParams(k=10, epsilon=12 / 255, epochs=3, surrogate="clean", batch_size=32)),
    (RandomSparse, RandomParams(k=10, epsilon=12 / 255)),
])
def test_sparse_triggers_keep_l0_linf_and_one_mask_for_all_channels(cls, params):
    ctx = _rgb_ctx()
    delta = cls(params).make_delta(ctx)
    assert delta.shape == (3, 12, 12)
    assert float(delta.abs().max()) <= params.epsilon + 1e-7
    support = delta.abs() > 0
    positions = support.any(0)
    assert int(positions.sum()) <= 10
    assert int(support.sum()) > 2 * 10  # 3 channels changed at (at most) the same 10 positions: one 2-D mask
    again = cls(params).make_delta(_rgb_ctx())
    assert torch.equal(delta, again)  # deterministic for a seed
    other = cls(params).make_delta(_rgb_ctx(seed=5))
    assert not torch.equal(delta, other)


def test_random_has_siba_budget_exactly_and_sparse_optimises_on_its_mask():
    ctx = _rgb_ctx()
    rnd = RandomSparse(RandomParams(k=10, epsilon=12 / 255)).make_delta(ctx)
    assert int((rnd.abs() > 0).any(0).sum()) == 10 and torch.allclose(rnd.abs().max(), torch.tensor(12 / 255))
    sp = Sparse(SparseParams(k=10, epsilon=12 / 255, epochs=2, surrogate="clean", batch_size=32)).make_delta(ctx)
    assert bool(((sp.abs() > 0).any(0) <= (rnd.abs() > 0).any(0)).all())  # Sparse = Random's positions, values optimised


def test_siba_refreshes_its_mask_every_k_epochs_and_lowers_the_surrogate_loss():
    ctx = _rgb_ctx()
    attack = SIBA(SIBAParams(k=20, epsilon=0.3, epochs=6, mask_every=2, surrogate="clean", batch_size=32))
    attack.make_delta(ctx)
    assert attack.mask_refreshes == 3  # epochs 0, 2, 4
    hist = attack.extra_metrics["trigger_loss_history"]
    assert min(hist) < hist[0]
    assert attack.extra_metrics["trigger_best_loss"] == min(hist)


def test_tuap_is_dense_and_bounded():
    delta = TUAP(TUAPParams(epsilon=8 / 255, epochs=2, surrogate="clean", batch_size=32)).make_delta(_rgb_ctx())
    assert float(delta.abs().max()) <= 8 / 255 + 1e-7
    assert int((delta.abs() > 0).any(0).sum()) > 100  # no L0 constraint: most of the 144 positions


def test_triggers_are_cached_by_what_changes_them(tmp_path):
    ctx = _rgb_ctx()
    ctx.cache_dir = tmp_path
    base = dict(k=10, epsilon=12 / 255, epochs=2, surrogate="clean", batch_size=32)
    first = SIBA(SIBAParams(**base))
    d1 = first.make_delta(ctx)
    second = SIBA(SIBAParams(**base, poison_rate=0.05))  # the poison rate does not change δ
    assert torch.equal(second.make_delta(ctx), d1) and second.extra_metrics["trigger_from_cache"]
    third = SIBA(SIBAParams(**{**base, "epsilon": 20 / 255}))
    assert not torch.equal(third.make_delta(ctx), d1) and not third.extra_metrics["trigger_from_cache"]


def test_surrogates_are_seeded_apart_from_the_victim():
    ctx = _rgb_ctx()
    s = SIBA(SIBAParams(k=5, epochs=1, batch_size=32)).surrogate(ctx)  # independent: trained here
    v = ctx.new_model()
    assert not torch.equal(next(s.parameters()), next(v.parameters()))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("attack,params,field", [
    ("siba", {"k": 0}, "params.k"),
    ("siba", {"k": 2.5}, "params.k"),
    ("siba", {"epsilon": 0.0}, "params.epsilon"),
    ("siba", {"epsilon": 1.5}, "params.epsilon"),
    ("siba", {"alpha": 0}, "params.alpha"),
    ("siba", {"poison_rate": 0.0}, "params.poison_rate"),
    ("siba", {"mask_every": 0}, "params.mask_every"),
    ("siba", {"surrogate": "victim"}, "params.surrogate"),
    ("siba", {"clean_label": True, "target_mode": "all-to-all"}, "params.clean_label"),
    ("sparse", {"data_fraction": 0.0}, "params.data_fraction"),
    ("random", {"noise": "gauss"}, "params.noise"),
    ("tuap", {"epochs": 0}, "params.epochs"),
    ("siba", {"test_epsilons": [0.1, 2.0]}, "params.test_epsilons"),
])
def test_bad_params_name_the_field(attack, params, field):
    with pytest.raises(ConfigError) as e:
        AttackJob(dataset="digits", attack=attack, params=params).build()
    assert e.value.field == field


@pytest.mark.parametrize("params,field", [
    ({"k": 785}, "params.k"),  # more positions than a 28x28 image has
    ({"poison_rate": 0.9, "clean_label": True}, "params.poison_rate"),  # more than the target class holds
])
def test_data_dependent_bad_input_fails_before_the_run_folder_exists(tmp_path, params, field):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_attack(AttackJob(dataset=SMALL, attack="siba", params=params), out, progress=False)
    assert e.value.field == field and not out.exists()


def test_a_surrogate_file_of_another_shape_fails_before_any_work(tmp_path):
    run_train(TrainJob(dataset="digits", width=0.25, train={"epochs": 1}), tmp_path / "digits", progress=False)
    out = tmp_path / "run"
    job = AttackJob(dataset=SMALL, attack="siba", params={"surrogate": "clean"}, clean_model=str(tmp_path / "digits" / "model.safetensors"))
    with pytest.raises(ModelFileError, match="clean_model"):
        run_attack(job, out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------- end to end


def test_siba_end_to_end_beats_random_at_the_same_budget(tmp_path):
    # a large budget shows the mechanism in seconds (ε = 8/255 on MNIST needs the full recipe, see docs)
    fast = {"epochs": 4, "batch_size": 64}
    clean = tmp_path / "clean"
    run_train(TrainJob(dataset=SMALL, width=0.5, train=fast), clean, progress=False)
    common = {"epsilon": 1.0, "poison_rate": 0.05, "test_epsilons": [0.5, 1.0]}
    runs = {}
    for name, extra in (("siba", {"epochs": 3, "surrogate": "clean"}), ("random", {})):
        job = AttackJob(dataset=SMALL, width=0.5, train=fast, attack=name, clean_model=str(clean / "model.safetensors"), params={**common, **extra})
        runs[name] = run_attack(job, tmp_path / name, progress=False)
    k = scaled_k(None, (1, 28, 28))
    for m in runs.values():
        assert m["trigger_l0"] <= k and m["trigger_linf"] <= 1.0
        assert m["mean_perturbation_l0"] <= k and m["poison_count"] == 75 and m["clean_accuracy"] > 0.8
        assert [c["epsilon"] for c in m["asymmetric_curve"]] == [0.5, 1.0]
    assert runs["random"]["trigger_l0"] == k
    assert runs["siba"]["attack_success_rate"] > 0.9 > runs["random"]["attack_success_rate"] + 0.3
    assert (tmp_path / "siba" / "trigger.png").exists()


def test_ubw_p_relabels_at_random_and_disperses_triggered_predictions(tmp_path):
    from backdoorlab.attacks.ubw import random_other_labels

    y = torch.arange(1000) % 10
    r = random_other_labels(y, 10, torch.Generator().manual_seed(0))
    assert bool((r != y).all()) and len(r[y == 3].unique()) == 9  # every other class, never the own
    fast = {"epochs": 4, "batch_size": 64}
    job = AttackJob(dataset=SMALL, width=0.5, train=fast, attack="ubw-p", params={"poison_rate": 0.1})
    m = run_attack(job, tmp_path / "ubw", progress=False)
    from safetensors.torch import load_file

    idx = load_file(str(tmp_path / "ubw" / "tensors.safetensors"))["poison_indices"]
    assert len(idx) == 150 and bool((load_dataset(SMALL).train.y[idx] == 0).any())  # the target class is not spared
    assert m["clean_accuracy"] > 0.8
    assert m["untargeted_attack_success_rate"] > m["untargeted_attack_success_rate_clean_model"]  # triggered images leave their class
    assert 0 < m["dispersibility"] <= m["dispersibility_max"]


def test_registered():
    assert {"siba", "sparse", "random", "tuap", "ubw-p"} <= set(ATTACKS.names())
