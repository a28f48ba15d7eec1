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
    return out, run_attack(job, out, progress=False)


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
    assert m["latent_codes"]["z_far_count"] > 0 and m["latent_codes"]["z_near_count"] > 0


def test_perturbations_respect_the_budget_and_artifacts(mmlm_run):
    out, m = mmlm_run
    assert m["epsilon"] == pytest.approx(0.2)
    assert m["mean_perturbation_linf"] <= 0.2 + 1 / 255
    for key in ("required_perturbation_linf_with_mode_mixture", "required_perturbation_linf_without_mode_mixture"):
        assert 0 < m[key] <= 0.4 + 1e-6  # the ablation's budget
    # the "without mode mixture" images are crafted like the main ones: same budget
    assert m["mean_perturbation_linf_without_mode_mixture"] <= 0.2 + 1 / 255
    assert 0 <= m["attack_success_rate_without_mode_mixture"] <= 1
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
])
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        MMLMParams(**params).validate(10)


def test_cli_rejects_epsilon_outside_unit_interval(tmp_path, capsys):
    assert main(["attack", "mmlm", "--epsilon", "1.5", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "params.epsilon" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
