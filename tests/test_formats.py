"""Loaders for the official dataset formats, each run on tiny files written here in that format."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoorlab.data.formats import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    LOADERS,
    RawSplits,
    load_cifar10,
    load_fashion_mnist,
    load_gtsrb,
    load_mnist,
    load_official,
    load_tiny_imagenet,
    read_idx,
)
from backdoorlab.errors import ConfigError, DatasetError, UnknownNameError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------- IDX / MNIST


def idx_bytes(arr: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, dtype_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(idx_bytes(arr))
    else:
        path.write_bytes(idx_bytes(arr))
    return path


def write_mnist(folder: Path, gz: list[bool], n_train: int = 7, n_test: int = 3) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for (name, arr), z in zip(arrays.items(), gz):
        write_idx(folder / name, arr, z)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    arr = RNG.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / "x-idx3-ubyte", arr, gz))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 6)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 5, 6), np.uint8))[:-7])
    with pytest.raises(DatasetError, match="short-idx3-ubyte.*truncated"):
        read_idx(path)
    gz_path = tmp_path / "short-idx3-ubyte.gz"
    gz_path.write_bytes(gzip.compress(idx_bytes(RNG.integers(0, 256, (40, 28, 28), dtype=np.uint8)))[:500])
    with pytest.raises(DatasetError, match="short-idx3-ubyte.gz"):
        read_idx(gz_path)


def test_read_idx_bad_magic_and_dtype(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x01\x00" + idx_bytes(np.zeros(3, np.uint8))[2:])
    with pytest.raises(DatasetError, match="bad-idx1-ubyte.*not an IDX file"):
        read_idx(path)
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8), dtype_code=0x0D))
    with pytest.raises(DatasetError, match="0x0D"):
        read_idx(path)
    with pytest.raises(DatasetError, match="nope-idx1-ubyte"):
        read_idx(tmp_path / "nope-idx1-ubyte")


@pytest.mark.parametrize("sub, gz", [("", [False] * 4), ("raw", [True] * 4), ("MNIST/raw", [True, False, False, True])])
def test_load_mnist_layouts(tmp_path: Path, sub: str, gz: list[bool]) -> None:
    arrays = write_mnist(tmp_path / sub if sub else tmp_path, gz)
    s = load_mnist(tmp_path)
    assert isinstance(s, RawSplits)
    assert s.train_x.shape == (7, 1, 28, 28) and s.test_x.shape == (3, 1, 28, 28)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    np.testing.assert_array_equal(s.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(s.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(s.train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(s.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert s.class_names == [str(i) for i in range(10)] and s.num_classes == 10


def test_load_fashion_mnist_names(tmp_path: Path) -> None:
    write_mnist(tmp_path, [True] * 4)
    s = load_official("fashion-mnist", tmp_path)
    assert s.class_names == FASHION_MNIST_CLASSES and s.class_names[0] == "T-shirt/top" and len(s.class_names) == 10
    assert s.train_x.shape == (7, 1, 28, 28)


@pytest.mark.skipif(not FASHION_MNIST_DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_load_fashion_mnist_debian_package() -> None:
    s = load_fashion_mnist()
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(s.train_y.bincount(), torch.full((10,), 6000))


def test_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*train-images-idx3-ubyte"):
        load_mnist(tmp_path / "nowhere")
    arrays = write_mnist(tmp_path, [False] * 4)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="missing in .*t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:2], gz=False)
    with pytest.raises(DatasetError, match="3 images but .*t10k-labels-idx1-ubyte holds 2 labels"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 10], np.uint8), gz=False)
    with pytest.raises(DatasetError, match="labels must lie in 0..9"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------- CIFAR-10

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(folder: Path, per_batch: int = 3, protocol: int = pickle.DEFAULT_PROTOCOL) -> tuple[np.ndarray, list[int]]:
    folder.mkdir(parents=True, exist_ok=True)
    data = RNG.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in RNG.integers(0, 10, 6 * per_batch)]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        sl = slice(k * per_batch, (k + 1) * per_batch)
        batch = {b"batch_label": name.encode(), b"labels": labels[sl], b"data": data[sl],
                 b"filenames": [b"x.png"] * per_batch}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_NAMES],
                     b"num_vis": 3072}, fh, protocol=protocol)
    return data, labels


@pytest.mark.parametrize("sub, protocol", [("", pickle.DEFAULT_PROTOCOL), ("cifar-10-batches-py", 2)])
def test_load_cifar10(tmp_path: Path, sub: str, protocol: int) -> None:
    data, labels = write_cifar(tmp_path / sub if sub else tmp_path, protocol=protocol)
    s = load_cifar10(tmp_path)
    assert s.train_x.shape == (15, 3, 32, 32) and s.test_x.shape == (3, 3, 32, 32)
    assert s.train_x.dtype == torch.uint8 and s.test_y.dtype == torch.int64
    np.testing.assert_array_equal(s.train_x.numpy().reshape(15, 3072), data[:15])
    np.testing.assert_array_equal(s.test_x.numpy().reshape(3, 3072), data[15:])
    # Channel-planar rows: the first 1024 bytes are the red plane, row-major.
    assert s.train_x[4, 0, 1, 2] == data[4, 32 + 2] and s.train_x[4, 2, 31, 31] == data[4, 3071]
    assert s.train_y.tolist() == labels[:15] and s.test_y.tolist() == labels[15:]
    assert s.class_names == CIFAR_NAMES


def test_load_cifar10_numpy1_module_names(tmp_path: Path) -> None:
    """The official batches name numpy.core.multiarray (numpy 1.x); they must still load."""
    data, _ = write_cifar(tmp_path, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw = (tmp_path / name).read_bytes()
        assert b"numpy._core.multiarray\n_reconstruct" in raw
        (tmp_path / name).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    s = load_cifar10(tmp_path)
    np.testing.assert_array_equal(s.test_x.numpy().reshape(3, 3072), data[15:])


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar10_refuses_forbidden_global(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned.txt"
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Evil(f"echo pwned; echo pwned > {marker}"), b"labels": [0]}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_1.*refusing to unpickle.*system") as info:
        load_cifar10(tmp_path)
    assert isinstance(info.value, OSError)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing.*expected .*data_batch_1\.\.5, test_batch"):
        load_cifar10(tmp_path / "missing")
    write_cifar(tmp_path)
    # The layout is checked before any file is unpickled: a missing test_batch is reported,
    # not the malicious data_batch_1.
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump(_Evil("echo should-not-run"), fh)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DatasetError, match=r"missing test_batch; expected"):
        load_cifar10(tmp_path)
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_3.*uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="data_batch_3: cannot unpickle"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------- GTSRB

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def gtsrb_image(w: int, h: int, box: tuple[int, int, int, int], roi: np.ndarray) -> np.ndarray:
    """A ``h x w`` RGB image, white outside the inclusive ROI ``box``, ``roi`` inside it."""
    img = np.full((h, w, 3), 255, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2 + 1, x1:x2 + 1] = roi
    return img


def write_gtsrb(base: Path, test_csv_dir: str = "Final_Test/Images", roi_size: int = 8) -> dict:
    """Two training images per class, five test images; returns the ROI contents and labels."""
    out = {"train_roi": [], "train_y": [], "test_roi": [], "test_y": []}
    for cid in range(43):
        folder = base / "Final_Training" / "Images" / f"{cid:05d}"
        folder.mkdir(parents=True)
        rows = [HEADER]
        for k in range(2):
            w, h, x1, y1 = 12 + k, 11 + cid % 3, 2 + k, 1 + cid % 2
            box = (x1, y1, x1 + roi_size - 1, y1 + roi_size - 1)
            roi = RNG.integers(0, 250, (roi_size, roi_size, 3), dtype=np.uint8)
            name = f"{cid:05d}_{k:05d}.ppm"
            Image.fromarray(gtsrb_image(w, h, box, roi)).save(folder / name)
            rows.append(f"{name};{w};{h};{box[0]};{box[1]};{box[2]};{box[3]};{cid}")
            out["train_roi"].append(roi)
            out["train_y"].append(cid)
        (folder / f"GT-{cid:05d}.csv").write_text("\n".join(rows) + "\n")
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = [HEADER]
    for k, cid in enumerate([42, 0, 17, 17, 5]):
        colour = np.array([10 * k, 250 - 5 * cid, 33], np.uint8)
        box = (3, 2, 3 + roi_size - 1, 2 + roi_size - 1)
        name = f"{k:05d}.ppm"
        Image.fromarray(gtsrb_image(14, 13, box, colour)).save(test_dir / name)
        rows.append(f"{name};14;13;{box[0]};{box[1]};{box[2]};{box[3]};{cid}")
        out["test_roi"].append(np.broadcast_to(colour, (roi_size, roi_size, 3)))
        out["test_y"].append(cid)
    csv_dir = Path(test_csv_dir) if Path(test_csv_dir).is_absolute() else base / test_csv_dir
    (csv_dir / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return out


@pytest.mark.parametrize("layout", ["GTSRB", "direct", "csv-in-root"])
def test_load_gtsrb_exact_roi(tmp_path: Path, layout: str) -> None:
    base = tmp_path / "GTSRB" if layout != "direct" else tmp_path
    truth = write_gtsrb(base, str(tmp_path) if layout == "csv-in-root" else "Final_Test/Images")
    # size == ROI size: the resize is the identity, so the inclusive crop is checked pixel for pixel.
    s = load_official("gtsrb", tmp_path, size=8)
    assert s.train_x.shape == (86, 3, 8, 8) and s.test_x.shape == (5, 3, 8, 8)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    np.testing.assert_array_equal(s.train_x.permute(0, 2, 3, 1).numpy(), np.stack(truth["train_roi"]))
    np.testing.assert_array_equal(s.test_x.permute(0, 2, 3, 1).numpy(), np.stack(truth["test_roi"]))
    assert s.train_y.tolist() == truth["train_y"] and s.test_y.tolist() == truth["test_y"]
    assert s.class_names == [str(i) for i in range(43)]


def test_load_gtsrb_resize_constant_colour(tmp_path: Path) -> None:
    truth = write_gtsrb(tmp_path / "GTSRB")
    s = load_gtsrb(tmp_path, size=32)
    assert s.test_x.shape == (5, 3, 32, 32)
    for img, roi in zip(s.test_x, truth["test_roi"]):  # no white border pixel may leak in
        assert torch.equal(img, torch.from_numpy(roi[0, 0].copy()).view(3, 1, 1).expand(3, 32, 32))


def test_gtsrb_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"absent.*Final_Training/Images/000NN"):
        load_gtsrb(tmp_path / "absent")
    with pytest.raises(DatasetError, match="no Final_Training/Images folder"):
        load_gtsrb(tmp_path)
    base = tmp_path / "GTSRB"
    write_gtsrb(base)
    # A corrupt image and a CSV without Roi.X2: the CSV is reported (layout before decoding).
    (base / "Final_Training" / "Images" / "00000" / "00000_00000.ppm").write_bytes(b"P6 broken")
    csv_path = base / "Final_Training" / "Images" / "00042" / "GT-00042.csv"
    good_csv = csv_path.read_text()
    csv_path.write_text(good_csv.replace("Roi.Y1;Roi.X2;", "Roi.Y1;"))
    with pytest.raises(DatasetError, match=r"GT-00042.csv: annotation CSV lacks column\(s\) Roi.X2"):
        load_gtsrb(tmp_path)
    csv_path.write_text(good_csv)
    with pytest.raises(DatasetError, match=r"00000_00000.ppm: cannot decode image"):
        load_gtsrb(tmp_path)
    (base / "Final_Test" / "Images" / "GT-final_test.csv").rename(tmp_path / "GT-final_test.test.csv")
    with pytest.raises(DatasetError, match="GT-final_test.csv not found.*GTSRB_Final_Test_GT.zip"):
        load_gtsrb(tmp_path)


# ---------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n01443537", "n01629819", "n01641577"]


def write_tiny(base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                                    "n01641577\tbullfrog, Rana catesbeiana\n")
    colours = {}
    for label, wnid in enumerate(WNIDS):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(2):
            colour = (40 * label + 20 * k + 10, 120, 200 - 50 * label)
            if label == 1 and k == 1:
                Image.new("L", (64, 64), 90).save(folder / f"{wnid}_{k}.JPEG")
                colour = (90, 90, 90)
            else:
                Image.new("RGB", (64, 64), colour).save(folder / f"{wnid}_{k}.JPEG")
            colours[(wnid, k)] = colour
    (base / "val" / "images").mkdir(parents=True)
    val_labels = [2, 0, 2, 1]
    lines = []
    for k, label in enumerate(val_labels):
        Image.new("RGB", (64, 64), (5, 60 * label, 250)).save(base / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "test" / "images").mkdir(parents=True)  # unlabelled, ignored
    return {"colours": colours, "val_y": val_labels}


@pytest.mark.parametrize("nested", [True, False])
def test_load_tiny_imagenet(tmp_path: Path, nested: bool) -> None:
    truth = write_tiny(tmp_path / "tiny-imagenet-200" if nested else tmp_path)
    s = load_tiny_imagenet(tmp_path)
    assert s.train_x.shape == (6, 3, 64, 64) and s.test_x.shape == (4, 3, 64, 64)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert s.train_y.tolist() == [0, 0, 1, 1, 2, 2] and s.test_y.tolist() == truth["val_y"]
    assert s.class_names == ["goldfish, Carassius auratus", "n01629819", "bullfrog, Rana catesbeiana"]
    for i, key in enumerate([(w, k) for w in WNIDS for k in range(2)]):  # JPEG: near-exact on flat colour
        mean = s.train_x[i].float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(truth["colours"][key], dtype=torch.float32), atol=3)
    grey = s.train_x[3]  # the grayscale JPEG, expanded to three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(s.test_x[1, 1].float().mean().item() - 0) < 3 and abs(s.test_x[0, 1].float().mean().item() - 120) < 3


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no wnids.txt.*train/<wnid>/images"):
        load_tiny_imagenet(tmp_path)
    write_tiny(tmp_path)
    ann = tmp_path / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt, line 5"):
        load_tiny_imagenet(tmp_path)
    ann.write_text("val_0.JPEG\tn01443537\t0\t0\t63\t63\nval_7.JPEG\tn01443537\t0\t0\t63\t63\n")
    with pytest.raises(DatasetError, match=r"val_7.JPEG: listed in .* but missing"):
        load_tiny_imagenet(tmp_path)
    ann.write_text("val_0.JPEG\tn01443537\t0\t0\t63\t63\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / WNIDS[2] / "images" / "small.JPEG")
    with pytest.raises(DatasetError, match=r"small.JPEG: Tiny-ImageNet images are 64x64"):
        load_tiny_imagenet(tmp_path)


# ---------------------------------------------------------------------------- registry


def test_registry(tmp_path: Path) -> None:
    assert set(LOADERS) == {"mnist", "fashion-mnist", "cifar10", "gtsrb", "tiny-imagenet"}
    write_cifar(tmp_path)
    assert load_official("cifar10", tmp_path).train_x.shape == (15, 3, 32, 32)
    with pytest.raises(UnknownNameError, match="unknown dataset 'imagenet'"):
        load_official("imagenet", tmp_path)
    with pytest.raises(ConfigError, match="root"):
        load_official("cifar10")
