"""Defenses on one small BadNets run (``bn`` in conftest.py, made once per session): the defenses the WB, Latent Backdoor and SIBA papers use (issue 16).

The run: MNIST-5k, digit-cnn at width 0.5, 3 epochs without augmentation, 10% of the training set
poisoned (target 0); its clean model of the same seed serves the false-positive check.
"""

from __future__ import annotations

import json

import pytest
import torch

from backdoorlab.artifacts import RunDir
from backdoorlab.data.core import to_float
from backdoorlab.defenses import DefenseJob, load_case, run_defense
from backdoorlab.train.evaluate import predict


# ----------------------------------------------------------------------------- SCALE-UP, Grad-CAM, SentiNet (issue 16)


def test_scale_up_scores_and_threshold(bn, case, defend):
    from backdoorlab.defenses.scale_up import scaled_consistency

    view, truth = case
    x = truth.poisoned[:5]
    hard = scaled_consistency(view.model, x, (3, 7), False, 2, view.device)
    soft = scaled_consistency(view.model, x, (3, 7), True, 2, view.device)
    label = predict(view.model, x)
    for i in range(5):  # the batched scores are the per-image definition
        copies = torch.stack([(n * to_float(x[i])).clamp(0, 1) for n in (3, 7)])
        with torch.no_grad():
            out = view.model(copies)
        prob = torch.softmax(out, 1)[:, label[i]]
        assert hard[i] == float((out.argmax(1) == label[i]).float().mean())
        assert soft[i] == pytest.approx(float(prob.mean()), abs=1e-5)
    m, out = defend(bn, "scale-up")
    held = RunDir(out).load_tensors("decision.safetensors")["heldout_scores"]
    assert float((held > m["consistency_threshold"]).float().mean()) <= 0.01  # ties at the top reject fewer
    # near-binary digits: scaling saturates the strokes, clean digits keep their label too (results §12)
    assert m["mean_consistency_clean"] > 0.9 and m["mean_consistency_poisoned"] >= m["mean_consistency_clean"]
    s, out = defend(bn, "scale-up", score="soft")
    assert s["auroc"] >= 0.9 and s["mean_consistency_poisoned"] > s["mean_consistency_clean"]
    assert (out / "scale_up_consistency.png").exists()


def test_grad_cam_points_at_the_patch(case):
    from backdoorlab.models.gradcam import grad_cam

    view, truth = case
    x = to_float(truth.poisoned[:32])
    cam = grad_cam(view.model, x)
    assert cam.shape == (32, 28, 28) and float(cam.min()) >= 0 and torch.allclose(cam.flatten(1).amax(1), torch.ones(32))
    patch = truth.trigger.mask.cpu()[0] > 0
    near = torch.nn.functional.max_pool2d(patch[None, None].float(), 7, 1, 3)[0, 0] > 0  # the patch and 3 px around it
    assert float(cam[:, near].mean()) > 2 * float(cam[:, ~near].mean())  # the target label rests on the patch
    clean = grad_cam(view.model, to_float(truth.evaluation.x[:32]))
    assert float(clean[:, near].mean()) < float(cam[:, near].mean())
    y = torch.full((32,), 3)  # another class explained: another map
    assert not torch.allclose(grad_cam(view.model, x, y), cam)


def test_sentinet_separates_patched_inputs(bn, defend):
    m, out = defend(bn, "sentinet")
    assert m["auroc"] >= 0.9 and m["scored_clean"] == m["scored_poisoned"] == 60
    assert m["mean_fooled_poisoned"] > 0.8 and m["mean_fooled_clean"] < 0.3  # the patch carries its label along
    dec = json.loads((out / "decision.json").read_text())
    held = RunDir(out).load_tensors("decision.safetensors")
    assert len(dec["boundary"]) in (3, 5) and dec["boundary"][0] <= dec["boundary"][1] and float((held["heldout_scores"] > m["above_boundary_threshold"]).float().mean()) <= 0.01 + 1 / 200
    for f in ("sentinet_scores.png", "sentinet_fooled_avgconf.png", "sentinet_gradcam.png"):
        assert (out / f).stat().st_size > 0


# ----------------------------------------------------------------------------- ABL, MNTD (issue 16)


def test_abl_isolates_the_poison_and_unlearns_it(bn, defend):
    m, out = defend(bn, "abl", tag="full", isolation_epochs=5, retrain_epochs=1, unlearning_epochs=2)
    assert m["isolated_count"] == 40 and m["isolation_precision"] >= 0.9  # BadNets samples are learned first
    assert m["isolation_recall"] == pytest.approx(m["isolation_precision"] * 40 / 400)
    iso = RunDir(out).load_tensors("decision.safetensors")
    losses = iso["losses_after_isolation"]
    assert torch.equal(iso["isolated"], torch.sort(losses, stable=True).indices[:40].sort().values)  # the lowest losses
    acc = m["unlearning_isolated_accuracy"]
    assert 1 <= len(acc) <= 2 and (len(acc) == 2 or acc[0] <= 0.1) and 0.0 <= m["clean_accuracy"] <= 1.0  # stops once unlearned
    assert (out / "abl_losses.png").exists()


def test_abl_losses_ascend_below_gamma_and_on_the_isolated_samples(case):
    from backdoorlab.data.core import ImageSet
    from backdoorlab.defenses.abl import IsolationLoss, Unlearning
    from backdoorlab.train.trainer import Forward

    view, truth = case
    model = view.copy_model().train()
    fwd = Forward(model, 0)
    x, y = to_float(truth.poisoned[:16]), torch.zeros(16, dtype=torch.long)  # learned: CE far below γ
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x), y)
    low, _ = IsolationLoss(float(ce) + 1.0).loss(model, x, y, y, fwd)
    high, _ = IsolationLoss(float(ce) / 2).loss(model, x, y, y, fwd)
    assert float(low.detach()) == pytest.approx(-float(ce), rel=1e-5) and float(high.detach()) == pytest.approx(float(ce), rel=1e-5)
    alone, _ = Unlearning(1.0, ImageSet(x[:0].to(torch.uint8), y[:0]), 0, view.spec, False, 0).loss(model, x, y, y, fwd)
    alone = alone.detach()
    assert float(alone) == pytest.approx(-float(ce), rel=1e-5)
    hot, _ = Unlearning(10.0, ImageSet(x[:0].to(torch.uint8), y[:0]), 0, view.spec, False, 0).loss(model, x, y, y, fwd)
    with torch.no_grad():
        ref = float(torch.nn.functional.cross_entropy(model(x) / 10, y))
    assert float(hot.detach()) == pytest.approx(-ref, rel=1e-5) and float(hot.detach()) < float(alone)


def test_a_hook_can_end_training_after_an_epoch(mnist5k):
    from backdoorlab.data.core import ImageSet
    from backdoorlab.models import build_model
    from backdoorlab.train.trainer import TrainConfig, TrainHooks, train

    class StopAtTwo(TrainHooks):
        def end_epoch(self, model, epoch, record):
            record["stop"] = epoch == 2

    model = build_model("digit-cnn", mnist5k.spec, 0.25)
    hist = train(model, ImageSet(mnist5k.train.x[:32], mnist5k.train.y[:32]), mnist5k.spec, TrainConfig(epochs=5, batch_size=16), hooks=StopAtTwo(), progress=False)
    assert [r["epoch"] for r in hist.epochs] == [1, 2] and hist.epochs[-1]["stop"]


def test_model_stack_trains_each_model_as_alone(mnist5k):
    from backdoorlab.data.core import ImageSet
    from backdoorlab.defenses.mntd import jumbo_triggers, train_models
    from backdoorlab.models import arch_for

    arch = arch_for("digit-cnn", mnist5k.spec, 0.25)
    data = ImageSet(mnist5k.train.x[:96], mnist5k.train.y[:96])
    trig, targets, rates = jumbo_triggers(3, mnist5k.spec.shape, 10, torch.Generator().manual_seed(0))
    assert trig.mask.shape == (3, 1, 1, 28, 28) and bool(((rates >= 0.05) & (rates <= 0.5)).all())
    for i in range(3):
        m = trig.mask[i, 0, 0]
        blend = bool((m == m[0, 0]).all())  # a full-image blend, or a 2-5 px binary patch
        assert (0.05 <= float(m[0, 0]) <= 0.2) if blend else (4 <= int((m > 0).sum()) <= 25 and bool(((trig.pattern[i][0, 0][m > 0] == 0) | (trig.pattern[i][0, 0][m > 0] == 1)).all()))
    rates[0] = 0.0  # model 0 clean
    both = train_models(arch, data, mnist5k.spec, 2, 3, trig, targets, rates, 0, torch.device("cpu"))
    alone = train_models(arch, data, mnist5k.spec, 2, 1, trig, targets, rates, 0, torch.device("cpu"))
    for k in both:  # the summed loss gives each model exactly its own gradient
        assert torch.allclose(both[k][0], alone[k][0], atol=1e-6), k
    assert not torch.allclose(both["stages.head.weight"][0], both["stages.head.weight"][1])


def test_mntd_caches_the_shadow_set_and_scores_models(bn, case, tmp_path):
    import time

    from backdoorlab.defenses.mntd import MNTDParams, cache_key

    cache = tmp_path / "cache"
    params = {"shadow_models": 4, "shadow_epochs": 3, "shadow_batch": 4, "meta_steps": 100}
    m = run_defense(DefenseJob("mntd", str(bn), params=params, cache_dir=str(cache)), tmp_path / "first", progress=False)
    assert not m["shadow_reused"] and sorted(p.name.split("-")[1] for p in cache.iterdir() if not p.name.startswith(".")) == ["meta", "shadows"]
    assert (cache / f"mntd-shadows-{m['shadow_key']}.safetensors").exists()
    assert m["meta_train_accuracy"] >= 0.75 and 0.0 <= m["meta_score"] <= 1.0 and m["flagged"] == (m["meta_score"] > 0.5)
    t0 = time.perf_counter()
    c = run_defense(DefenseJob("mntd", str(bn), "clean", params=params, cache_dir=str(cache)), tmp_path / "clean", progress=False)
    assert c["shadow_reused"] and c["shadow_key"] == m["shadow_key"] and c["meta_train_accuracy"] == m["meta_train_accuracy"]
    q1, q2 = (RunDir(tmp_path / d).load_tensors("decision.safetensors")["queries"] for d in ("first", "clean"))
    assert torch.equal(q1, q2) and c["meta_loss_last"] == pytest.approx(m["meta_loss_last"])  # the cached meta-classifier
    assert time.perf_counter() - t0 < m["seconds"]  # scoring another model skips the shadow training
    assert json.loads((tmp_path / "first" / "config.json").read_text()).get("cache_dir") is None  # a cache is not part of the run
    view = case[0]
    p = MNTDParams(**params)
    key = cache_key(view.model.arch, view.heldout, p, 0)
    assert key == m["shadow_key"] != cache_key(view.model.arch, load_case(bn, heldout_seed=1)[0].heldout, p, 0)  # other defender data
    assert key != cache_key(view.model.arch, view.heldout, MNTDParams(**{**params, "shadow_epochs": 4}), 0)
    assert key == cache_key(view.model.arch, view.heldout, MNTDParams(**{**params, "meta_steps": 7}), 0)  # the meta-classifier is not cached


def test_mntd_benchmark_trains_suspects_like_the_shadows_on_training_images(bn, case, repo_script, tmp_path):
    mod = repo_script("benchmarks", "bench_mntd")
    params = {"shadow_models": 2, "shadow_epochs": 1, "shadow_batch": 2, "meta_steps": 2}
    r = mod.study(bn, tmp_path / "b", suspects=1, epochs=1, params=params, cache_dir=tmp_path / "cache", suspect_data="train-subset")
    assert r["suspect_train_size"] == r["heldout_size"] == len(case[0].heldout) == 200  # the shadows' data size ...
    assert len(r["scores_clean"]) == len(r["scores_backdoored"]) == 1 and 0.0 <= r["auroc"] <= 1.0
    h = mod.study(bn, tmp_path / "h", suspects=1, epochs=1, params=params, cache_dir=tmp_path / "cache", suspect_data="heldout", heldout_fraction=0.3)
    assert h["heldout_size"] == h["suspect_train_size"] == 300 and not h["shadow_reused"]  # other defender data: other shadows
    assert (tmp_path / "b" / "mntd.json").exists() and (tmp_path / "b" / "mntd_scores.png").exists()
