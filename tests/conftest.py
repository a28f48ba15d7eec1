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
