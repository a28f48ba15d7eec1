import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
