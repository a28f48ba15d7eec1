"""Input blurring and multi-layer tuning (the Latent Backdoor paper's defenses): the Gaussian,
the operating point chosen from held-out data only, and both on a tiny latent-backdoor run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.data.core import ImageSet, to_float
from backdoorlab.defenses import DEFENSES, DefenseJob, run_defense
from backdoorlab.defenses.input_blurring import InputBlurring, InputBlurringParams, blur, gaussian_kernel
from backdoorlab.defenses.view import DefenderView, GroundTruth
from backdoorlab.errors import ConfigError
from backdoorlab.jobs import AttackJob, run_attack


def test_gaussian_kernel_follows_the_opencv_rule():
    for k, sigma in ((3, 0.8), (5, 1.1), (7, 1.4)):
        g = gaussian_kernel(k)
        r = torch.arange(k) - (k - 1) / 2
        ref = torch.exp(-(r**2) / (2 * sigma**2))
        assert torch.allclose(g, ref / ref.sum(), atol=1e-6) and abs(float(g.sum()) - 1) < 1e-6
    x = torch.rand(2, 3, 9, 9)
    assert torch.equal(blur(x, 1), x)
    assert torch.allclose(blur(torch.full((1, 1, 8, 8), 0.3), 5), torch.full((1, 1, 8, 8), 0.3), atol=1e-6)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float()[None, None]
    assert float(blur(checker, 3).std()) < 0.5 * float(checker.std())


class PatchDetector(nn.Module):
    """Class 1 when the bottom-right 4x4 corner holds a sharp checkerboard (a high-frequency
    trigger), else class 0: blurring removes the trigger and leaves the clean inputs alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        x = to_float(x)
        patch = x[:, 0, -5:-1, -5:-1]
        contrast = (patch[:, 1:, :] - patch[:, :-1, :]).abs().mean((1, 2))
        return torch.stack([0.3 - contrast, contrast - 0.3], 1) + 0 * self.w


def _case(n=40):
    g = torch.Generator().manual_seed(0)
    clean = (torch.rand(n, 1, 16, 16, generator=g) * 40).to(torch.uint8)  # dark, smooth-ish
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 * 255).to(torch.uint8)
    pois = clean.clone()
    pois[:, 0, -5:-1, -5:-1] = checker
    y = torch.zeros(n, dtype=torch.long)
    spec = type("S", (), {"num_classes": 2})()
    view = DefenderView(PatchDetector(), spec, ImageSet(clean[: n // 2], y[: n // 2]), torch.cat([clean, pois]), ImageSet(clean, y), "test-inputs", torch.device("cpu"))
    truth = GroundTruth(1, "all-to-one", 2, ImageSet(clean[n // 2 :], y[n // 2 :]), pois[n // 2 :], y[n // 2 :], torch.zeros(n, dtype=torch.bool), torch.zeros(2 * n, dtype=torch.bool))
    return view, truth


def test_blurring_breaks_a_sharp_trigger_and_picks_its_kernel_without_the_asr():
    view, truth = _case()
    d = InputBlurring(InputBlurringParams(kernel_sizes=(1, 3, 5), max_accuracy_drop=0.0)).decide(view)
    assert d["kernel_size"] == 5 and d["heldout_accuracy"] == [1.0, 1.0, 1.0]  # no clean input suffers, so the strongest
    m = InputBlurring(InputBlurringParams(kernel_sizes=(1, 3, 5), max_accuracy_drop=0.0)).score(view, d, truth)
    assert m["curve"]["attack_success_rate"][0] == 1.0 and m["attack_success_rate"] == 0.0 and m["clean_accuracy"] == 1.0
    assert m["kernel_asr_below"] == 3
    # decide never sees the truth: the same view gives the same decision
    d2 = InputBlurring(InputBlurringParams(kernel_sizes=(1, 3, 5), max_accuracy_drop=0.0)).decide(view)
    assert d2 == d


@pytest.mark.parametrize("params, field", [({"kernel_sizes": [4]}, "params.kernel_sizes"), ({"kernel_sizes": []}, "params.kernel_sizes"),
                                           ({"max_accuracy_drop": 2}, "params.max_accuracy_drop")])
def test_blurring_bad_input(params, field):
    with pytest.raises(ConfigError) as e:
        DefenseJob("input-blurring", "nowhere", params=params).build(check=False)
    assert e.value.field == field


def test_multi_layer_tuning_bad_input():
    for params, field in (({"frozen": [-1]}, "params.frozen"), ({"validation_fraction": 1.0}, "params.validation_fraction"), ({"epochs": 0}, "params.epochs")):
        with pytest.raises(ConfigError) as e:
            DefenseJob("multi-layer-tuning", "nowhere", params=params).build(check=False)
        assert e.value.field == field


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lb") / "run"
    params = {"train_per_class": 30, "target_images": 5, "trigger_steps": 5, "adjust_epochs": 1, "inject_epochs": 1, "student_epochs": 1, "trigger_batch_size": 32}
    run_attack(AttackJob(attack="latent-backdoor", width=0.25, train={"epochs": 1, "batch_size": 32}, params=params), out, progress=False)
    return out


def test_both_defenses_run_on_a_latent_backdoor_student(tiny_run, tmp_path):
    mb = run_defense(DefenseJob("input-blurring", str(tiny_run), params={"kernel_sizes": [1, 3, 5]}, max_inputs=100), tmp_path / "blur", progress=False)
    assert len(mb["curve"]["kernel_size"]) == 3 and mb["kernel_size"] in (1, 3, 5)
    assert mb["curve"]["attack_success_rate"][0] == pytest.approx(mb["attack_success_rate_before"])
    assert (tmp_path / "blur" / "input_blurring_curve.png").exists()
    mt = run_defense(DefenseJob("multi-layer-tuning", str(tiny_run), heldout_fraction=0.3, params={"epochs": 1}, max_inputs=100), tmp_path / "tune", progress=False)
    assert mt["curve"]["frozen"] == [0, 1, 2, 3] and mt["frozen_layers"] in (0, 1, 2, 3)
    assert len(mt["curve"]["attack_success_rate"]) == 4 and all(0.0 <= a <= 1.0 for a in mt["curve"]["clean_accuracy"])
    assert mt["tuning_size"] + mt["validation_size"] == mt["heldout_size"]
    with pytest.raises(ConfigError, match="frozen"):
        run_defense(DefenseJob("multi-layer-tuning", str(tiny_run), params={"frozen": [4], "epochs": 1}, max_inputs=20), tmp_path / "bad", progress=False)


def test_tuning_keeps_the_frozen_layers(tiny_run):
    from backdoorlab.defenses.view import load_case

    view, _ = load_case(tiny_run, max_inputs=20, heldout_fraction=0.3)
    d = DEFENSES.get("multi-layer-tuning")(DEFENSES.get("multi-layer-tuning").Params(frozen=(1, 3), epochs=1)).decide(view)
    for j, m in zip(d["frozen"], d["_models"]):
        for i, name in enumerate(m.stage_names[:-1]):
            same = all(torch.equal(a, b) for a, b in zip(m.stages[name].parameters(), view.model.stages[name].parameters()))
            assert same == (i < j), (j, name)
