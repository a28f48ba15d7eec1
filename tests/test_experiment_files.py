"""Every committed experiment file is valid: it parses, every cell's job builds (names, parameters,
datasets, models) and every table and plot is checked, as ``backdoorlab run FILE --dry-run`` does,
without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from backdoorlab.experiments import prepare

FILES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_the_repository_has_experiment_files() -> None:
    assert len(FILES) >= 10, FILES


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_experiment_file_is_valid(path: Path, tmp_path: Path) -> None:
    grid = prepare(path, tmp_path / "out")
    assert len(grid) > 0
    assert not any(c.finished for c in grid)  # a fresh folder: nothing is counted as done
    kinds = {c.kind for c in grid}
    assert "attack" in kinds  # (a transfer attack such as Latent Backdoor trains no shared clean model)
    assert all(dep in {c.id for c in grid} for c in grid for dep in c.deps)  # every dependency is a cell of the grid
