"""Every attack's default recipe (issue 17): valid, reaching the job's training config, listed by
``backdoorlab attacks``. No training here; the measured defaults are benchmarks/bench_defaults.py's."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from backdoorlab.attacks import ATTACKS
from backdoorlab.cli import main
from backdoorlab.jobs import AttackJob
from backdoorlab.recipes import train_config
from backdoorlab.train.trainer import TrainConfig

TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_default_recipe_reaches_the_default_command(name: str) -> None:
    cls = ATTACKS.get(name)
    recipe = cls.recipe_for("mnist5k")
    assert set(recipe) <= TRAIN_FIELDS, f"{name}: recipe keys that are no TrainConfig field: {set(recipe) - TRAIN_FIELDS}"
    cfg = train_config("mnist5k", "digit-cnn", recipe)  # validated like a user's --train values
    job = AttackJob(dataset="mnist5k", seed=0, attack=name)  # what `backdoorlab attack NAME` builds
    job.build()
    got = asdict(job.validate())
    assert got == asdict(cfg)
    for k, v in recipe.items():
        assert got[k] == v
    # the user's own values still win over the attack's recipe
    assert AttackJob(dataset="mnist5k", seed=0, attack=name, train={"epochs": 3}).validate().epochs == 3


def test_wb_and_lira_train_in_float32_unless_told_otherwise() -> None:
    # under bf16 autocast WB's default command fell to 85.3% ASR on MNIST-5k (docs/results.md §14)
    for name in ("wb", "lira"):
        for dataset in ("mnist5k", "fashion-mnist"):
            assert AttackJob(dataset=dataset, attack=name).validate().amp == "off"
        assert AttackJob(attack=name, train={"amp": "on"}).validate().amp == "on"
    assert AttackJob(attack="badnets").validate().amp == "auto"


def test_attacks_command_lists_each_recipe_and_default_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attacks"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert set(rows) == set(ATTACKS.names())
    for name, cls in ATTACKS.items():
        for dataset, r in cls.recipe.items():
            assert f"{dataset}: " + ", ".join(f"{k} {v}" for k, v in r.items()) in rows[name]
        rate = getattr(cls.Params(), "poison_rate", None)
        if rate is not None:
            assert f" {100 * rate:g}% " in rows[name]
