"""MMLM end to end on small data, its pieces, and its input checks."""

from types import SimpleNamespace

import pytest
import torch

from backdoorlab.attacks.mmlm import MMLMParams
from backdoorlab.attacks.mmlm_codes import LatentCodes, near_codes, poisoned_features
from backdoorlab.cli import main
from backdoorlab.errors import BackdoorLabError, ConfigError
from backdoorlab.jobs import AttackJob, run_attack
from backdoorlab.optim.matching import greedy_pairs

SMALL = dict(ot_samples=4000, ot_max_iter=60, generate=8000, pgd_steps=30, curve_steps=20,
             curve_epsilons=[0.05, 0.2, 0.4], epsilon=0.2, ablation_epsilon=0.4, max_test=120, head_epochs=20)


@pytest.fixture(scope="module")
def mmlm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmlm") / "run"
    job = AttackJob(dataset="digits", model="digit-cnn", width=0.5, train={"epochs": 15, "batch_size": 32}, attack="mmlm", params=dict(SMALL))
    with pytest.warns(UserWarning, match="the OT stopped after 60 steps") as caught:  # few steps: the run must say so
        m = run_attack(job, out, progress=False)
    assert m["ot_converged"] is False and m["ot_grad_norm"] > 2e-3
    assert any("Z_far codes but" in str(w.message) for w in caught) == (m["replaced_target_features"] < m["z_far_requested"])
    return out, m


def test_only_the_head_changes(mmlm_run):
    out, m = mmlm_run
    assert m["changed_parameters_outside_head"] == 0 and m["outside_head_bitwise_equal"] is True
    assert 0 < m["changed_parameters"] <= 256 * 10 + 10
    assert sum(m["change_histogram"].values()) == m["changed_parameters"]


def test_backdoor_beats_plain_adversarial_examples(mmlm_run):
    _, m = mmlm_run
    assert abs(m["clean_accuracy"] - m["clean_accuracy_before"]) <= 0.05
    curve = {round(c["epsilon"], 3): c for c in m["asr_curve"]}
    top = curve[0.4]
    # the same crafted images succeed far more often on the modified head than on the clean model
    assert top["attack_success_rate"] > 0.5
    assert top["attack_success_rate"] > top["attack_success_rate_clean_model"] + 0.2
    assert top["attack_success_rate"] >= curve[0.05]["attack_success_rate"]
    # PGD gets closer to the codes with a larger budget, never further than where it started
    lefts = [curve[e]["latent_distance_left"] for e in (0.05, 0.2, 0.4)]
    assert lefts == sorted(lefts, reverse=True) and lefts[-1] < lefts[0] and lefts[0] <= 1.0 + 1e-6
    assert all(curve[e]["latent_distance_left_p90"] >= curve[e]["latent_distance_left"] for e in curve)
    assert m["latent_codes"]["z_far_count"] > 0 and m["latent_codes"]["z_near_count"] > 0


def test_perturbations_respect_the_budget_and_artifacts(mmlm_run):
    out, m = mmlm_run
    assert m["epsilon"] == pytest.approx(0.2)
    assert m["mean_perturbation_linf"] <= 0.2 + 1e-6  # float32 of 51/255
    for key in ("required_perturbation_linf_with_mode_mixture", "required_perturbation_linf_without_mode_mixture"):
        assert 0 < m[key] <= 0.4 + 1e-6  # the ablation's budget
    # the "without mode mixture" images are crafted like the main ones: same budget
    assert 0 < m["mean_perturbation_linf_without_mode_mixture"] <= 0.2 + 1e-6  # moved, and 8-bit rounding stays inside ε
    from safetensors.torch import load_file

    t = load_file(str(out / "tensors.safetensors"))
    assert t["poisoned_test"].dtype == torch.uint8 and len(t["poisoned_test"]) == len(t["poisoned_test_index"]) == 120
    assert (out / "asr_vs_epsilon.png").exists() and (out / "samples.png").exists()


def test_poisoned_feature_set_keeps_size_and_labels():
    feats = torch.randn(50, 4)
    labels = torch.arange(50) % 5
    z = torch.full((7, 4), 9.0)
    data, chosen = poisoned_features(feats, labels, z, target=2, seed=0)
    assert len(data) == 50 and torch.equal(data.y, labels)
    assert len(chosen) == 7 and bool((labels[chosen] == 2).all())
    assert bool((data.x[chosen] == 9.0).all())
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[chosen] = False
    assert torch.equal(data.x[untouched], feats[untouched])


def _head(bias_target: float) -> SimpleNamespace:
    """A 3-class head on 2-d codes (t, 0): logits (t + bias_target, 0, -10); target region t > -bias_target."""
    lin = torch.nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([bias_target, 0.0, -10.0]))
    return SimpleNamespace(head=lin)


def test_z_near_keeps_the_widened_part_of_the_region_deepest_first():
    t = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.5, 2.5])
    codes = LatentCodes(torch.zeros(1, 2), torch.stack([t, torch.zeros(6)], 1), torch.arange(6), {})
    backdoored, clean = _head(1.0), _head(-1.0)  # the fine-tuning widened the target region from t > 1 to t > -1
    z, other = near_codes(backdoored, clean, codes, target=0, region="expansion", top=1.0)
    assert sorted(z[:, 0].tolist()) == [-0.5, 0.0, 0.5]  # not t = -2 (outside), not 1.5, 2.5 (clean target already)
    assert codes.stats["z_near_in_region"] == 5 and codes.stats["z_near_in_expansion"] == 3
    assert codes.stats["near_pool_size"] == 6 and codes.stats["near_pool_in_clean_region"] == 2  # t = 1.5, 2.5
    z, other = near_codes(backdoored, clean, codes, target=0, region="expansion", top=0.5)
    assert z[:, 0].tolist() == [0.5, 0.0] and other.tolist() == [3, 2]  # ceil(1.5) = 2, largest margin first
    assert codes.stats["z_near_margin_min"] == pytest.approx(1.0)
    z, _ = near_codes(backdoored, clean, codes, target=0, region="target", top=0.2)
    assert z[:, 0].tolist() == [2.5]
    with pytest.raises(BackdoorLabError, match="no Z_near candidate"):
        near_codes(_head(-3.0), clean, codes, target=0, region="expansion", top=1.0)


def _brute_greedy(d):
    m, q = d.shape
    out, used = [-1] * m, set()
    for _, i, j in sorted((float(d[i, j]), i, j) for i in range(m) for j in range(q)):
        if out[i] < 0 and j not in used:
            out[i] = j
            used.add(j)
    return out


def test_greedy_pairs_match_the_sequential_greedy():
    for s in range(10):
        d = torch.rand(9, 12, generator=torch.Generator().manual_seed(s))
        assert greedy_pairs(d).tolist() == _brute_greedy(d)
    many = greedy_pairs(torch.rand(10, 3))  # more rows than codes: every row is paired, codes reused
    assert bool((many >= 0).all()) and set(many.tolist()) == {0, 1, 2}
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    allowed[:, 3] = True
    assert greedy_pairs(torch.rand(4, 4), allowed).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("params, field", [
    (dict(target_mode="all-to-all"), "target_mode"),
    (dict(epsilon=1.5), "epsilon"),
    (dict(curve_epsilons=[0.1, -0.1]), "curve_epsilons"),
    (dict(k=1), "k"),
    (dict(replace_share=0.0), "replace_share"),
    (dict(near_top=0.0), "near_top"),
    (dict(near_region="all"), "near_region"),
    (dict(objective="margin"), "objective"),
    (dict(margin=-1.0), "margin"),
    (dict(margin_weight=0.0), "margin_weight"),
    (dict(select_asr=1.5), "select_asr"),
    (dict(select_images=0), "select_images"),
])
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        MMLMParams(**params).validate(10)


def test_cli_rejects_epsilon_outside_unit_interval(tmp_path, capsys):
    assert main(["attack", "mmlm", "--epsilon", "1.5", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "params.epsilon" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.fixture(scope="module")
def three_clusters():
    from backdoorlab.ot import OTConfig, SemiDiscreteOT

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    labels = torch.arange(3).repeat_interleave(60)
    feats = centres[labels] + 0.3 * torch.randn(180, 2, generator=g)
    ot = SemiDiscreteOT(feats, OTConfig(n_samples=8192, max_samples=65536, tol=2e-3, seed=1))
    assert ot.fit().converged
    return ot, feats, labels


def _code_params(**kw):
    base = dict(generate=6000, k=2, neighbour_method="potential", angle_space="features", target=0,
                theta_far_target=0.9, theta_far_other=0.7, theta_near=0.7, near_ratio=1.3)
    return SimpleNamespace(**{**base, **kw})


def test_select_codes_splits_far_and_near_and_never_shares_a_code(three_clusters):
    from backdoorlab.attacks.mmlm_codes import select_codes
    from backdoorlab.ot import class_distances

    ot, feats, labels = three_clusters
    codes = select_codes(ot, feats, labels, _code_params(), n_far=10, seed=0)
    st = codes.stats
    assert len(codes.z_far) == st["z_far_count"] == 10 and st["z_far_requested"] == 10 and st["z_far_candidates"] > 10
    d_t, d_o = class_distances(codes.z_far, feats, labels, 0)
    ratio = d_t / d_o
    assert bool((ratio > 1).all()) and bool((ratio[:-1] >= ratio[1:]).all())  # nearer another class, farthest first
    dn_t, dn_o = class_distances(codes.near_pool, feats, labels, 0)
    assert bool((dn_t / dn_o <= 1.3 + 1e-5).all()) and bool((codes.near_other != 0).all())
    shared = (torch.cdist(codes.near_pool, codes.z_far) == 0).any(1)
    assert not bool(shared.any())  # an implanted Z_far code is never a Z_near code
    # asking for more Z_far codes than exist implants all of them and says so
    many = select_codes(ot, feats, labels, _code_params(), n_far=10**6, seed=0)
    assert many.stats["z_far_count"] == many.stats["z_far_candidates"] < many.stats["z_far_requested"] == 10**6
    assert many.stats["z_near_excluded_as_implanted"] >= st["z_near_excluded_as_implanted"]
    with pytest.raises(BackdoorLabError, match="Z_far"):
        select_codes(ot, feats, labels, _code_params(theta_far_target=3.2, theta_far_other=3.2), n_far=10, seed=0)


def test_the_headline_asr_is_the_curves_at_the_budget(mmlm_run):
    """One ASR: the curve and the headline are both measured on the 8-bit images delivered."""
    out, m = mmlm_run
    at_eps = [c for c in m["asr_curve"] if c["epsilon"] == pytest.approx(m["epsilon"])]
    assert len(at_eps) == 1 and at_eps[0]["attack_success_rate"] == m["attack_success_rate"]
    assert at_eps[0]["attack_success_rate_clean_model"] == m["attack_success_rate_clean_model"]
    assert m["ot_grad_norm"] == m["ot"]["grad_norm"] and m["replaced_target_features"] == m["latent_codes"]["z_far_count"]


def test_the_ot_is_fitted_once_per_clean_model_and_restored_from_the_cache(three_clusters, tmp_path):
    from backdoorlab.attacks.mmlm_codes import fit_ot

    _, feats, _ = three_clusters
    p = SimpleNamespace(ot_source="gaussian", ot_samples=4096, ot_max_iter=3000, ot_tol=2e-3)
    first, res, reused = fit_ot(feats, p, 3, torch.device("cpu"), False, tmp_path)
    again, res2, reused2 = fit_ot(feats, p, 3, torch.device("cpu"), False, tmp_path)
    assert (reused, reused2) == (False, True) and len(list(tmp_path.glob("ot-*.safetensors"))) == 1
    assert res.converged and res2.steps == res.steps and res2.grad_norm == res.grad_norm
    assert torch.equal(again.h, first.h) and torch.equal(again.sample_assignments(), first.sample_assignments())
    _, _, other = fit_ot(feats, p, 4, torch.device("cpu"), False, tmp_path)  # another seed: another fit
    assert other is False and len(list(tmp_path.glob("ot-*.safetensors"))) == 2


def test_the_margin_variant_moves_towards_the_backdoored_heads_target_where_the_papers_objective_stays():
    from backdoorlab.attacks.mmlm import MMLM

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    head = torch.nn.Linear(4, 3)
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        z = enc(x)  # every image already sits on its code: the paper's objective has nothing to do
        margin = lambda xa: (lambda lg: lg[:, 2] - lg[:, [0, 1]].max(1).values)(head(enc(xa)))  # noqa: E731
    paper = MMLM(MMLMParams(target=2)).craft(enc, x, z, 64 / 255, 20, head=head)
    variant = MMLM(MMLMParams(target=2, objective="latent+margin", margin=5.0)).craft(enc, x, z, 64 / 255, 20, head=head)
    assert paper.dtype == variant.dtype == torch.uint8
    x8 = (x * 255).round() / 255
    with torch.no_grad():
        base, got_paper, got_variant = margin(x8), margin(paper.float() / 255), margin(variant.float() / 255)
    assert torch.allclose(got_paper, base, atol=0.05)  # keep-best: the start is already optimal
    assert bool((got_variant > base + 0.05).all())  # the hinge pulls every image towards the target
    assert float((variant.float() - x8 * 255).abs().max()) <= 64 + 1e-4  # still inside the budget (8-bit units)


def test_auto_chooses_the_objective_that_fires_first_on_the_attackers_own_images(mmlm_run):
    _, m = mmlm_run  # the fixture runs the default objective, "auto"
    p = MMLMParams(**SMALL)
    rows = m["objective_selection"]
    assert m["objective_used"] in ("latent", "latent+margin") and rows
    # both objectives are measured at each budget, smallest first, and the sweep stops at the first that fires
    assert [r["objective"] for r in rows] == ["latent", "latent+margin"] * (len(rows) // 2)
    eps = [r["epsilon"] for r in rows[::2]]
    assert eps == sorted(p.curve_epsilons)[: len(eps)]
    fires = lambda r: r["attacker_asr"] >= p.select_asr and r["attacker_asr"] - r["attacker_asr_clean_model"] >= p.select_gap  # noqa: E731
    assert not any(fires(r) for r in rows[:-2])
    last = rows[-2:]
    if any(fires(r) for r in last):
        assert m["objective_used"] == next(r["objective"] for r in last if fires(r))  # the paper's wins a tie
    else:
        assert len(eps) == len(p.curve_epsilons)
        gap = {r["objective"]: r["attacker_asr"] - r["attacker_asr_clean_model"] for r in last}
        assert gap[m["objective_used"]] == max(gap.values())
