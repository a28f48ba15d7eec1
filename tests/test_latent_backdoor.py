"""Latent Backdoor: bad input before any work, the trace wiped exactly, frozen layers kept, the
trigger's region, and one tiny whole run (stages on disk, resume, the student task for defenses)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from backdoorlab.attacks.latent_backdoor import FeatureMatching, LatentBackdoor, LatentBackdoorParams, attacker_set, trigger_mask
from backdoorlab.attacks.transfer import new_head, transfer, with_head
from backdoorlab.attacks.triggers import MaskPatternTrigger
from backdoorlab.cli import main
from backdoorlab.data.core import ImageSet, to_float
from backdoorlab.errors import ConfigError
from backdoorlab.jobs import AttackJob, run_attack
from backdoorlab.models import Arch, build_model
from backdoorlab.train.trainer import TrainConfig

ARCH = Arch("digit-cnn", 1, 5, (28, 28), 0.25)
TINY = {"train_per_class": 30, "target_images": 5, "trigger_steps": 5, "adjust_epochs": 1, "inject_epochs": 1, "student_epochs": 1, "trigger_batch_size": 32}


@pytest.mark.parametrize("params, field", [
    ({"kt": 4}, "params.kt"),
    ({"k": 9}, "params.k"),
    ({"target": 3}, "params.target"),
    ({"teacher_classes": []}, "params.teacher_classes"),
    ({"student_classes": [], "target": 9}, "params.student_classes"),
    ({"target_mode": "all-to-all"}, "params.target_mode"),
])
def test_bad_input_names_the_field_before_any_work(params, field, tmp_path):
    job = AttackJob(attack="latent-backdoor", params=params)
    with pytest.raises(ConfigError) as e:
        job.build()
    assert e.value.field == field
    out = tmp_path / "run"
    assert main(["attack", "latent-backdoor", "--out", str(out), "--quiet", *sum((["-p", f"{k}={json.dumps(v)}"] for k, v in params.items()), [])]) == 2
    assert not out.exists()


def test_bad_input_that_needs_the_data(mnist5k):
    with pytest.raises(ConfigError, match="target_images"):
        LatentBackdoor(LatentBackdoorParams(target_images=400)).check_data(mnist5k)
    with pytest.raises(ConfigError, match="trigger_size"):
        LatentBackdoor(LatentBackdoorParams(trigger_size=1.0)).check_data(mnist5k)
    LatentBackdoor(LatentBackdoorParams()).check_data(mnist5k)  # the defaults pass


def test_the_default_target_is_a_student_class():
    job = AttackJob(attack="latent-backdoor")
    attack = job.build()
    assert attack.p.target == 9 and attack.evaluation_target() == 4


def test_trace_wiping_restores_the_head_bit_for_bit():
    torch.manual_seed(0)
    teacher = build_model(ARCH)
    adjusted = new_head(teacher, 6, seed=1, keep_rows=True)
    assert torch.equal(adjusted.head.weight[:5], teacher.head.weight) and adjusted.head.weight.shape[0] == 6
    with torch.no_grad():  # the injection changes every layer
        for p_ in adjusted.parameters():
            p_.add_(torch.randn_like(p_))
    wiped = with_head(adjusted, teacher)
    assert wiped.arch == teacher.arch
    for k, v in teacher.state_dict().items():
        w = wiped.state_dict()[k]
        if k.startswith("stages.head."):
            assert torch.equal(w, v) and w.dtype == v.dtype  # exact
        else:
            assert torch.equal(w, adjusted.state_dict()[k]) and not torch.equal(w, v)


def test_student_keeps_the_first_k_layers_and_trains_the_rest(mnist5k):
    from backdoorlab.attacks.transfer import task_data

    torch.manual_seed(0)
    teacher = build_model(ARCH)
    task = task_data(mnist5k, (5, 6, 7, 8, 9), ":student", 0, train_per_class=20)
    assert task.spec.num_classes == 5 and sorted(task.train.y.unique().tolist()) == [0, 1, 2, 3, 4] and len(task.train) == 100
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, augment=False)
    for k in (2, 3):
        student, _ = transfer(teacher, task, k, cfg, seed=0, head_seed=1, device=torch.device("cpu"))
        for i, name in enumerate(student.stage_names[:-1]):
            same = all(torch.equal(a, b) for a, b in zip(student.stages[name].parameters(), teacher.stages[name].parameters()))
            assert same == (i < k), (k, name)
        assert not torch.equal(student.head.weight, teacher.head.weight)


def test_trigger_mask_is_the_bottom_right_square():
    m = trigger_mask((1, 28, 28), 0.2, 1)
    rows, cols = torch.nonzero(m[0], as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (21, 26, 21, 26)  # 6x6, 1 px from the border
    assert abs(float(m.mean()) - 36 / 784) < 1e-6
    x = torch.rand(4, 1, 28, 28)
    y = MaskPatternTrigger(m, torch.ones(1, 28, 28) * m).apply(x)
    changed = (y != x).any(0)[0]
    assert bool(changed[m[0] == 0].any()) is False and bool((y[:, :, 21:27, 21:27] == 1).all())


def test_injection_loss_pulls_triggered_features_to_the_target():
    x = 0.2 * torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 3
    target_x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    target_x[..., :14] = 1.0  # the target's images look nothing like the others
    trig = MaskPatternTrigger(trigger_mask((1, 28, 28), 0.2, 1), torch.ones(1, 28, 28))
    final = {}
    for weight in (0.0, 5.0):  # the same start, with and without the feature term
        torch.manual_seed(0)
        model = build_model(replace(ARCH, num_classes=3, width=0.5))
        hooks = FeatureMatching(trig, 3, target_x, weight=weight)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(15):
            loss, out = hooks.loss(model, x, y, torch.arange(32), None)
            assert out.shape == (32, 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[weight] = float(hooks._dist[-1])
    assert final[5.0] < 0.5 * final[0.0]


def test_attacker_set_balances_the_target_class():
    train = ImageSet(torch.zeros(100, 1, 28, 28, dtype=torch.uint8), torch.arange(100) % 5)
    s = attacker_set(train, torch.zeros(4, 1, 28, 28, dtype=torch.uint8))
    assert int((s.y == 5).sum()) == 20 and len(s) == 120


def test_whole_run_stages_resume_and_student_task(tmp_path):
    out = tmp_path / "run"
    job = AttackJob(attack="latent-backdoor", width=0.25, train={"epochs": 1, "batch_size": 32}, params=dict(TINY), audit=True)
    m = run_attack(job, out, progress=False)
    stages = out / "stages"
    for name in ("1-teacher", "2-adjusted", "2-trigger", "3-injected", "4-infected-teacher", "5-student", "5-clean-student"):
        assert (stages / f"{name}.safetensors").exists() and (stages / f"{name}.json").exists(), name
    assert (stages / "6-evaluation.json").exists() and (out / "clean_model.safetensors").exists()
    assert m["head_restored_exactly"] is True and m["frozen_layers_unchanged"] is True
    assert m["clean_accuracy"] == pytest.approx(m["student_accuracy"]) and m["attack_success_rate"] == pytest.approx(m["attack_success_rate_student"])
    assert m["clean_accuracy_before"] == pytest.approx(m["clean_teacher_student_accuracy"])
    assert m["attack_success_rate_clean_model"] == pytest.approx(m["clean_teacher_student_asr"])
    # resume: an interrupted run (no metrics.json) reads its finished stages back
    before = {p.name: p.stat().st_mtime_ns for p in stages.glob("*.safetensors")}
    (out / "metrics.json").unlink()
    m2 = run_attack(job, out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in stages.glob("*.safetensors")} == before
    assert m2["attack_success_rate"] == m["attack_success_rate"]
    # the defenses see the student task: 5 classes, the target renumbered, the clean-teacher student as control
    from backdoorlab.defenses.view import load_case

    view, truth = load_case(out, "backdoored", max_inputs=50)
    assert view.spec.num_classes == 5 and truth.target == 4 and view.model.arch.num_classes == 5
    assert truth.attack_success_rate(view.model) == pytest.approx(m["attack_success_rate"], abs=0.05)
    cview, _ = load_case(out, "clean", max_inputs=50)
    from backdoorlab.artifacts import load_model

    control = load_model(stages / "5-clean-student.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(cview.model.state_dict().values(), control.state_dict().values()))
    assert to_float(view.inputs).shape[1:] == (1, 28, 28)
