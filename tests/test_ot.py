"""Tests of backdoorlab.ot: semi-discrete OT solver, extension and mode-mixture detection."""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.errors import ConfigError
from backdoorlab.ot import (
    OTConfig,
    SemiDiscreteOT,
    cell_angles,
    class_distances,
    extend,
    mass_centers,
    mode_mixture,
    neighbours,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: one thread avoids OpenMP stalls when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _masses(ot: SemiDiscreteOT, x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(ot.assign(x), minlength=ot.n).float() / x.shape[0]


# Tolerance on |mu(W_i) * n - 1| measured on 400k fresh pseudo-random source samples: the
# measurement itself has relative std sqrt(n / 400k) < 1%, and the fitted h generalises from a
# training set of >= 8k quasi-random or 65k pseudo-random points (relative error a few percent).
MASS_TOL = 0.1


@pytest.mark.parametrize("source,quasi,n,d,n_samples", [
    ("gaussian", True, 16, 2, 4096),
    ("uniform", True, 20, 3, 4096),
    ("gaussian", False, 16, 2, 65536),
])
def test_cell_masses_converge_to_uniform(source, quasi, n, d, n_samples):
    y = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 2.0
    cfg = OTConfig(source=source, quasi_random=quasi, n_samples=n_samples, max_samples=65536,
                   tol=3e-4, stall_steps=20, max_iter=1500, seed=3)
    ot = SemiDiscreteOT(y, cfg)
    fresh = ot.sample_source(400_000, seed=12345)
    before = (_masses(ot, fresh) * n - 1).abs().max()
    assert before > 5 * MASS_TOL  # h = 0 is far from the answer, so the check below means something
    res = ot.fit()
    assert res.converged and res.grad_norm < cfg.tol
    assert len(res.grad_norms) == res.iterations + 1 == res.steps + 1
    after = (_masses(ot, fresh) * n - 1).abs()
    assert after.max() < MASS_TOL, after
    assert torch.isclose(ot.h.mean(), torch.tensor(0.0), atol=1e-5)
    train = ot.cell_masses()
    assert torch.isclose(train.sum(), torch.tensor(1.0))
    assert (train - 1.0 / n).norm() < cfg.tol  # the reported norm is the training-set gradient


def _small_cfg(**kw) -> OTConfig:
    base = dict(n_samples=1500, max_samples=6000, block_size=700, stall_steps=4, tol=1e-9, max_iter=60, seed=7)
    base.update(kw)
    return OTConfig(**base)


def test_every_mode_gives_identical_trajectories():
    y = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    runs = {}
    for name, kw in {"cached": dict(cache=True, candidates=0), "uncached": dict(cache=False, candidates=0),
                     "partly_cached": dict(cache=True, candidates=0, cache_memory=700 * 40 * 4 * 2),
                     "candidates": dict(candidates=4), "candidates_uncached": dict(candidates=4, cache=False, refresh_fraction=0.05)}.items():
        ot = SemiDiscreteOT(y, _small_cfg(**kw))
        res = ot.fit()
        runs[name] = (ot.h.clone(), res.grad_norms, res.sample_counts, ot.n_samples)
    h0, norms0, counts0, n0 = runs["cached"]
    assert n0 > 1500 and max(counts0) > min(counts0)  # the sample set grew, several blocks in play
    for name in ("uncached", "partly_cached", "candidates", "candidates_uncached"):
        h, norms, counts, n = runs[name]
        assert torch.equal(h, h0), name
        assert norms == norms0 and counts == counts0 and n == n0


def test_blocked_two_level_argmax_matches_plain_argmax():
    # n = 700 > 512 uses the grouped argmax with padding; duplicated targets create exact ties,
    # which must go to the first index like torch.argmax
    y = torch.randn(650, 5, generator=torch.Generator().manual_seed(5))
    ot = SemiDiscreteOT(torch.cat([y, y[:50]]), OTConfig(n_samples=3000, block_size=1100, scaling="none"))
    ot.h = torch.randn(700, generator=torch.Generator().manual_seed(6)) * 0.1
    ot.h[650:] = ot.h[:50]
    plain = (ot.samples @ ot.targets.t() + ot.h).argmax(1)
    assert torch.equal(ot.sample_assignments(), plain) and torch.equal(ot.assign(ot.samples), plain)
    assert int((plain >= 650).sum()) == 0 and int((plain < 50).sum()) > 0
    full = SemiDiscreteOT(torch.cat([y, y[:50]]), OTConfig(n_samples=3000, block_size=1100, scaling="none", candidates=0))
    full.h = ot.h
    assert torch.equal(full.sample_assignments(), plain)


def test_candidate_cells_fall_back_to_the_full_argmax_when_the_potential_moves():
    from backdoorlab.ot.candidates import CandidateCells

    g = torch.Generator().manual_seed(0)
    s = torch.randn(500, 60, generator=g)
    h0 = torch.zeros(60)
    cand = CandidateCells(k=3, refresh_fraction=0.5)
    cand.refresh(h0, 500, [(0, 250, s[:250]), (250, 500, s[250:])])
    full = {}
    for scale in (0.01, 0.5, 5.0):  # small moves: candidates decide; large ones: rows recomputed in full
        h = torch.randn(60, generator=g) * scale
        got, full[scale] = cand.assign(h, lambda rows: s[rows])
        assert torch.equal(got, (s + h).argmax(1)), scale
    assert full[0.01] == 0 and full[5.0] > 250 and cand.stale(500, full[5.0]) and not cand.stale(500, full[0.01])


def _roundtrip(state: dict) -> dict:
    """Through safetensors, as a checkpoint would go: every value a tensor (floats as float64)."""
    from safetensors.torch import load, save

    assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in state.values())
    flat = {k: v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)
            for k, v in state.items()}
    return load(save(flat))


@pytest.mark.parametrize("quasi", [True, False])
def test_save_resume_reproduces_uninterrupted_run(quasi):
    y = torch.randn(30, 4, generator=torch.Generator().manual_seed(4))
    cfg = _small_cfg(quasi_random=quasi, n_samples=1024, max_samples=8192, block_size=None, stall_steps=3)
    full = SemiDiscreteOT(y, cfg)
    full.fit(max_iter=100)
    first = SemiDiscreteOT(y, cfg)
    first.fit(max_iter=50)
    grown_before = first.n_samples
    resumed = SemiDiscreteOT(y, cfg)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert torch.equal(resumed.samples, first.samples)
    resumed.fit(max_iter=50)
    assert grown_before > 1024 and resumed.n_samples > grown_before  # growth before and after the cut
    assert resumed.step_count == full.step_count == 100
    assert torch.equal(resumed.h, full.h) and resumed.lr == full.lr < cfg.lr
    with pytest.raises(ConfigError) as err:
        SemiDiscreteOT(y, _small_cfg(quasi_random=quasi, seed=8)).load_state_dict(first.state_dict())
    assert err.value.field == "seed"


def _two_clusters(m: int = 12, sep: float = 3.0, spread: float = 0.3):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, 2, generator=g) * spread + torch.tensor([sep, 0.0])
    b = torch.randn(m, 2, generator=g) * spread + torch.tensor([-sep, 0.0])
    return torch.cat([a, b]), torch.cat([torch.zeros(m), torch.ones(m)]).long()


@pytest.fixture(scope="module")
def clusters_ot():
    y, labels = _two_clusters()
    ot = SemiDiscreteOT(y, OTConfig(n_samples=8192, max_samples=65536, tol=1e-3, seed=1))
    assert ot.fit().converged
    return ot, y, labels


def test_mixture_codes_lie_between_clusters(clusters_ot):
    ot, y, labels = clusters_ot
    theta = 0.7
    pair = cell_angles(ot, torch.arange(ot.n).unsqueeze(1), torch.arange(ot.n).unsqueeze(0))
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    # premise: the threshold separates within-cluster from cross-cluster cell pairs
    assert pair[same].max() < theta < pair[~same].min()
    angle = lambda yi, yj: torch.acos((yi @ yj + 1) / ((yi @ yi + 1) * (yj @ yj + 1)).sqrt())  # noqa: E731
    assert torch.isclose(pair[0, -1], angle(y[0], y[-1]), atol=1e-5)  # the papers' space: the points themselves
    scaled = cell_angles(ot, torch.tensor([0]), torch.tensor([ot.n - 1]), space="scaled")
    assert torch.isclose(scaled[0], angle(ot.targets[0], ot.targets[-1]), atol=1e-5)
    assert not torch.isclose(scaled[0], pair[0, -1], atol=1e-3)  # standardising changes the angles
    with pytest.raises(ConfigError, match="angle_space"):
        cell_angles(ot, 0, 1, space="other")

    mm = mode_mixture(ot, labels, 20_000, k=2, threshold=theta, seed=5)
    assert len(mm) == 20_000 and mm.codes.shape == (20_000, 2) and mm.neighbours.shape == (20_000, 1)
    rate = mm.is_mixture.float().mean()
    assert 0.02 < rate < 0.5  # only codes near the boundary between the two clusters' regions
    # every mixture code's cells span both clusters, and codes from one cluster's cells are not flagged
    assert torch.equal(mm.is_mixture, mm.mixes(0, 1))
    assert bool((mm.n_classes[mm.is_mixture] == 2).all()) and bool((mm.label_mask[mm.is_mixture] == 3).all())
    in_cluster = mm.n_classes == 1
    assert in_cluster.sum() > 10_000 and mm.is_mixture[in_cluster].float().mean() <= 0.01
    assert bool((mm.other_label[mm.is_mixture] == 1 - mm.first_label[mm.is_mixture]).all())
    assert bool((mm.other_label[in_cluster] == -1).all())
    # mixture codes sit in the gap, other codes on the clusters (spread 0.3)
    d0, d1 = class_distances(mm.codes, y, labels, target_class=0)
    gap = torch.minimum(d0, d1)
    assert gap[mm.is_mixture].median() > 1.5 and gap[~mm.is_mixture].median() < 0.3
    # a per-class threshold: above every angle for class-0 first cells, so only class-1 firsts flag
    per_class = mode_mixture(ot, labels, k=2, threshold=torch.tensor([4.0, theta]), sources=mm.sources)
    assert torch.equal(per_class.is_mixture, mm.is_mixture & (mm.first_label == 1))
    sub = mm.subset(mm.is_mixture)
    assert len(sub) == int(mm.is_mixture.sum()) and bool(sub.is_mixture.all())


def test_extension_neighbours_and_weights(clusters_ot):
    ot, y, labels = clusters_ot
    x = ot.sample_source(500, seed=9)
    centers = mass_centers(ot)
    idx, dist = neighbours(ot, x, 4, "centroid", centers)
    brute = torch.cdist(x, centers.centers)
    assert torch.equal(idx[:, 0], brute.argmin(1))
    assert torch.allclose(dist, brute.gather(1, idx), atol=1e-4) and bool((dist[:, 1:] >= dist[:, :-1]).all())
    idx_p, _ = neighbours(ot, x, 3, "potential", centers)
    assert torch.equal(idx_p[:, 0], ot.assign(x))
    codes, cells, w = extend(ot, x, k=2, weights="pair", pair_weight=0.75, centers=centers)
    assert torch.allclose(codes, 0.25 * y[cells[:, 0]] + 0.75 * y[cells[:, 1]], atol=1e-4)
    codes, cells, w = extend(ot, x, k=3, centers=centers)
    assert torch.allclose(w.sum(1), torch.ones(500)) and bool((w[:, 0] >= w[:, 1]).all())
    assert torch.allclose(codes, torch.einsum("mk,mkd->md", w, y[cells]), atol=1e-4)
    _, _, w = extend(ot, x, k=3, weights=[2.0, 1.0, 1.0], centers=centers)
    assert torch.allclose(w, torch.tensor([0.5, 0.25, 0.25]).expand(500, 3))


def test_mass_centers_match_means_and_handle_empty_cells():
    # the centre point lies inside the hull of the corners: with h = 0 its cell is empty
    y = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    ot = SemiDiscreteOT(y, OTConfig(n_samples=4000, scaling="none"))
    mc = mass_centers(ot)
    assert mc.empty.tolist() == [False, False, False, False, True]
    assert torch.isfinite(mc.centers).all() and int(mc.counts.sum()) == 4000
    idx = ot.sample_assignments()
    for i in range(4):
        assert torch.allclose(mc.centers[i], ot.samples[idx == i].mean(0), atol=1e-5)
    assert float(mc.centers[4].norm()) < 0.5  # fallback: the sample nearest to entering the cell
    assert torch.equal(ot.assign(ot.samples), idx)


def test_class_distances_brute_force():
    g = torch.Generator().manual_seed(3)
    feats, labels, codes = torch.randn(50, 5, generator=g), torch.arange(50) % 3, torch.randn(20, 5, generator=g)
    dt, do = class_distances(codes, feats, labels, target_class=1)
    full = torch.cdist(codes, feats)
    assert torch.allclose(dt, full[:, labels == 1].min(1).values, atol=1e-5)
    assert torch.allclose(do, full[:, labels != 1].min(1).values, atol=1e-5)


def test_scaling_round_trip_and_progress():
    y = torch.relu(torch.randn(30, 8, generator=torch.Generator().manual_seed(6))) * 5 + 2
    seen = []
    for scaling in ("none", "center", "standardize", "zscore"):
        ot = SemiDiscreteOT(y, OTConfig(n_samples=2000, scaling=scaling, max_iter=5, tol=1e-9))
        assert torch.allclose(ot.to_original(ot.targets), y, atol=1e-4)
        if scaling == "standardize":
            assert math.isclose(float(ot.targets.var(0, unbiased=False).mean()), 1.0, rel_tol=1e-4)
            res = ot.fit(progress=seen.append)
            assert [s["step"] for s in seen] == list(range(6)) and res.iterations == 5
            assert all(s["grad_norm"] == v for s, v in zip(seen, res.grad_norms))


@pytest.mark.parametrize("field,value", [
    ("source", "cauchy"), ("scaling", "whiten"), ("n_samples", 0), ("max_samples", 10),
    ("lr", -1.0), ("lr", float("nan")), ("betas", (1.0, 0.9)), ("eps", 0.0), ("tol", 0.0),
    ("max_iter", 0), ("stall_steps", 0), ("block_size", 0), ("quasi_random", 1), ("cache", "yes"),
    ("lr_decay", 1.5), ("seed", -1),
])
def test_bad_config_raises_config_error_naming_field(field, value):
    with pytest.raises(ConfigError) as err:
        OTConfig(**{field: value})
    assert err.value.field == field and field in str(err.value)


def test_bad_inputs_raise_config_error():
    y = torch.randn(10, 3)
    for bad in (torch.randn(10), torch.randn(1, 3), torch.full((4, 3), float("nan"))):
        with pytest.raises(ConfigError) as err:
            SemiDiscreteOT(bad)
        assert err.value.field == "targets"
    ot = SemiDiscreteOT(y, OTConfig(n_samples=500))
    with pytest.raises(ConfigError) as err:
        ot.assign(torch.randn(5, 4))
    assert err.value.field == "x"
    with pytest.raises(ConfigError) as err:
        mode_mixture(ot, torch.zeros(10), 100, k=1)
    assert err.value.field == "k"
    with pytest.raises(ConfigError) as err:
        mode_mixture(ot, torch.zeros(9), 100)
    assert err.value.field == "labels"
