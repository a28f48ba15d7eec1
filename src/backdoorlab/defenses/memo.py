"""A model-inspection defense's decision, computed once per model and reused.

A model-inspection defense (Neural Cleanse, MNTD) decides from the model and the defender's clean
held-out data alone; no input of the attack run enters. Two runs that hold the same model bit for
bit (a grid's two MMLM entries share one backdoored head) therefore get the same decision, and
computing it twice is only cost. With a cache folder (a grid passes its own), the decision (its
JSON, its tensors and the figures ``decide`` drew) is stored under a key made of the model's
tensors, the held-out images and labels, the defense, its parameters and its seed, and restored by
a later run with the same key; scoring still runs on each run's own ground truth. A decision that
holds anything that cannot be stored (a repaired model, working data for ``score``) is never cached.
Input detectors keep their held-out scores (the threshold's data) the same way (``heldout_dir``).

Work under a key is done under an exclusive file lock (:func:`locked`): two cells of a grid that
need the same key at the same time (a grid runs cells side by side) do it once, the second waiting
for the first instead of repeating it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock, at worst a key is computed twice
    fcntl = None  # type: ignore[assignment]

import torch

from ..artifacts import RunDir


def decision_key(name: str, params: Any, view: Any) -> str:
    """The key of a decision: the defense, its parameters, the seed, the model's tensors and the
    defender's held-out data, hashed."""
    h = hashlib.sha256(json.dumps({"defense": name, "params": repr(params), "seed": view.seed}, sort_keys=True).encode())
    for k, v in sorted(view.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for t in (view.heldout.x, view.heldout.y):
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def memo_dir(defense: Any, view: Any, name: str) -> Path | None:
    """Where the decision of this (model-inspection) defense on this view is kept, or None without
    a cache folder; the caller decides which defenses qualify."""
    if view.cache_dir is None:
        return None
    return Path(view.cache_dir) / f"decision-{name}-{decision_key(name, defense.p, view)}"


@contextmanager
def locked(memo: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on the key ``memo`` (a no-op for None) while its work is looked up,
    done and stored."""
    if memo is None or fcntl is None:
        yield
        return
    memo.parent.mkdir(parents=True, exist_ok=True)
    with open(memo.with_name(f".{memo.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def restore(memo: Path, rd: RunDir) -> dict[str, Any] | None:
    """The cached decision copied into the run folder (figures included), or None when absent."""
    if not (memo / "decision.json").exists():
        return None
    for f in memo.iterdir():
        shutil.copyfile(f, rd.path / f.name)
    decision: dict[str, Any] = json.loads((memo / "decision.json").read_text())
    if (memo / "decision.safetensors").exists():
        decision.update(rd.load_tensors("decision.safetensors"))
    return decision


def store(memo: Path, rd: RunDir, decision: dict[str, Any], written: set[str]) -> bool:
    """Keep the decision just written to ``rd`` (everything in it but its config) under ``memo``;
    nothing is kept when ``decision`` holds entries that were not written (``written``)."""
    if set(decision) != written:
        return False
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in rd.path.iterdir():
        if f.is_file() and f.name not in ("config.json", "metrics.json"):
            shutil.copyfile(f, tmp / f.name)
    try:
        os.replace(tmp, memo)  # atomic; a concurrent run that stored it first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
