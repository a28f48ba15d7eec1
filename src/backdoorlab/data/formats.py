"""Loaders for the official on-disk formats of the benchmark datasets.

Every loader reads a folder the user names and returns :class:`RawSplits`: uint8
image tensors ``(N, C, H, W)`` and int64 label tensors for the train and test
splits, plus the class names. The layout is checked before anything is decoded,
so a wrong folder fails at once with a :class:`~backdoorlab.errors.DatasetError`
that names the path and describes the expected layout.

Formats handled here: IDX (MNIST, Fashion-MNIST) and the CIFAR-10 python pickle
batches. The image-folder formats (GTSRB, Tiny-ImageNet) live in
:mod:`backdoorlab.data.formats_images`; they are re-exported from this module. What
every loader returns and the checks they share are in :mod:`backdoorlab.data.raw`.

The CIFAR-10 batches are pickles downloaded from the internet, so they are read
with an unpickler that only resolves the few numpy globals an array needs.
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backdoorlab.data.formats_images import load_gtsrb, load_tiny_imagenet
from backdoorlab.data.raw import RawSplits, _as_dir, _labels_tensor
from backdoorlab.errors import ConfigError, DatasetError, UnknownNameError

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

__all__ = [
    "RawSplits",
    "read_idx",
    "load_mnist_idx",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_gtsrb",
    "load_tiny_imagenet",
    "LOADERS",
    "load_official",
    "MNIST_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
]

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Where the Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files.
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------- IDX

_IDX_UINT8 = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain, or gzipped when the name ends in ``.gz``) into a uint8 array.

    Header: two zero bytes, the dtype code (only 0x08, unsigned byte, is accepted),
    the number of dimensions, then each dimension as a big-endian uint32; the data
    follows and must have exactly the product of the dimensions in bytes.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # missing file, bad or truncated gzip stream
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (the first two bytes must be zero; "
                           f"got {raw[:4].hex() or 'an empty file'})")
    if raw[2] != _IDX_UINT8:
        raise DatasetError(f"{path}: IDX dtype code 0x{raw[2]:02X} is not supported (only 0x08, uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated or invalid ({ndim} dimensions, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: IDX dims {dims} need {expected} data bytes, "
                           f"file has {len(raw) - header} (truncated or corrupt)")
    # One copy into a writable array, so torch.from_numpy can share it without warnings.
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()


_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_SUBDIRS = ("", "raw", "MNIST/raw", "FashionMNIST/raw")


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # Some mirrors spell the names with a dot ("train-images.idx3-ubyte").
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist_idx(root: str | Path, class_names: list[str] | None = None) -> RawSplits:
    """Load MNIST-style IDX files from ``root`` (or ``root/raw``, ``root/MNIST/raw``,
    ``root/FashionMNIST/raw``), each plain or ``.gz``. Images come back as ``(N, 1, 28, 28)``.
    """
    class_names = list(MNIST_CLASSES if class_names is None else class_names)
    layout = (f"{root}/[raw/ | MNIST/raw/ | FashionMNIST/raw/]" + "{" + ", ".join(_IDX_STEMS) + "}"
              " (IDX files, each plain or .gz)")
    root = _as_dir(root, layout)
    files: list[Path] | None = None
    for sub in _IDX_SUBDIRS:
        folder = root / sub if sub else root
        found = [_find_idx_file(folder, stem) for stem in _IDX_STEMS]
        if all(found):
            files = found  # type: ignore[assignment]
            break
    if files is None:
        missing = [s for s in _IDX_STEMS if _find_idx_file(root, s) is None]
        raise DatasetError(f"{root}: MNIST IDX files not found (missing in {root}: {', '.join(missing)}); "
                           f"expected {layout}")
    tr_img, tr_lab, te_img, te_lab = (read_idx(f) for f in files)
    splits = []
    for img, lab, img_path, lab_path in ((tr_img, tr_lab, files[0], files[1]),
                                         (te_img, te_lab, files[2], files[3])):
        if img.ndim != 3:
            raise DatasetError(f"{img_path}: expected 3 IDX dimensions (N, rows, cols), got {img.shape}")
        if lab.ndim != 1:
            raise DatasetError(f"{lab_path}: expected 1 IDX dimension (N,), got {lab.shape}")
        if img.shape[0] != lab.shape[0]:
            raise DatasetError(f"{img_path} holds {img.shape[0]} images but {lab_path} "
                               f"holds {lab.shape[0]} labels")
        if img.shape[0] == 0 or 0 in img.shape[1:]:
            raise DatasetError(f"{img_path} holds no images (IDX dimensions {img.shape})")
        splits.append((torch.from_numpy(img).unsqueeze(1), _labels_tensor(lab, len(class_names), str(lab_path))))
    if splits[0][0].shape[1:] != splits[1][0].shape[1:]:
        raise DatasetError(f"{files[0]} and {files[2]}: train and test image sizes differ")
    return RawSplits(splits[0][0], splits[0][1], splits[1][0], splits[1][1], class_names)


def load_mnist(root: str | Path) -> RawSplits:
    """MNIST from its IDX files; class names ``"0"`` .. ``"9"``."""
    return load_mnist_idx(root, MNIST_CLASSES)


def load_fashion_mnist(root: str | Path | None = None) -> RawSplits:
    """Fashion-MNIST from its IDX files; ``root`` defaults to the Debian package's folder
    (:data:`FASHION_MNIST_DEFAULT_ROOT`)."""
    return load_mnist_idx(FASHION_MNIST_DEFAULT_ROOT if root is None else root, FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------- CIFAR-10

# The only globals a pickled numpy array needs (both the numpy 1.x and 2.x module paths,
# since the official batches were written long before numpy 2), plus ``_codecs.encode``,
# which protocol-2 pickles from Python 3 use to carry bytes.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
for _mod in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_mod}.multiarray", "_reconstruct")] = _np_multiarray._reconstruct
    _SAFE_GLOBALS[(f"{_mod}.multiarray", "scalar")] = _np_multiarray.scalar
    _SAFE_GLOBALS[(f"{_mod}.numeric", "_frombuffer")] = _np_numeric._frombuffer
del _mod


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_SAFE_GLOBALS``; anything else is refused."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(f"{self._path}: refusing to unpickle, the file refers to the global "
                               f"{module}.{name}, which a CIFAR batch (numpy arrays and lists) never "
                               f"needs; the file is not an official CIFAR batch and may be malicious") from None


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, path).load()
    except DatasetError:
        raise
    except Exception as exc:  # any decoding failure of an untrusted file is a malformed dataset
        raise DatasetError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


def _get(d: Any, key: str, path: Path) -> Any:
    """``d[b'key']`` (or ``d['key']`` for re-pickled batches); DatasetError if absent."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise DatasetError(f"{path}: expected a pickled dict with key b'{key}'")


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    data, labels = _get(batch, "data", path), _get(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: b'labels' must be a list of ints ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {data.shape[0]} images but b'labels' has shape {labels.shape}")
    _labels_tensor(labels, num_classes, str(path))
    return data, labels


def load_cifar10(root: str | Path) -> RawSplits:
    """CIFAR-10 from the python pickle batches in ``root`` or ``root/cifar-10-batches-py``.

    Each row of ``b'data'`` is 1024 red, then 1024 green, then 1024 blue bytes of a
    32x32 image in row-major order, so a reshape to ``(N, 3, 32, 32)`` is exact.
    """
    layout = (f"{root}/[cifar-10-batches-py/]data_batch_1..5, test_batch, batches.meta "
              f"(CIFAR-10 python pickle batches)")
    root = _as_dir(root, layout)
    folder = next((f for f in (root / "cifar-10-batches-py", root)
                   if all((f / n).is_file() for n in _CIFAR_FILES)), None)
    if folder is None:
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        missing = [n for n in _CIFAR_FILES if not (base / n).is_file()]
        raise DatasetError(f"{base}: missing {', '.join(missing)}; expected {layout}")
    meta_path = folder / "batches.meta"
    names = _get(_load_pickle(meta_path), "label_names", meta_path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{meta_path}: b'label_names' must be a list of strings")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    train = [_read_cifar_batch(folder / n, len(class_names)) for n in _CIFAR_TRAIN]
    test_x, test_y = _read_cifar_batch(folder / "test_batch", len(class_names))
    train_x = np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([y for _, y in train])
    return RawSplits(torch.from_numpy(train_x), torch.from_numpy(train_y),
                     torch.from_numpy(test_x.reshape(-1, 3, 32, 32)), torch.from_numpy(test_y), class_names)


# ---------------------------------------------------------------------------- registry (GTSRB and Tiny-ImageNet: formats_images)


LOADERS: dict[str, Callable[..., RawSplits]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "gtsrb": load_gtsrb,
    "tiny-imagenet": load_tiny_imagenet,
}


def load_official(name: str, root: str | Path | None = None, **kwargs: Any) -> RawSplits:
    """Load dataset ``name`` (a key of :data:`LOADERS`) from its official files under ``root``.

    ``root`` may be omitted only for ``fashion-mnist`` (Debian package folder). Extra
    keyword arguments go to the loader (e.g. ``size`` for ``gtsrb``).
    """
    try:
        loader = LOADERS[name]
    except KeyError:
        raise UnknownNameError("dataset", f"unknown dataset {name!r}; known: {', '.join(LOADERS)}") from None
    if root is None:
        if name != "fashion-mnist":
            raise ConfigError("root", f"dataset {name!r} needs the folder holding its official files")
        return loader(**kwargs)
    return loader(root, **kwargs)
