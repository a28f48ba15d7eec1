"""Every bad input gets one clear line: exit code 2, the field (or file) named, no traceback, and
nothing written or deleted anywhere, not even by ``--force`` on a finished run.

One table of bad commands across train, attack, defend and run; each runs in a sandbox whose every
file (finished runs included) is compared byte for byte before and after.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from backdoorlab.artifacts import save_model
from backdoorlab.cli import main
from backdoorlab.errors import ConfigError
from backdoorlab.models import Arch, build_model

FAST = ["--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--width", "0.25", "--quiet"]
BASE = ["--dataset", "digits", "--width", "0.25", "--quiet"]  # for --train keys that FAST's flags would override


def _idx(path: Path, array_dims: tuple[int, ...], data: bytes) -> None:
    head = b"\x00\x00\x08" + bytes([len(array_dims)]) + b"".join(struct.pack(">I", d) for d in array_dims)
    with gzip.open(path, "wb") as f:
        f.write(head + data)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Finished train / attack / defend runs and the bad files the table points at."""
    root = tmp_path_factory.mktemp("sandbox")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", *FAST, "--out", str(root / "clean")]) == 0
    assert main(["attack", "badnets", *FAST, "-p", "patch_size=2", "--out", str(root / "attack")]) == 0
    assert main(["defend", "strip", "--run", str(root / "attack"), "-p", "n_overlays=4", "--max-inputs", "20", "--quiet", "--out", str(root / "defend")]) == 0
    torch.set_num_threads(threads)
    zero = root / "mnist-empty"
    zero.mkdir()
    for split in ("train", "t10k"):
        _idx(zero / f"{split}-images-idx3-ubyte.gz", (0, 28, 28), b"")
        _idx(zero / f"{split}-labels-idx1-ubyte.gz", (0,), b"")
    (root / "models").mkdir()
    save_model(build_model(Arch("digit-cnn", 3, 10, (8, 8), 0.25)), root / "models" / "colour.safetensors")
    save_model(build_model(Arch("resnet18", 1, 10, (8, 8), 0.125)), root / "models" / "resnet.safetensors")
    (root / "models" / "junk.safetensors").write_bytes(b"\x00not a model" * 30)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (root / "models" / "evil.pt").write_bytes(pickle.dumps({"w": Boom()}))
    (root / "a-file").write_text("not a folder")
    user = root / "my-folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    bad_grid = root / "grid-epochs.yaml"
    bad_grid.write_text("datasets: [digits]\nmodels: [digit-cnn]\ntrain: {epochs: 1000000000}\nattacks: [{attack: badnets}]\n")
    (root / "grid-device.yaml").write_text("device: bogus\ndatasets: [digits]\nmodels: [digit-cnn]\nattacks: [{attack: badnets}]\n")
    (root / "grid-ok.yaml").write_text("datasets: [digits]\nmodels: [digit-cnn]\nattacks: [{attack: badnets}]\n")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


A = ["attack", "badnets", *FAST]
# (argv with {root} for the sandbox, what the one error line must name)
CASES = [
    # numbers: non-finite, out of range, of the wrong type
    (["train", *FAST, "--lr", "inf", "--out", "{root}/new"], "train.lr"),
    (["train", *FAST, "--lr", "nan", "--out", "{root}/new"], "train.lr"),
    (["train", *FAST, "--train", "momentum=nan", "--out", "{root}/new"], "train.momentum"),
    (["train", *FAST, "--train", "momentum=1.5", "--out", "{root}/new"], "train.momentum"),
    (["train", *FAST, "--epochs", "-1", "--out", "{root}/new"], "train.epochs"),
    (["train", *FAST, "--epochs", "1000000000", "--out", "{root}/new"], "train.epochs"),
    (["train", *BASE, "--train", "epochs=true", "--out", "{root}/new"], "train.epochs"),
    (["train", *BASE, "--train", "batch_size=0", "--out", "{root}/new"], "train.batch_size"),
    (["train", *FAST, "--train", "schedule=weird", "--out", "{root}/new"], "train.schedule"),
    (["train", *FAST, "--train", "optimizer=lbfgs", "--out", "{root}/new"], "train.optimizer"),
    (["train", *FAST, "--train", "weight_decay=-1", "--out", "{root}/new"], "train.weight_decay"),
    (["train", *FAST, "--width", "inf", "--out", "{root}/new"], "width"),
    (["train", *FAST, "--width", "0", "--out", "{root}/new"], "width"),
    (["train", *FAST, "--seed", "-1", "--out", "{root}/new"], "seed"),
    # devices this machine has
    (["train", *FAST, "--device", "bogus", "--out", "{root}/new"], "device"),
    (["train", *FAST, "--device", "cuda:7", "--out", "{root}/new"], "device"),
    # names, data and folders
    (["train", *FAST, "--dataset", "imagenet", "--out", "{root}/new"], "dataset"),
    (["train", *FAST, "--model", "gpt", "--out", "{root}/new"], "model"),
    (["train", *FAST, "--data-root", "{root}", "--out", "{root}/new"], "data_root"),
    (["train", "--dataset", "mnist", "--data-root", "{root}/mnist-empty", "--quiet", "--out", "{root}/new"], "holds no images"),
    (["train", "--dataset", "mnist", "--data-root", "{root}/nowhere", "--quiet", "--out", "{root}/new"], "data_root"),
    (["train", *FAST, "--out", "{root}/a-file/run"], "out"),
    (["train", *FAST, "--out", "{root}/my-folder", "--force"], "out"),
    (["train", *FAST, "--out", "{root}/attack", "--force"], "out"),
    (["train", *FAST, "--seed", "3", "--out", "{root}/clean"], "out"),
    # attack parameters
    ([*A, "-p", "target=true", "--out", "{root}/new"], "params.target"),
    ([*A, "--target", "12", "--out", "{root}/new"], "params.target"),
    ([*A, "--poison-rate", "0", "--out", "{root}/new"], "params.poison_rate"),
    ([*A, "--poison-rate", "nan", "--out", "{root}/new"], "params.poison_rate"),
    ([*A, "-p", "poison_rate=1", "-p", "patch_size=2", "--out", "{root}/attack", "--force"], "poison_rate"),
    ([*A, "-p", "patch_size=100", "--out", "{root}/attack", "--force"], "patch_size"),
    ([*A, "-p", "colour=red", "--out", "{root}/new"], "params.colour"),
    (["attack", "nope", *FAST, "--out", "{root}/new"], "unknown attack"),
    (["attack", "mmlm", *FAST, "--epsilon", "1.5", "--out", "{root}/new"], "params.epsilon"),
    (["attack", "mmlm", *FAST, "--epsilon", "nan", "--out", "{root}/new"], "params.epsilon"),
    (["attack", "mmlm", *FAST, "--poison-rate", "0.5", "--out", "{root}/new"], "params.poison_rate"),
    (["attack", "mmlm", *FAST, "-p", "replace_share=0", "--out", "{root}/new"], "params.replace_share"),
    # model files: missing, junk, code, another architecture, another input shape
    ([*A, "--clean-model", "{root}/models/missing.safetensors", "--out", "{root}/new"], "clean_model"),
    ([*A, "--clean-model", "{root}/models/junk.safetensors", "--out", "{root}/new"], "clean_model"),
    ([*A, "--clean-model", "{root}/models/evil.pt", "--out", "{root}/new"], "could run code"),
    ([*A, "--clean-model", "{root}/models/resnet.safetensors", "--out", "{root}/new"], "holds a resnet18"),
    ([*A, "--clean-model", "{root}/models/colour.safetensors", "--out", "{root}/new"], "for 3x8x8 inputs"),
    ([*A, "--clean-model", "{root}/models/resnet.safetensors", "--out", "{root}/attack", "--force"], "holds a resnet18"),
    ([*A, "--clean-model", "{root}/clean/model.safetensors", "--out", "{root}/clean", "--force"], "out"),
    # defenses
    (["defend", "strip", "--run", "{root}/nowhere", "--out", "{root}/new"], "run"),
    (["defend", "strip", "--run", "{root}/clean", "--out", "{root}/new"], "run"),
    (["defend", "strip", "--run", "{root}/attack", "--out", "{root}/attack", "--force"], "out"),
    (["defend", "strip", "--run", "{root}/attack", "--out", "{root}/attack/strip"], "out"),
    (["defend", "strip", "--run", "{root}/attack", "--out", "{root}", "--force"], "out"),
    (["defend", "strip", "--run", "{root}/attack", "--heldout-fraction", "1", "--out", "{root}/new"], "heldout_fraction"),
    (["defend", "strip", "--run", "{root}/attack", "--heldout-fraction", "nan", "--out", "{root}/new"], "heldout_fraction"),
    (["defend", "strip", "--run", "{root}/attack", "--max-inputs", "-1", "--out", "{root}/new"], "max_inputs"),
    (["defend", "spectral-signatures", "--run", "{root}/attack", "--inspect-poison-rate", "0", "--out", "{root}/new"], "inspect_poison_rate"),
    (["defend", "spectral-signatures", "--run", "{root}/attack", "--inspect-poison-rate", "0.1", "--out", "{root}/new"], "inspect_poison_rate"),
    (["defend", "strip", "--run", "{root}/attack", "-p", "n_overlays=0", "--out", "{root}/new"], "params.n_overlays"),
    (["defend", "strip", "--run", "{root}/attack", "--device", "bogus", "--out", "{root}/defend", "--force"], "device"),
    (["defend", "nope", "--run", "{root}/attack", "--out", "{root}/new"], "unknown defense"),
    # experiment files
    (["run", "{root}/missing.yaml", "--out", "{root}/new"], "experiment"),
    (["run", "{root}/grid-epochs.yaml", "--out", "{root}/new"], "train.epochs"),
    (["run", "{root}/grid-device.yaml", "--out", "{root}/new"], "device"),
    (["run", "{root}/grid-ok.yaml", "--out", "{root}/my-folder"], "out"),
]


@pytest.mark.parametrize("argv, named", CASES, ids=[f"{i:02d}-{c[0][0]}-{c[1]}" for i, c in enumerate(CASES)])
def test_bad_input_gets_one_line_and_changes_nothing(sandbox, capsys, argv, named):
    before = _snapshot(sandbox)
    capsys.readouterr()
    rc = main([a.replace("{root}", str(sandbox)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("backdoorlab: error: ") and "\n" not in err and "Traceback" not in err, err
    assert named in err, err
    assert _snapshot(sandbox) == before  # nothing written, nothing deleted
    assert not (sandbox / "new").exists()


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 40 and {c[0][0] for c in CASES} >= {"train", "attack", "defend", "run"}


def test_the_python_api_goes_through_the_same_checks(sandbox):
    from backdoorlab.defenses import DefenseJob
    from backdoorlab.jobs import AttackJob, TrainJob
    from backdoorlab.train import TrainConfig

    for make, field in [
        (lambda: TrainConfig(lr=float("inf")), "lr"),
        (lambda: TrainConfig(epochs=True), "epochs"),
        (lambda: TrainJob(width=float("inf")).validate(), "width"),
        (lambda: TrainJob(device="cuda:9").validate(), "device"),
        (lambda: AttackJob(dataset="digits", params={"target": True}).build(), "params.target"),
        (lambda: AttackJob(dataset="digits", params={"poison_rate": float("nan")}).build(), "params.poison_rate"),
        (lambda: DefenseJob("strip", str(sandbox / "attack"), max_inputs=True).build(), "max_inputs"),
    ]:
        with pytest.raises(ConfigError) as e:
            make()
        assert e.value.field == field, str(e.value)


def test_debug_shows_the_traceback(sandbox, capsys):
    with pytest.raises(ConfigError):
        main(["--debug", "train", *FAST, "--lr", "inf", "--out", str(sandbox / "new")])
    assert not (sandbox / "new").exists()


def test_a_grid_that_would_shrink_a_finished_grid_is_refused(sandbox, tmp_path, capsys):
    grid = tmp_path / "two.yaml"
    grid.write_text("seeds: [0, 1]\ndatasets: [digits]\nmodels: [{name: digit-cnn, width: 0.25}]\ntrain: {epochs: 1, batch_size: 128}\nattacks: [{attack: badnets}]\n")
    out = tmp_path / "out"
    assert main(["run", str(grid), "--out", str(out), "--quiet"]) == 0
    rows = (out / "results.jsonl").read_text()
    one = tmp_path / "one.yaml"
    one.write_text(grid.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["run", str(one), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds results of 2 cell(s) this file does not have" in err and "--drop-missing" in err
    assert _snapshot(out) == before
    assert main(["run", str(one), "--out", str(out), "--quiet", "--drop-missing"]) == 0
    assert "dropping the rows of 2 cell(s)" in capsys.readouterr().err
    kept = (out / "results.jsonl").read_text()
    assert 0 < len(kept.splitlines()) < len(rows.splitlines()) and all('"s1"' not in line for line in kept.splitlines())


def test_a_table_metric_no_cell_produces_is_named(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("datasets: [digits]\nmodels: [{name: digit-cnn, width: 0.25}]\ntrain: {epochs: 1, batch_size: 128}\n"
                    "attacks: [{attack: badnets}]\ndefenses: [{name: spectral-signatures, clean_model: true}]\n"
                    "tables: [{kind: pivot, metrics: [clean_accuracy, atack_success_rate]}, {kind: control, metric: {spectral-signatures: aurok}}]\n")
    assert main(["run", str(grid), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tables: no cell produced tables[0]: atack_success_rate" in err and "tables[1]: aurok" in err  # a control table names its metric per defense
    assert json.loads((tmp_path / "out" / "cells" / "clean" / "digits" / "digit-cnn-w0.25" / "s0" / "metrics.json").read_text())  # the cells are kept
    shutil.rmtree(tmp_path / "out")


def test_the_same_run_twice_writes_byte_identical_safetensors(sandbox, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sandbox's attack ran with one thread: the same arithmetic
    try:
        assert main(["attack", "badnets", *FAST, "-p", "patch_size=2", "--out", str(tmp_path / "again")]) == 0
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in (sandbox / "attack").glob("*.safetensors"))
    assert files == ["clean_model.safetensors", "model.safetensors", "tensors.safetensors"]
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (sandbox / "attack" / name).read_bytes(), name
    assert (tmp_path / "again" / "config.json").read_bytes() == (sandbox / "attack" / "config.json").read_bytes()
