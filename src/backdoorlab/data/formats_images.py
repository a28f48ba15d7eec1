"""Loaders for the image-folder datasets: GTSRB and Tiny-ImageNet-200.

Both check the whole layout (folders, annotation files, that every listed image
exists) before decoding a single image, then decode each image straight into its
slot of one preallocated ``(N, 3, H, W)`` uint8 array per split, which becomes the
tensor without a copy (no per-sample tensors, no list of arrays to stack: peak memory
is one copy of the split). A thread pool was measured and gave no speed-up on these
small images (per-image Python overhead dominates), so decoding is sequential.
The public entry points are re-exported by :mod:`backdoorlab.data.formats`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from backdoorlab.data.raw import RawSplits, _as_dir, _labels_tensor
from backdoorlab.errors import DatasetError

__all__ = ["load_gtsrb", "load_tiny_imagenet", "GTSRB_NUM_CLASSES"]

GTSRB_NUM_CLASSES = 43
_GTSRB_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_GTSRB_TEST_CSV = "GT-final_test.csv"
T = TypeVar("T")


def _decode_into(items: Sequence[T], shape: tuple[int, int], decode: Callable[[T], np.ndarray]) -> torch.Tensor:
    """Run ``decode(item)`` (giving an ``(H, W, 3)`` uint8 array) for every item and gather the
    results into one ``(len(items), 3, H, W)`` uint8 tensor, owning its own storage."""
    out = np.empty((len(items), 3, *shape), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = decode(item).transpose(2, 0, 1)
    return torch.from_numpy(out)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # also loads the pixels, so the file can be closed
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from exc


# ---------------------------------------------------------------------------- GTSRB


def _read_gtsrb_csv(path: Path) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """Rows of a GTSRB annotation CSV as ``(filename, (x1, y1, x2, y2), class_id)``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read annotation CSV ({exc})") from exc
    reader = csv.DictReader(text.splitlines(), delimiter=";")
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _GTSRB_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{path}: annotation CSV lacks column(s) {', '.join(missing)}; expected a "
                           f"';'-separated header Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId")
    reader.fieldnames = header
    rows = []
    for line_no, row in enumerate(reader, start=2):
        try:
            box = tuple(int(row[c]) for c in _GTSRB_COLUMNS[1:5])
            rows.append((row["Filename"].strip(), box, int(row["ClassId"])))
        except (TypeError, ValueError, AttributeError) as exc:
            raise DatasetError(f"{path}, line {line_no}: malformed row {row} ({exc})") from exc
    return rows  # type: ignore[return-value]


def _find_gtsrb_base(root: Path, layout: str) -> Path:
    for base in (root / "GTSRB", root):
        if (base / "Final_Training" / "Images").is_dir():
            return base
    raise DatasetError(f"{root}: no Final_Training/Images folder (looked in {root / 'GTSRB'} and {root}); "
                       f"expected {layout}")


def load_gtsrb(root: str | Path, size: int = 32) -> RawSplits:
    """GTSRB from the official layout, each image cropped to its ROI and resized to ``size`` x ``size``.

    ``root`` is the folder holding ``GTSRB/`` or ``Final_Training/`` itself. Training:
    ``Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` in each class folder;
    test: ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (from GTSRB_Final_Test_GT.zip)
    in ``Final_Test/Images/``, ``Final_Test/``, the ``GTSRB`` folder or ``root``.

    The ROI follows the official definition: ``Roi.X2``/``Roi.Y2`` are the last pixel
    column/row *inside* the sign (inclusive), so the crop is ``[X1, X2] x [Y1, Y2]``.
    Resizing uses Pillow's bilinear filter. Class names are ``"0"`` .. ``"42"``.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    layout = (f"{root}/[GTSRB/]Final_Training/Images/000NN/{{*.ppm, GT-000NN.csv}} for NN = 00..42 and "
              f"Final_Test/Images/*.ppm with {_GTSRB_TEST_CSV} (';'-separated, with ClassId)")
    root = _as_dir(root, layout)
    base = _find_gtsrb_base(root, layout)

    # 1. Layout: every CSV parsed, every listed image present.
    items: list[tuple[Path, tuple[int, int, int, int]]] = []
    labels: list[int] = []
    for cid in range(GTSRB_NUM_CLASSES):
        folder = base / "Final_Training" / "Images" / f"{cid:05d}"
        csv_path = folder / f"GT-{cid:05d}.csv"
        if not csv_path.is_file():
            raise DatasetError(f"{csv_path}: missing; expected {layout}")
        for name, box, label in _read_gtsrb_csv(csv_path):
            if label != cid:
                raise DatasetError(f"{csv_path}: row for {name} has ClassId {label}, expected {cid}")
            items.append((folder / name, box))
            labels.append(label)
    n_train = len(items)

    test_dir = base / "Final_Test" / "Images"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing; expected {layout}")
    candidates = [test_dir, base / "Final_Test", base, root]
    test_csv = next((d / _GTSRB_TEST_CSV for d in candidates if (d / _GTSRB_TEST_CSV).is_file()), None)
    if test_csv is None:
        raise DatasetError(f"{test_dir}: test ground truth {_GTSRB_TEST_CSV} not found in "
                           f"{', '.join(str(d) for d in dict.fromkeys(candidates))}; it ships in "
                           f"GTSRB_Final_Test_GT.zip (GT-final_test.test.csv has no ClassId)")
    for name, box, label in _read_gtsrb_csv(test_csv):
        items.append((test_dir / name, box))
        labels.append(label)
    if n_train == 0 or len(items) == n_train:
        raise DatasetError(f"{base}: the GTSRB CSVs list no {'training' if n_train == 0 else 'test'} images")
    absent = [str(p) for p, _ in items if not p.is_file()]
    if absent:
        raise DatasetError(f"{len(absent)} image(s) listed in the GTSRB CSVs are missing, e.g. {absent[0]}")
    y = _labels_tensor(np.asarray(labels), GTSRB_NUM_CLASSES, f"{base} CSV ClassId")

    # 2. Decode.
    def decode(item: tuple[Path, tuple[int, int, int, int]]) -> np.ndarray:
        path, (x1, y1, x2, y2) = item
        img = _open_rgb(path)
        w, h = img.size
        if not (0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h):
            raise DatasetError(f"{path}: ROI ({x1}, {y1}, {x2}, {y2}) does not fit the {w}x{h} image")
        img = img.crop((x1, y1, x2 + 1, y2 + 1)).resize((size, size), Image.BILINEAR)
        return np.asarray(img)

    train_x = _decode_into(items[:n_train], (size, size), decode)
    test_x = _decode_into(items[n_train:], (size, size), decode)
    return RawSplits(train_x, y[:n_train].clone(), test_x, y[n_train:].clone(),
                     [str(i) for i in range(GTSRB_NUM_CLASSES)])


# ---------------------------------------------------------------------------- Tiny-ImageNet

_TINY_SIZE = (64, 64)


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc


def load_tiny_imagenet(root: str | Path) -> RawSplits:
    """Tiny-ImageNet-200 from ``root/tiny-imagenet-200`` or ``root`` itself; the val split is the test split.

    Labels follow the order of ``wnids.txt``; class names come from ``words.txt``
    (``wnid<TAB>names``) when present, else the wnids. Training images are
    ``train/<wnid>/images/*.JPEG`` (sorted by name); validation images are
    ``val/images/*`` labelled by ``val/val_annotations.txt`` (in that file's order).
    Grayscale JPEGs are converted to RGB; every image must be 64x64.
    """
    layout = (f"{root}/[tiny-imagenet-200/]wnids.txt, [words.txt], train/<wnid>/images/*.JPEG, "
              f"val/images/*.JPEG and val/val_annotations.txt (filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1)")
    root = _as_dir(root, layout)
    base = next((b for b in (root / "tiny-imagenet-200", root) if (b / "wnids.txt").is_file()), None)
    if base is None:
        raise DatasetError(f"{root}: no wnids.txt (looked in {root / 'tiny-imagenet-200'} and {root}); "
                           f"expected {layout}")
    wnids = _read_lines(base / "wnids.txt")
    index = {w: i for i, w in enumerate(wnids)}
    if not wnids or len(index) != len(wnids):
        raise DatasetError(f"{base / 'wnids.txt'}: expected one unique wnid per line, "
                           f"got {len(wnids)} lines with {len(index)} distinct")
    names = dict.fromkeys(wnids, "")
    if (base / "words.txt").is_file():
        for line in _read_lines(base / "words.txt"):
            wnid, _, words = line.partition("\t")
            if wnid in names:
                names[wnid] = words.strip()
    class_names = [names[w] or w for w in wnids]

    # 1. Layout.
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpeg", ".jpg")) \
            if folder.is_dir() else []
        if not files:
            raise DatasetError(f"{folder}: missing or holds no .JPEG images; expected {layout}")
        paths.extend(files)
        labels.extend([label] * len(files))
    n_train = len(paths)
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetError(f"{ann}: missing; expected {layout}")
    for line_no, line in enumerate(_read_lines(ann), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(f"{ann}, line {line_no}: expected filename<TAB>wnid<TAB>... with a wnid "
                               f"from wnids.txt, got {line!r}")
        path = base / "val" / "images" / fields[0]
        if not path.is_file():
            raise DatasetError(f"{path}: listed in {ann} (line {line_no}) but missing")
        paths.append(path)
        labels.append(index[fields[1]])
    if len(paths) == n_train:
        raise DatasetError(f"{ann}: lists no validation images")
    y = torch.tensor(labels, dtype=torch.int64)

    # 2. Decode.
    def decode(path: Path) -> np.ndarray:
        img = _open_rgb(path)
        if img.size != _TINY_SIZE:
            raise DatasetError(f"{path}: Tiny-ImageNet images are 64x64, this one is {img.size[0]}x{img.size[1]}")
        return np.asarray(img)

    train_x = _decode_into(paths[:n_train], _TINY_SIZE, decode)
    test_x = _decode_into(paths[n_train:], _TINY_SIZE, decode)
    return RawSplits(train_x, y[:n_train].clone(), test_x, y[n_train:].clone(), class_names)
