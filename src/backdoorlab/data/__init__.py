"""Data: dataset registry, in-memory uint8 datasets, batched augmentation, subsets."""

from .core import Dataset, DatasetSpec, ImageSet, augment, iterate, to_float, to_uint8
from .sources import DATASETS, load_dataset
from .subset import by_class, by_count, split, stratified_indices

__all__ = [
    "DATASETS", "Dataset", "DatasetSpec", "ImageSet", "augment", "by_class", "by_count", "iterate",
    "load_dataset", "split", "stratified_indices", "to_float", "to_uint8",
]
