"""The one PGD routine and the 8-bit delivery of its images: budget, keep-best, early stop, rounding."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.errors import ConfigError
from backdoorlab.optim import PGDConfig, pgd, quantize


def _target_loss(goal: torch.Tensor):
    return lambda xa, idx: (xa - goal[idx]).flatten(1).norm(dim=1)


def test_pgd_stays_in_the_budget_and_the_image_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 6, 6, generator=g)
    goal = torch.rand(16, 1, 6, 6, generator=g) * 3 - 1  # far outside the ball and outside [0, 1]
    for eps in (0.0, 0.03, 0.2):
        adv = pgd(x, _target_loss(goal), PGDConfig(epsilon=eps, steps=20, random_start=True), generator=g)
        assert float((adv - x).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    # with enough steps it reaches the projection of the goal onto the feasible box
    adv = pgd(x, _target_loss(goal), PGDConfig(epsilon=0.2, steps=200, step_size=0.01))
    proj = torch.minimum(torch.maximum(goal, x - 0.2), x + 0.2).clamp(0, 1)
    assert torch.allclose(adv, proj, atol=0.011)


def test_pgd_keeps_the_best_iterate_per_sample():
    x = torch.zeros(2, 1, 1, 1)
    # the loss is lowest at δ = 0.05; signed steps of 0.04 visit 0, 0.04 and end on 0.08 (overshoot)
    loss = lambda xa, idx: (xa.flatten(1)[:, 0] - 0.05).abs() + torch.tensor([0.0, 1.0])[idx]  # noqa: E731
    best = pgd(x, loss, PGDConfig(epsilon=0.3, steps=2, step_size=0.04, keep_best=True))
    last = pgd(x, loss, PGDConfig(epsilon=0.3, steps=2, step_size=0.04, keep_best=False))
    assert torch.allclose(best.flatten(), torch.tensor([0.04, 0.04]))  # the iterate closest to 0.05
    assert torch.allclose(last.flatten(), torch.tensor([0.08, 0.08]))  # the last iterate


def test_pgd_early_stop_freezes_the_samples_that_succeeded():
    x = torch.zeros(3, 1, 1, 1)
    loss = lambda xa, idx: -xa.flatten(1)[:, 0]  # noqa: E731  (push every value up)
    stop_at = torch.tensor([0.1, 0.25, 9.0])  # the third never succeeds
    done = lambda xa, idx: xa.flatten(1)[:, 0] >= stop_at[idx] - 1e-9  # noqa: E731
    out = pgd(x, loss, PGDConfig(epsilon=0.5, steps=50, step_size=0.05, early_stop=done)).flatten()
    assert torch.allclose(out, torch.tensor([0.1, 0.25, 0.5]), atol=1e-6)  # the first success, and the budget


def test_pgd_rejects_a_bad_budget():
    with pytest.raises(ConfigError, match="epsilon"):
        PGDConfig(epsilon=1.5)
    with pytest.raises(ConfigError, match="steps"):
        PGDConfig(steps=0)


def test_quantize_rounds_inside_the_budget():
    c = torch.tensor([[[[10, 200, 0, 255]]]], dtype=torch.uint8)
    eps = 3.6 / 255  # three levels and a bit: rounding x + ε would reach four
    adv = c.float() / 255 + torch.tensor([[[[eps, -eps, -eps, 0.4 / 255]]]])
    q = quantize(c, adv, eps)
    assert q.dtype == torch.uint8 and q.flatten().tolist() == [13, 197, 0, 255]
    assert int((q.int() - c.int()).abs().max()) <= int(eps * 255)
    assert torch.equal(quantize(c, c.float() / 255, 0.0), c)
