import os

import pytest
import torch

# two threads (this machine's cores) unless OMP_NUM_THREADS asks for fewer: on a CPU another job is
# using, two spinning threads wait on each other at every op and a 20-second test takes minutes
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))


@pytest.fixture(scope="session")
def mnist5k():
    from backdoorlab.data import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def digits():
    from backdoorlab.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def repo_script():
    """Import a repository script (``scripts/NAME.py`` or ``benchmarks/NAME.py``, not packages) as a module."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(folder: str, name: str):
        spec = importlib.util.spec_from_file_location(name, root / folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


# --------------------------------------------------------------------- the defenses' BadNets run (shared)

from backdoorlab.defenses import DefenseJob, load_case, run_defense  # noqa: E402
from backdoorlab.jobs import AttackJob, run_attack  # noqa: E402

SMALL = {
    "neural-cleanse": {"max_images": 48, "max_epochs": 30},
    "cognitive-distillation": {"steps": 50},
    "strip": {"n_overlays": 32},
    "fine-pruning": {"finetune_epochs": 2},
    "activation-clustering": {"tsne_points": 200},
    "spectral-signatures": {},
    "input-blurring": {"kernel_sizes": [1, 3, 5]},
    "multi-layer-tuning": {"frozen": [2, 3], "epochs": 1},
    "scale-up": {},
    "sentinet": {"n_overlays": 24, "heatmap_images": 3},
    "abl": {"isolation_epochs": 2, "retrain_epochs": 1, "unlearning_epochs": 1},
    "mntd": {"shadow_models": 4, "shadow_epochs": 2, "meta_steps": 20},
}


@pytest.fixture(scope="session")
def bn(tmp_path_factory):
    """A finished BadNets run (10% poison) with its clean model; one thread: faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("defenses") / "badnets"
    job = AttackJob("mnist5k", "digit-cnn", width=0.5, seed=0, device="cpu", train={"epochs": 3, "batch_size": 64, "augment": False}, attack="badnets", params={"poison_rate": 0.1})
    m = run_attack(job, out, progress=False)
    assert m["attack_success_rate"] > 0.9 and m["clean_accuracy"] > 0.85  # a real backdoor to defend against
    yield out
    torch.set_num_threads(threads)


MAX_INPUTS = {"cognitive-distillation": 48, "strip": 150, "sentinet": 60}  # test-time inputs presented, each of clean and poisoned


@pytest.fixture(scope="session")
def case(bn):
    return load_case(bn)


def run_small_defense(bn, name, model="backdoored", truth_hook=None, tag="", **extra):
    out = bn.parent / "-".join([name, model, tag, *(f"{k}={v}" for k, v in extra.items())])
    job = DefenseJob(name, str(bn), model, params={**SMALL[name], **extra}, max_inputs=MAX_INPUTS.get(name, 1000))
    return run_defense(job, out, progress=False, truth_hook=truth_hook), out




@pytest.fixture(scope="session")
def defend():
    """``defend(bn, name, model, truth_hook, tag, **params)``: one defense at its small settings on the run."""
    return run_small_defense


@pytest.fixture(scope="session")
def small_defense_params():
    """Each defense's parameters at the tests' small settings."""
    return SMALL


@pytest.fixture(scope="session", autouse=True)
def small_mnist():
    """``mnist5k-1500``: 1,500 / 500 real MNIST digits (a stratified subset of mnist5k, loaded lazily), for
    end-to-end runs that take seconds; registered once for every test."""
    from dataclasses import replace

    from backdoorlab.data import DATASETS, by_count, load_dataset
    from backdoorlab.data.core import Dataset
    from backdoorlab.data.sources import DatasetEntry

    name = "mnist5k-1500"
    if name not in DATASETS:
        spec = replace(DATASETS.get("mnist5k").spec, name=name, description="test subset of mnist5k")

        def load(root):
            full = load_dataset("mnist5k")
            return Dataset(spec, by_count(full.train, 1500), by_count(full.test, 500))

        DATASETS.add(name, DatasetEntry(spec, load))
    return name


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast alone and much faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
