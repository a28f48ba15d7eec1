import json
import subprocess
import sys
from pathlib import Path

import pytest

from backdoorlab.cli import main

FAST = ["--dataset", "digits", "--epochs", "8", "--batch-size", "32", "--quiet", "--width", "0.5"]


def test_lists(capsys):
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.data import DATASETS
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.models import MODELS

    for cmd, reg in (("datasets", DATASETS), ("models", MODELS), ("attacks", ATTACKS), ("defenses", DEFENSES)):
        assert main([cmd]) == 0
        rows = capsys.readouterr().out.splitlines()
        assert rows[0].split()[0] == "name" and sorted(r.split()[0] for r in rows[1:]) == reg.names()  # one row per entry


def test_train_writes_metrics_and_is_not_redone(tmp_path, capsys):
    out = tmp_path / "clean"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.5 < m["clean_accuracy"] <= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["epochs"] == 8 and cfg["dataset"] == "digits"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["train", *FAST, "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "mode, extra, want",
    [
        ("all-to-one", ["--epochs", "10", "-p", "patch_size=2"], 0.8),
        # all-to-all must learn C different mappings from the same patch: more poison, more epochs
        ("all-to-all", ["--epochs", "15", "-p", "patch_size=3", "--poison-rate", "0.2"], 0.5),
    ],
)
def test_badnets_end_to_end(tmp_path, mode, extra, want):
    out = tmp_path / mode
    assert main(["attack", "badnets", *FAST, *extra, "--target-mode", mode, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["clean_accuracy"] > 0.6
    assert m["attack_success_rate"] > want and m["attack_success_rate"] > m["attack_success_rate_clean_model"] + 0.4
    for f in ("model.safetensors", "clean_model.safetensors", "tensors.safetensors", "samples.png", "config.json"):
        assert (out / f).exists()


def test_badnets_restricted_to_head_changes_only_the_head(tmp_path):
    out = tmp_path / "head"
    assert main(["attack", "badnets", *FAST, "--restrict", "head", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["changed_parameters_outside_head"] == 0 and m["outside_head_bitwise_equal"] is True
    assert 0 < m["changed_parameters"] <= 10 * 512 * 0.5 + 10


@pytest.mark.parametrize(
    "args, field",
    [
        (["attack", "nope"], "unknown attack 'nope'"),
        (["attack", "badnets", "--target", "10"], "params.target: class 10 is out of range"),
        (["attack", "badnets", "--poison-rate", "0"], "params.poison_rate"),
        (["attack", "badnets", "--poison-rate", "1.5"], "params.poison_rate"),
        (["attack", "badnets", "--dataset", "imagenet21k"], "unknown dataset"),
        (["attack", "badnets", "--model", "gpt"], "unknown model"),
        (["attack", "badnets", "-p", "colour=red"], "params.colour: unknown parameter"),
        (["train", "--train", "optimizer=lbfgs"], "train.optimizer"),
        (["attack", "badnets", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
    ],
)
def test_bad_input_fails_fast_with_named_field(tmp_path, capsys, args, field):
    out = tmp_path / "o"
    assert main([*args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert field in err
    assert not (out / "model.safetensors").exists()


def test_bad_dataset_with_force_keeps_the_finished_run(tmp_path, capsys):
    """--force on a finished run empties its folder only once the new inputs have loaded."""
    out = tmp_path / "clean"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (broken / name).write_bytes(b"\x00\x00\x08\x03garbage")  # right magic, truncated header
    assert main(["train", "--dataset", "mnist", "--data-root", str(broken), "--quiet", "--force", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken" in err and "train-images-idx3-ubyte" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # an attack never takes over a train run's folder, even with --force
    assert main(["attack", "badnets", "--dataset", "mnist", "--data-root", str(broken), "--quiet", "--force", "--out", str(out)]) == 2
    assert "holds a train run, not an attack run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fresh = tmp_path / "fresh"
    assert main(["attack", "badnets", "--dataset", "mnist", "--data-root", str(broken), "--quiet", "--out", str(fresh)]) == 2
    assert not fresh.exists()


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "backdoorlab.cli", "--version"], capture_output=True, text=True, env={"PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert r.returncode == 0 and "backdoorlab" in r.stdout
