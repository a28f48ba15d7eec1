import torch

from backdoorlab.data import DATASETS, ImageSet, augment, by_class, by_count, iterate, load_dataset, split, to_float, to_uint8
from backdoorlab.data.core import DatasetSpec
from backdoorlab.errors import DatasetError, UnknownNameError


def test_mnist5k_fixed_stratified_split(mnist5k):
    assert mnist5k.train.x.dtype == torch.uint8 and mnist5k.train.x.shape == (4000, 1, 28, 28)
    assert mnist5k.test.x.shape == (1000, 1, 28, 28)
    assert torch.bincount(mnist5k.train.y).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test.y).tolist() == [100] * 10
    again = load_dataset("mnist5k", cache=False)
    assert torch.equal(again.train.x, mnist5k.train.x) and torch.equal(again.test.y, mnist5k.test.y)
    # the split is a partition of the 5,000 digits: no test image is in the training set
    tr = {bytes(v) for v in mnist5k.train.x.flatten(1).numpy()}
    assert sum(bytes(v) in tr for v in mnist5k.test.x.flatten(1).numpy()) < 5  # mnist has a few exact duplicates at most


def test_digits_scaled_to_uint8(digits):
    assert digits.train.x.shape[1:] == (1, 8, 8) and digits.train.x.max() == 255
    assert len(digits.train) + len(digits.test) == 1797


def test_unknown_dataset_and_missing_root():
    import pytest

    with pytest.raises(UnknownNameError, match="unknown dataset 'nope'.*mnist5k"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset("cifar10")
    assert "mnist" in DATASETS and "tiny-imagenet" in DATASETS


def test_augment_is_a_translation_without_flip_for_digits():
    spec = DatasetSpec("t", (1, 9, 9), 2, ("a", "b"), hflip=False, crop_pad=2)
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = augment(x, spec, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = torch.nonzero(out[:, 0] == 1.0)
    assert len(pos) == 64  # the bright pixel survives every shift of at most 2
    assert ((pos[:, 1:] - 4).abs() <= 2).all()
    assert len({tuple(p) for p in pos[:, 1:].tolist()}) > 5  # and the shifts differ between samples


def test_augment_flip_only_where_allowed():
    x = torch.rand(200, 3, 6, 6)
    spec = DatasetSpec("t", (3, 6, 6), 2, ("a", "b"), hflip=True, crop_pad=0)
    out = augment(x, spec, torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 50 < int(flipped.sum()) < 150
    noflip = DatasetSpec("t", (3, 6, 6), 2, ("a", "b"), hflip=False, crop_pad=0)
    assert torch.equal(augment(x, noflip), x)


def test_iterate_covers_each_index_once(digits):
    seen = torch.cat([idx for _, _, idx in iterate(digits.train, 100, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(len(digits.train)))
    xb, yb, ib = next(iter(iterate(digits.train, 7)))
    assert xb.dtype == torch.float32 and float(xb.max()) <= 1.0
    assert torch.equal(yb, digits.train.y[ib])


def test_float_uint8_roundtrip():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(x)), x)


def test_subset_helpers(mnist5k):
    s = by_class(mnist5k.train, [7, 3])
    assert set(s.y.tolist()) == {0, 1} and len(s) == 800
    c = by_count(mnist5k.train, 100, seed=3)
    assert torch.bincount(c.y).tolist() == [10] * 10
    a, b = split(mnist5k.test, 0.3, seed=1)
    assert len(a) == 300 and len(b) == 700
    assert torch.bincount(a.y).tolist() == [30] * 10


def test_imageset_rejects_wrong_dtype():
    import pytest

    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.int32), torch.zeros(2))
    feats = ImageSet(torch.rand(5, 12), torch.arange(5))  # a float feature view is allowed
    assert len(feats) == 5
