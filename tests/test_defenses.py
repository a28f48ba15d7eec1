"""Defenses on one small BadNets run (``bn`` in conftest.py, made once per session): each must catch what it is known to catch.

The run: MNIST-5k, digit-cnn at width 0.5, 3 epochs without augmentation, 10% of the training set
poisoned (target 0); its clean model of the same seed serves the false-positive check.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from backdoorlab.artifacts import RunDir
from backdoorlab.cli import main
from backdoorlab.data import load_dataset, stratified_indices
from backdoorlab.data.core import to_float
from backdoorlab.defenses import DEFENSES, DefenseJob, load_case, run_defense
from backdoorlab.defenses.cognitive_distillation import CognitiveDistillationParams, distill_masks
from backdoorlab.defenses.neural_cleanse import anomaly_indices
from backdoorlab.defenses.spectral_signatures import spectral_scores
from backdoorlab.defenses.view import limit
from backdoorlab.train.evaluate import features
from backdoorlab.errors import ConfigError, UnknownNameError
from backdoorlab.metrics.ranking import auroc
from backdoorlab.train.evaluate import predict

# ----------------------------------------------------------------------------- the defender's view


def test_heldout_split_is_stratified_disjoint_and_fixed(bn, case):
    view, truth = case
    test = load_dataset("mnist5k").test
    hold = stratified_indices(test.y, 200, 0)
    rest = ~torch.isin(torch.arange(len(test)), hold)
    assert torch.equal(view.heldout.x, test.x[hold]) and torch.equal(truth.evaluation.x, test.x[rest])  # disjoint, complete
    per_class = torch.bincount(view.heldout.y, minlength=10).double()
    assert bool(((per_class - 0.2 * torch.bincount(test.y, minlength=10)).abs() <= 1).all())
    assert torch.equal(load_case(bn)[0].heldout.x, view.heldout.x)
    assert not torch.equal(load_case(bn, heldout_seed=1)[0].heldout.x, view.heldout.x)


def test_delivered_training_set_is_the_poisoned_one(case):
    view, truth = case
    data, flag = view.inspected, truth.inspected_poisoned
    train = load_dataset("mnist5k").train
    assert view.inspected_source == "training-set" and int(flag.sum()) == round(0.1 * len(train))
    assert bool((data.y[flag] == 0).all()) and torch.equal(data.y[~flag], train.y[~flag])
    assert torch.equal(data.x[~flag], train.x[~flag]) and not torch.equal(data.x[flag], train.x[flag])
    sup = truth.trigger.mask.cpu()[0] > 0  # the patch is stamped on every poisoned sample
    patch = truth.trigger.pattern.cpu()[0][sup]
    assert torch.allclose(to_float(data.x[flag])[:, 0][:, sup], patch.expand(int(flag.sum()), -1), atol=1 / 255)
    # poisoned inputs: evaluation part only, non-target sources
    assert len(truth.poisoned) == int((truth.evaluation.y != 0).sum()) and bool((truth.poisoned_labels != 0).all())
    # the presented inputs: every clean evaluation image and every poisoned one, shuffled, unmarked
    assert len(view.inputs) == len(truth.evaluation) + len(truth.poisoned) == len(truth.inputs_poisoned)
    assert 0 < int(truth.inputs_poisoned[: len(truth.evaluation)].sum()) < len(truth.evaluation)  # mixed, not clean first


def test_saved_poisoned_test_images_are_used(bn, tmp_path, case):
    run = tmp_path / "with-poisoned-test"
    shutil.copytree(bn, run)
    rd = RunDir(run)
    t = rd.load_tensors("tensors.safetensors")
    test = load_dataset("mnist5k").test
    idx = torch.arange(0, len(test), 3)
    x = to_float(test.x[idx]).clone()
    x[:, :, :4, :4] = 1.0  # a different "trigger" than the saved one, to see which is used
    t["poisoned_test"] = (x * 255).round().to(torch.uint8)
    t["poisoned_test_index"] = idx
    rd.save_tensors("tensors.safetensors", t, {"trigger_kind": "mask-pattern"})
    _, truth = load_case(run)
    assert len(truth.poisoned) > 0 and bool((truth.poisoned[:, :, :4, :4] == 255).all())
    assert len(truth.poisoned) < len(case[1].poisoned)  # only the saved images that lie in the evaluation part


def test_neural_cleanse_anomaly_index_uses_the_reference_median():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    for n in (10, 11, 43):
        l1 = torch.rand(n, generator=g) * 100
        idx, med = anomaly_indices(l1)
        v = l1.double().numpy()
        ref_med = np.median(v)
        ref = np.abs(v - ref_med) / (1.4826 * np.median(np.abs(v - ref_med)))
        assert med == pytest.approx(ref_med) and np.allclose(idx.numpy(), ref, rtol=1e-5)
        assert (idx == 0).sum() == (n % 2)  # an even count has no label exactly at the median


def test_decisions_do_not_depend_on_the_ground_truth(bn, defend):
    """The defender's view holds no poison flag, target or trigger: with the ground truth shuffled
    (another target, permuted poison flags), every defense decides exactly the same, bit for bit,
    and only its scores move."""
    for name in DEFENSES.names():
        real, out = defend(bn, name, tag="real")
        fake, fake_out = defend(bn, name, truth_hook=lambda t: t.permuted(7), tag="permuted")
        assert (out / "decision.json").read_bytes() == (fake_out / "decision.json").read_bytes(), name
        if (out / "decision.safetensors").exists():
            a, b = RunDir(out).load_tensors("decision.safetensors"), RunDir(fake_out).load_tensors("decision.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert fake["target"] != real["target"]
        scored = {k for k in real if k not in json.loads((out / "decision.json").read_text()) and k not in ("seconds", "target")}
        assert any(real[k] != fake[k] for k in scored if isinstance(real[k], (int, float))), name  # the truth does reach the scoring


def test_defenses_on_an_attack_that_leaves_the_training_set_clean(bn, tmp_path, small_defense_params):
    """A test-time attack (as MMLM): no poison indices, only poisoned test images. Data-level
    defenses inspect the presented inputs, labelled as the model predicts them."""
    run = tmp_path / "test-time"
    shutil.copytree(bn, run)
    rd = RunDir(run)
    t = rd.load_tensors("tensors.safetensors")
    del t["poison_indices"]
    rd.save_tensors("tensors.safetensors", t, {"trigger_kind": "mask-pattern"})
    view, truth = load_case(run)
    assert view.inspected_source == "test-inputs" and torch.equal(view.inspected.x, view.inputs)
    assert torch.equal(view.inspected.y, predict(view.model, view.inputs))  # the model's labels, not η(y)
    assert torch.equal(truth.inspected_poisoned, truth.inputs_poisoned)
    for name in ("activation-clustering", "spectral-signatures"):
        m = run_defense(DefenseJob(name, str(run), params=small_defense_params[name]), tmp_path / name, progress=False)
        assert m["inspected"] == "test-inputs" and m["recall"] > 0
        if name == "activation-clustering":
            sizes = [r["size"] for r in m["per_class"]]
            assert sizes == torch.bincount(view.inspected.y, minlength=10).tolist()
            assert m["per_class"][0]["poisoned"] == int((truth.inputs_poisoned & (view.inspected.y == 0)).sum()) > 0
            from sklearn.metrics import adjusted_rand_score

            cluster = RunDir(tmp_path / name).load_tensors("decision.safetensors")["cluster"]
            zeros = view.inspected.y == 0
            assert m["ari"] == pytest.approx(adjusted_rand_score(truth.inputs_poisoned[zeros].numpy(), cluster[zeros].numpy()))
        else:
            assert m["auroc"] > 0.9  # within class 0 the stamped inputs stand out from the clean zeros


# ----------------------------------------------------------------------------- detection


def test_neural_cleanse_flags_the_target_and_not_the_clean_model(bn, defend):
    m, out = defend(bn, "neural-cleanse")
    assert m["flagged_labels"] == [0] and m["anomaly_index"] > 2 and m["smallest_l1_label"] == 0
    assert (out / m["plot"]).stat().st_size > 0
    c, _ = defend(bn, "neural-cleanse", model="clean")
    assert c["flagged_labels"] == [] and c["target_anomaly_index"] < 2
    assert m["l1"][0] < 0.5 * c["l1"][0]  # the backdoor's trigger is far smaller than a natural one


def test_strip_separates_poisoned_inputs(bn, defend):
    m, out = defend(bn, "strip")
    assert m["auroc"] >= 0.9 and m["far"] <= 0.1 and m["frr"] <= 0.05
    assert m["scored_clean"] == m["scored_poisoned"] == 150
    assert m["mean_entropy_poisoned"] < m["mean_entropy_clean"]
    assert (out / "strip_entropy.png").exists()


def test_activation_clustering_splits_clean_from_poison(bn, defend):
    m, out = defend(bn, "activation-clustering")
    assert m["ari"] >= 0.5 and m["inspected"] == "training-set"
    tgt = m["per_class"][0]
    assert tgt["poisoned"] == 400 and abs(tgt["relative_size"] - 0.5) < 0.1  # half the class is poison
    assert (out / "activation_clustering_tsne.png").exists()


def test_spectral_signatures(bn, case, defend):
    view, truth = case
    m, out = defend(bn, "spectral-signatures")
    data, flag = view.inspected, truth.inspected_poisoned
    counts = torch.bincount(data.y, minlength=10).tolist()
    assert m["removed_per_class"] == [math.ceil(1.5 * 0.1 * n) for n in counts]  # 1.5 x the assumed poison count
    assert (out / "spectral_signatures_hist.png").exists()
    # 10% of the training set is half of class 0: centred on the defender's clean held-out mean,
    # the poisons stand out (the target), while the paper's class-mean centring cannot
    # tell the two equal halves apart
    assert m["centre"] == "heldout" and m["auroc"] == m["auroc_heldout_centred"] >= 0.9
    assert m["auroc_class_centred"] < 0.8 and m["target_class_precision"] > 0.9  # what it removes there is poison
    mc, _ = defend(bn, "spectral-signatures", centre="class")
    assert mc["auroc"] == pytest.approx(m["auroc_class_centred"])
    # Tran et al.'s regime for the paper's centring: poisons about 10% of their class. How far it
    # ranks them above chance depends on the model: 0.72-0.96 over this fixture's seeds 0-2 in fp32
    # and bf16 training (session 7), so the bound is well above chance, not one model's value
    z = features(view.model, data.x)
    clean0 = torch.nonzero((data.y == 0) & ~flag).flatten()
    pois = torch.nonzero(flag).flatten()
    sel = torch.cat([clean0, pois[limit(len(pois), len(clean0) // 10, 0)]])
    s, f = spectral_scores(z[sel], data.y[sel], 10), flag[sel]
    assert auroc(s[~f], s[f]) >= 0.7
    # a class with fewer than two reference samples falls back to its own mean
    one = spectral_scores(z[sel], data.y[sel], 10, z[clean0[:1]], data.y[clean0[:1]])
    assert torch.allclose(one, s)


def test_cognitive_distillation_finds_small_output_preserving_masks(bn, case, defend):
    view, truth = case
    m, out = defend(bn, "cognitive-distillation")
    assert m["scored_clean"] == m["scored_poisoned"] == 48 and (out / "cognitive_distillation_l1.png").exists()
    held = RunDir(out).load_tensors("decision.safetensors")["heldout_scores"]
    assert len(held) == 200 and float((held < m["l1_threshold"]).float().mean()) <= 0.01 + 1 / 200  # 1% of held-out clean rejected
    x = torch.cat([truth.evaluation.x[:16], truth.poisoned[:16]])
    masks = distill_masks(view.model, x, CognitiveDistillationParams(steps=50), torch.Generator().manual_seed(0), view.device)
    assert masks.shape == (32, 1, 28, 28) and float(masks.mean()) < 0.5  # most of the image is dropped ...
    u = torch.rand(32, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    kept = predict(view.model, to_float(x) * masks + (1 - masks) * u) == predict(view.model, x)
    assert float(kept.float().mean()) >= 0.75  # ... and the prediction survives a random fill


class TriggerDominated(torch.nn.Module):
    """The backdoor Cognitive Distillation's paper describes: once the trigger is present, the output
    depends on the trigger alone (a fixed target-heavy logit vector); otherwise it is ``net``'s."""

    def __init__(self, net: torch.nn.Module, mask: torch.Tensor, pattern: torch.Tensor, target: int) -> None:
        super().__init__()
        self.net, self.target = net, target
        self.register_buffer("m", mask.float())
        self.register_buffer("p", pattern.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        err = ((x - self.p) * self.m).abs().flatten(1).sum(1) / self.m.sum()
        g = torch.sigmoid((0.25 - err) * 40)[:, None]
        fixed = torch.full((len(x), 10), -10.0, device=x.device)
        fixed[:, self.target] = 10.0
        return (1 - g) * self.net(x) + g * fixed


def test_cognitive_distillation_separates_a_backdoor_that_dominates_the_output(case):
    """Where the paper's premise holds (the trigger alone fixes the output), poisoned inputs get far
    smaller masks than clean ones; on the plain Digit-CNN BadNets model it does not hold (results §6)."""
    view, truth = case
    model = TriggerDominated(view.model, truth.trigger.mask, truth.trigger.pattern, truth.target).eval()
    x = torch.cat([truth.evaluation.x[:24], truth.poisoned[:24]])
    masks = distill_masks(model, x, CognitiveDistillationParams(steps=60), torch.Generator().manual_seed(0), view.device)
    l1 = masks.flatten(1).sum(1)
    assert auroc(-l1[:24], -l1[24:]) >= 0.9  # small mask = poisoned
    assert float(l1[24:].median()) < 0.5 * float(l1[:24].median())


def test_fine_pruning_curve_and_choice(bn, defend):
    m, out = defend(bn, "fine-pruning")
    c = m["curve"]
    assert c["fraction"][0] == 0 and c["fraction"][-1] == 1 and len(c["fraction"]) == m["channels"] + 1
    assert abs(c["clean_accuracy"][0] - m["clean_accuracy_before"]) < 1e-6
    assert abs(c["attack_success_rate"][0] - m["attack_success_rate_before"]) < 1e-6
    ok = [f for f, a in zip(c["fraction"], c["heldout_accuracy"]) if a >= c["heldout_accuracy"][0] - 0.05]
    assert m["pruned_fraction"] == max(ok)  # chosen from held-out accuracy only, never the ASR
    i = c["fraction"].index(m["pruned_fraction"])
    assert abs(c["clean_accuracy"][i] - m["clean_accuracy_pruned"]) < 1e-6  # the hook prunes what the curve measured
    assert c["heldout_accuracy"][-1] <= 0.2  # pruning every channel leaves no classifier
    assert m["clean_accuracy"] >= m["clean_accuracy_pruned"] - 0.05  # fine-tuning on clean data keeps accuracy
    assert (out / "fine_pruning_curve.png").exists()


# ----------------------------------------------------------------------------- CLI and bad input


def test_cli_defend_writes_metrics_config_and_plot(bn, tmp_path, capsys):
    out = tmp_path / "strip-cli"
    argv = ["defend", "strip", "--run", str(bn), "--out", str(out), "-p", "n_overlays=8", "--max-inputs", "20", "--quiet", "--json"]
    assert main(argv) == 0
    cfg, met = json.loads((out / "config.json").read_text()), json.loads((out / "metrics.json").read_text())
    assert cfg["defense"] == "strip" and cfg["params"]["n_overlays"] == 8 and cfg["heldout_fraction"] == 0.2 and cfg["max_inputs"] == 20
    assert met["scored_clean"] == 20 and met["defense"] == "strip" and (out / "strip_entropy.png").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["auroc"] == met["auroc"]
    assert main(argv) == 0 and json.loads((out / "metrics.json").read_text()) == met  # finished runs are kept
    assert set(DEFENSES.names()) >= {"activation-clustering", "cognitive-distillation", "fine-pruning", "neural-cleanse", "spectral-signatures", "strip"}


@pytest.mark.parametrize("kwargs, field", [
    ({"params": {"n_overlays": 0}}, "params.n_overlays"),
    ({"params": {"no_such": 1}}, "params.no_such"),
    ({"params": {"frr_target": 1.5}}, "params.frr_target"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ({"max_inputs": -1}, "max_inputs"),
    ({"model": "teacher"}, "model"),
])
def test_bad_config_names_the_field(bn, kwargs, field):
    with pytest.raises(ConfigError) as e:
        DefenseJob("strip", str(bn), **kwargs).build()
    assert e.value.field == field


def test_unknown_defense_and_missing_run(bn, tmp_path, capsys):
    with pytest.raises(UnknownNameError, match="strip"):
        DefenseJob("no-such-defense", str(bn)).build()
    with pytest.raises(ConfigError) as e:
        DefenseJob("strip", str(tmp_path / "nowhere")).build()
    assert e.value.field == "run"
    half = tmp_path / "unfinished"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a finished attack run"):
        DefenseJob("strip", str(half)).build()
    no_clean = tmp_path / "no-clean"
    shutil.copytree(bn, no_clean)
    (no_clean / "clean_model.safetensors").unlink()
    with pytest.raises(ConfigError) as e:
        DefenseJob("neural-cleanse", str(no_clean), model="clean").build()
    assert e.value.field == "model"
    assert main(["defend", "no-such-defense", "--run", str(bn), "--out", str(tmp_path / "x")]) == 2
    assert "unknown defense" in capsys.readouterr().err


def test_force_on_a_junk_model_keeps_the_finished_defense_run(bn, tmp_path, capsys):
    out = tmp_path / "strip-kept"
    argv = ["defend", "strip", "--out", str(out), "-p", "n_overlays=4", "--max-inputs", "10", "--quiet"]
    assert main([*argv, "--run", str(bn)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    junk = tmp_path / "junk-run"
    shutil.copytree(bn, junk)
    (junk / "model.safetensors").write_bytes(b"\x00not a model" * 20)
    assert main([*argv, "--run", str(junk), "--force"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cd_premise_benchmark_measures_both_protocols_and_the_objective(bn, repo_script):
    mod = repo_script("benchmarks", "bench_cd_premise")
    r = mod.study(bn, n=6, n_loss=4, fills=2)
    assert set(r["mean_l1"]) == set(r["l1"]) == {"test clean", "test poisoned", "train clean", "train poisoned"}
    l1 = {k: torch.tensor(v) for k, v in r["l1"].items()}
    assert all(len(v) == 6 and r["mean_l1"][k] == pytest.approx(float(v.mean())) for k, v in l1.items())
    assert r["auroc_test"] == auroc(-l1["test clean"], -l1["test poisoned"])  # small mask = poisoned
    assert r["auroc_train"] == auroc(-l1["train clean"], -l1["train poisoned"])
    for grp in ("test clean", "test poisoned"):
        t = r["terms"][grp]
        assert t["full"]["logit"] == 0.0 and t["full"]["l1"] == pytest.approx(0.01 * 28 * 28)  # the full mask keeps x exactly
        assert t["empty"]["l1"] == 0.0 and t["empty"]["logit"] > 0  # the empty mask costs only its logit change
        assert 0 < t["trigger region"]["l1"] < t["full"]["l1"]
        assert t["found"]["total"] == pytest.approx(t["found"]["logit"] + t["found"]["l1"] + t["found"]["tv"])
    assert "test poisoned" in mod.markdown([r]) and bn.name in mod.markdown([r])


def test_defense_benchmark_gives_grid_cells_with_one_folder_name_distinct_outputs(repo_script):
    from pathlib import Path

    mod = repo_script("benchmarks", "bench_defenses")
    cells = [Path(f"/r/cells/attack/{d}/digit-cnn/mmlm/s0") for d in ("mnist5k", "fashion-mnist")]
    assert mod.run_labels(cells) == ["mnist5k-digit-cnn-mmlm-s0", "fashion-mnist-digit-cnn-mmlm-s0"]
    assert mod.run_labels([Path("/t/bn40"), Path("/t/bn-r18")]) == ["bn40", "bn-r18"]  # distinct: the folder name
    assert len(set(mod.run_labels([Path("/t/a"), Path("/t/a")]))) == 2




def test_a_model_inspection_decision_is_made_once_per_model_and_reused(bn, tmp_path):
    """Two runs holding the same model (a grid's two MMLM entries) get Neural Cleanse's decision
    computed once: the second restores it, figures included; another seed or a data-level defense
    is never served from that cache."""
    cache = tmp_path / "cache"
    twin = tmp_path / "twin-run"
    shutil.copytree(bn, twin)  # another run folder, the same model bit for bit
    nc = {"max_images": 48, "max_epochs": 3}
    first = run_defense(DefenseJob("neural-cleanse", str(bn), params=nc, cache_dir=str(cache)), tmp_path / "a", progress=False)
    second = run_defense(DefenseJob("neural-cleanse", str(twin), params=nc, cache_dir=str(cache)), tmp_path / "b", progress=False)
    assert first["decision_reused"] is False and second["decision_reused"] is True
    assert json.loads((tmp_path / "a/decision.json").read_text()) == json.loads((tmp_path / "b/decision.json").read_text())
    for k in ("anomaly_index", "l1", "flagged_labels", "target_anomaly_index"):
        assert first[k] == second[k]
    assert (tmp_path / "b" / second["plot"]).stat().st_size > 0
    other = run_defense(DefenseJob("neural-cleanse", str(twin), params=nc, cache_dir=str(cache), seed=1), tmp_path / "c", progress=False)
    assert other["decision_reused"] is False
    ss = run_defense(DefenseJob("spectral-signatures", str(bn), cache_dir=str(cache)), tmp_path / "d", progress=False)
    assert "decision_reused" not in ss and len(list(cache.glob("decision-*"))) == 2


def test_an_input_detector_scores_the_heldout_data_once_per_model_with_the_same_decision(bn, tmp_path):
    """STRIP's held-out scores (its threshold's data) are computed once per model and restored with
    the generator's state after them: a run served from the cache decides bit for bit what it
    decides without the cache; another seed is not served."""
    from safetensors.torch import load_file

    cache, twin = tmp_path / "cache", tmp_path / "twin-run"
    shutil.copytree(bn, twin)
    p = {"n_overlays": 6}
    plain = run_defense(DefenseJob("strip", str(twin), params=p, max_inputs=40), tmp_path / "plain", progress=False)
    first = run_defense(DefenseJob("strip", str(bn), params=p, max_inputs=40, cache_dir=str(cache)), tmp_path / "a", progress=False)
    second = run_defense(DefenseJob("strip", str(twin), params=p, max_inputs=40, cache_dir=str(cache)), tmp_path / "b", progress=False)
    assert (first["heldout_scores_reused"], second["heldout_scores_reused"], plain["heldout_scores_reused"]) == (False, True, False)
    dec = [load_file(tmp_path / d / "decision.safetensors") for d in ("plain", "a", "b")]
    for k in ("scores", "heldout_scores", "rejected"):
        assert torch.equal(dec[0][k], dec[2][k]) and torch.equal(dec[0][k], dec[1][k])
    assert second["auroc"] == plain["auroc"] and second["entropy_threshold"] == plain["entropy_threshold"]
    other = run_defense(DefenseJob("strip", str(twin), params=p, max_inputs=40, cache_dir=str(cache), seed=3), tmp_path / "c", progress=False)
    assert other["heldout_scores_reused"] is False and len(list(cache.glob("decision-strip-heldout-*"))) == 2


def test_work_under_one_key_is_done_by_one_run_at_a_time(tmp_path):
    import threading
    import time

    from backdoorlab.defenses.memo import locked

    order: list[str] = []
    a_in = threading.Event()

    def a() -> None:
        with locked(tmp_path / "key"):
            a_in.set()
            time.sleep(0.3)
            order.append("a done")

    def b() -> None:
        a_in.wait()
        with locked(tmp_path / "key"):
            order.append("b")

    ts = [threading.Thread(target=f) for f in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert order == ["a done", "b"]
