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
    with pytest.raises(ModelFileError, match="claims"):
        load_model(tmp_path / "r.safetensors", Arch("digit-cnn", 1, 10, (28, 28)))
    torch.save(resnet.state_dict(), tmp_path / "r.pt")
    with pytest.raises(ModelFileError, match="not a digit-cnn model: missing"):
        load_model(tmp_path / "r.pt", Arch("digit-cnn", 1, 10, (28, 28)))
    (tmp_path / "junk.bin").write_bytes(b"\x00junk" * 50)
    with pytest.raises(ModelFileError, match="junk.bin"):
        load_model(tmp_path / "junk.bin", Arch("digit-cnn", 1, 10, (28, 28)))
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def test_run_dir_finished_marker_and_config_guard(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.prepare({"a": 1}) is False
    assert not run.finished
    run.save_tensors("t.safetensors", {"x": torch.arange(3)})
    run.write_metrics({"clean_accuracy": 0.5, "nan": float("nan")})
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["nan"] is None
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert run.prepare({"a": 1}) is True  # finished: not redone
    with pytest.raises(FileExistsError, match="another config"):
        run.prepare({"a": 2})
    assert run.finished  # nothing already written was lost
    # check() decides the same things and touches nothing
    assert run.check({"a": 1}) is True and run.check({"a": 2}, force=True) is False
    with pytest.raises(FileExistsError, match="another config"):
        run.check({"a": 2})
    assert run.finished and (tmp_path / "r" / "t.safetensors").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"a": 1}
    # force empties the folder and starts the new config
    assert run.prepare({"a": 2}, force=True) is False and not run.finished
    assert not (tmp_path / "r" / "t.safetensors").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"a": 2}
    assert RunDir(tmp_path / "new").check({"a": 1}) is False and not (tmp_path / "new").exists()


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
