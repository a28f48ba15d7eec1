"""The one artifact format: a run directory with config.json, metrics.json, safetensors files.

Writes are atomic (temporary file + rename), so an interrupted run never leaves a half-written
metrics file; ``metrics.json`` is written last, and its presence marks a finished run.
Model files are safetensors with the architecture in their metadata; reading a pickled file goes
through ``torch.load(weights_only=True)`` and a file that carries code is refused.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from .errors import ConfigError, ModelFileError
from .validate import check_out_folder
from .models import Arch, Classifier, build_model


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(obj: Any) -> Any:
    """JSON-friendly copy: tensors to lists, NaN to None, tuples to lists."""
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return _clean(obj.item())
    return obj


def dump_json(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n"


def _leftover(p: Path) -> bool:
    """What an interrupted or failed run leaves before its config (a grid's error.txt, temporaries)."""
    return p.is_file() and (p.name == "error.txt" or p.name.endswith(".tmp") or p.suffix == ".ckpt")


def run_kind(config: dict) -> str:
    """Which command wrote a run's config: "defend", "attack" or "train" (else "unknown")."""
    if "defense" in config and "run" in config:
        return "defend"
    if "attack" in config and "params" in config:
        return "attack"
    if "train" in config and "dataset" in config and "model" in config:
        return "train"
    return "unknown"


class RunDir:
    """One run's directory: config, metrics, model and tensors, and resumable state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def check(self, config: dict, force: bool = False) -> bool:
        """True when a finished run with this config is already here (kept unless ``force``).

        Touches nothing. The folder must be new, empty, or a run of the same command (a train,
        attack or defend run: ``--force`` never empties a folder it does not recognise as one of
        its own); a run with a different config there is an error unless ``force``. Callers check
        first, then load and validate every input, and only then :meth:`prepare`, so a bad input
        never costs an earlier run its files.
        """
        check_out_folder("out", self.path)
        if not self.path.is_dir() or all(_leftover(p) for p in self.path.iterdir()):
            return False
        cfg_path, kind = self.path / "config.json", run_kind(config)
        try:
            old = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or run_kind(old) != kind:
            an = lambda k: ("an " if k[0] in "aeiou" else "a ") + k  # noqa: E731
            what = f"{an(run_kind(old))} run" if isinstance(old, dict) and run_kind(old) != "unknown" else "files that are not a backdoorlab run"
            raise ConfigError("out", f"{self.path} holds {what}, not {an(kind)} run; choose a new or empty folder (nothing was changed)")
        if cfg_path.read_text() != dump_json(config) and not force:
            raise ConfigError("out", f"{self.path} holds a {kind} run with another config; choose another --out or pass --force to redo it")
        return not force and self.finished

    def prepare(self, config: dict, force: bool = False) -> bool:
        """Create the directory; return True when a finished run with the same config is already there.

        A finished run is kept unless ``force`` (then the folder is emptied); a run with a
        different config in the same folder is an error (nothing is overwritten silently); an
        unfinished one resumes.
        """
        if self.check(config, force):
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        if force:
            for p in self.path.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        _atomic_write(self.path / "config.json", dump_json(config))
        return False

    @property
    def finished(self) -> bool:
        return (self.path / "metrics.json").exists()

    def file(self, name: str) -> Path:
        return self.path / name

    def write_metrics(self, metrics: dict) -> None:
        _atomic_write(self.path / "metrics.json", dump_json(metrics))

    def read_metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def read_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def write_json(self, name: str, obj: Any) -> None:
        _atomic_write(self.path / name, dump_json(obj))

    def save_tensors(self, name: str, tensors: dict[str, Tensor], meta: dict | None = None) -> Path:
        return write_safetensors(self.path / name, tensors, {k: json.dumps(v) for k, v in (meta or {}).items()})

    def load_tensors(self, name: str) -> dict[str, Tensor]:
        return load_file(str(self.path / name))

    def save_model(self, model: Classifier, name: str = "model.safetensors") -> Path:
        return save_model(model, self.path / name)

    def load_model(self, name: str = "model.safetensors", device: str | torch.device = "cpu") -> Classifier:
        return load_model(self.path / name, device=device)


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically with a stable header (tensors and metadata in sorted
    order), so the same tensors always give the same bytes; any safetensors reader loads it."""
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    blobs, offset = [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise ValueError(f"{k}: dtype {t.dtype} cannot be written to safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format's 8-byte alignment of the data
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    return path


def save_model(model: Classifier, path: str | Path) -> Path:
    return write_safetensors(path, dict(model.state_dict()), {"backdoorlab_arch": json.dumps(model.arch.to_dict()), "format": "backdoorlab-model-1"})


def read_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read tensors from a safetensors file, or from a pickle with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError):
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path}: refused, the file holds pickled objects beyond plain tensors (it could run code when loaded): {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001 - any other reader failure means the file is not a model
        raise ModelFileError(f"{path}: not a safetensors or torch state-dict file ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: expected a mapping of parameter names to tensors")
    return obj, {}


def load_model(path: str | Path, arch: Arch | None = None, device: str | torch.device = "cpu") -> Classifier:
    """Load a model file and check that it is the architecture it claims (or the one expected)."""
    state, meta = read_state(path)
    try:
        claimed = Arch.from_dict(json.loads(meta["backdoorlab_arch"])) if "backdoorlab_arch" in meta else None
    except (ValueError, KeyError, TypeError):
        raise ModelFileError(f"{path}: its architecture record is unreadable") from None
    if arch is None and claimed is None:
        raise ModelFileError(f"{path}: the file does not say which architecture it holds; pass the model name (--model) to check it against")
    if arch is not None and claimed is not None and arch != claimed:
        raise ModelFileError(f"{path}: holds a {claimed.describe()}, but this run needs a {arch.describe()}")
    model = build_model(arch or claimed)  # type: ignore[arg-type]
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    bad = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        if bad:
            parts.append(f"wrong shapes for {len(bad)} tensors (e.g. {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(want[bad[0]].shape)})")
        raise ModelFileError(f"{path}: not a {(arch or claimed).name} model: " + "; ".join(parts))  # type: ignore[union-attr]
    model.load_state_dict(state)
    return model.to(device).eval()
