import json
import os

import pytest
import torch

from backdoorlab.artifacts import RunDir, load_model, save_model
from backdoorlab.errors import ConfigError, ModelFileError
from backdoorlab.models import Arch, build_model
from backdoorlab.validate import build_params, check_class, check_epsilon, check_rate


def test_model_roundtrip_keeps_arch_and_weights(tmp_path):
    m = build_model(Arch("digit-cnn", 1, 10, (28, 28), 0.25))
    p = save_model(m, tmp_path / "m.safetensors")
    back = load_model(p)
    assert back.arch == m.arch
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(EVIL_MARK),))


EVIL_MARK = None


def test_pickle_that_carries_code_is_refused(tmp_path):
    global EVIL_MARK
    EVIL_MARK = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"stages.head.weight": torch.zeros(2, 2), "x": Evil()}, path)
    with pytest.raises(ModelFileError, match="refused"):
        load_model(path, Arch("digit-cnn", 1, 10, (28, 28)))
    assert not EVIL_MARK.exists()


def test_plain_state_dict_pickle_is_read_with_the_expected_arch(tmp_path):
    arch = Arch("digit-cnn", 1, 10, (28, 28), 0.25)
    m = build_model(arch)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    back = load_model(tmp_path / "sd.pt", arch)
    assert torch.equal(back.head.weight, m.head.weight)
    with pytest.raises(ModelFileError, match="does not say which architecture"):
        load_model(tmp_path / "sd.pt")


def test_model_file_that_is_not_what_it_claims(tmp_path):
    resnet = build_model(Arch("resnet18", 1, 10, (28, 28), 0.125))
    save_model(resnet, tmp_path / "r.safetensors")
    with pytest.raises(ModelFileError, match="holds a resnet18 .width 0.125. for 1x28x28 inputs and 10 classes, but this run needs a digit-cnn"):
        load_model(tmp_path / "r.safetensors", Arch("digit-cnn", 1, 10, (28, 28)))
    with pytest.raises(ModelFileError, match="for 3x32x32 inputs and 43 classes"):  # a colour model for a grey dataset
        load_model(tmp_path / "r.safetensors", Arch("resnet18", 3, 43, (32, 32), 0.125))
    torch.save(resnet.state_dict(), tmp_path / "r.pt")
    with pytest.raises(ModelFileError, match="not a digit-cnn model: missing"):
        load_model(tmp_path / "r.pt", Arch("digit-cnn", 1, 10, (28, 28)))
    (tmp_path / "junk.bin").write_bytes(b"\x00junk" * 50)
    with pytest.raises(ModelFileError, match="junk.bin"):
        load_model(tmp_path / "junk.bin", Arch("digit-cnn", 1, 10, (28, 28)))
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def _train_cfg(**kw):
    return {"dataset": "digits", "model": "digit-cnn", "train": {}, **kw}


def test_run_dir_finished_marker_and_config_guard(tmp_path):
    one, two = _train_cfg(seed=1), _train_cfg(seed=2)
    run = RunDir(tmp_path / "r")
    assert run.prepare(one) is False
    assert not run.finished
    run.save_tensors("t.safetensors", {"x": torch.arange(3)})
    run.write_metrics({"clean_accuracy": 0.5, "nan": float("nan")})
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["nan"] is None
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert run.prepare(one) is True  # finished: not redone
    with pytest.raises(ConfigError, match="another config") as e:
        run.prepare(two)
    assert e.value.field == "out" and run.finished  # nothing already written was lost
    # check() decides the same things and touches nothing
    assert run.check(one) is True and run.check(two, force=True) is False
    with pytest.raises(ConfigError, match="another config"):
        run.check(two)
    assert run.finished and (tmp_path / "r" / "t.safetensors").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == one
    # force empties the folder and starts the new config
    assert run.prepare(two, force=True) is False and not run.finished
    assert not (tmp_path / "r" / "t.safetensors").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == two
    assert RunDir(tmp_path / "new").check(one) is False and not (tmp_path / "new").exists()


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_empties_a_folder_that_is_not_a_run_of_the_same_command(tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = _snapshot(mine)
    for force in (False, True):
        with pytest.raises(ConfigError, match="not a backdoorlab run") as e:
            RunDir(mine).prepare(_train_cfg(), force=force)
        assert e.value.field == "out" and _snapshot(mine) == before
    other = RunDir(tmp_path / "attack-run")
    other.prepare({"attack": "badnets", "params": {}, "dataset": "digits", "model": "digit-cnn", "train": {}})
    other.write_metrics({})
    kept = _snapshot(other.path)
    with pytest.raises(ConfigError, match="holds an attack run, not a train run"):
        RunDir(other.path).prepare(_train_cfg(), force=True)
    assert _snapshot(other.path) == kept
    # a failed grid cell's error.txt is the toolkit's own leftover: the run may start there
    half = tmp_path / "half"
    half.mkdir()
    (half / "error.txt").write_text("boom")
    assert RunDir(half).prepare(_train_cfg()) is False
    # a folder below a regular file cannot be made
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file") as e:
        RunDir(tmp_path / "file" / "run").check(_train_cfg())
    assert e.value.field == "out"


def test_safetensors_files_are_byte_identical_for_the_same_content(tmp_path):
    from safetensors.torch import load_file

    from backdoorlab.artifacts import write_safetensors

    t = {"w": torch.randn(4, 3), "a": torch.arange(7), "flag": torch.tensor([True, False]), "b16": torch.randn(2).bfloat16()}
    write_safetensors(tmp_path / "one.safetensors", t, {"z": "1", "a": "2"})
    write_safetensors(tmp_path / "two.safetensors", dict(reversed(list(t.items()))), {"a": "2", "z": "1"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    back = load_file(str(tmp_path / "one.safetensors"))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    m = build_model(Arch("digit-cnn", 1, 10, (28, 28), 0.25))
    save_model(m, tmp_path / "m1.safetensors")
    save_model(m, tmp_path / "m2.safetensors")
    assert (tmp_path / "m1.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()


def test_validators_name_the_field():
    with pytest.raises(ConfigError, match="epsilon.*\\[0, 1\\]"):
        check_epsilon("epsilon", 1.5)
    with pytest.raises(ConfigError, match="poison_rate"):
        check_rate("poison_rate", 0.0)
    with pytest.raises(ConfigError, match="target: class 10 is out of range"):
        check_class("target", 10, 10)
    from backdoorlab.train import TrainConfig

    with pytest.raises(ConfigError, match="train.optimizer"):
        build_params(TrainConfig, {"optimizer": "lbfgs"}, prefix="train.")
    with pytest.raises(ConfigError, match="train.epochz: unknown parameter"):
        build_params(TrainConfig, {"epochz": 3}, prefix="train.")
    assert build_params(TrainConfig, {"epochs": "4", "milestones": "2,3"}).milestones == (2, 3)
