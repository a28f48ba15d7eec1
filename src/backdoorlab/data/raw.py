"""What every official-format loader returns (:class:`RawSplits`) and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backdoorlab.errors import DatasetError


@dataclass
class RawSplits:
    """A dataset as decoded from disk: uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{split}_x must be a uint8 (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{split}_y must be int64 (N,) with N={x.shape[0]}, got {y.dtype} {tuple(y.shape)}")
        for split in ("train", "test"):
            if getattr(self, f"{split}_x").shape[0] == 0:
                raise DatasetError(f"the {split} split holds no images (an empty or truncated file?)")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {tuple(self.train_x.shape[1:])} "
                             f"vs {tuple(self.test_x.shape[1:])}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _as_dir(root: str | Path, layout: str) -> Path:
    """``root`` as a Path; DatasetError (naming ``layout``) if it is not an existing folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist or is not a folder; expected {layout}")
    return path


def _labels_tensor(labels: np.ndarray, num_classes: int, where: str) -> torch.Tensor:
    """int64 tensor of ``labels``; DatasetError naming ``where`` if any is outside ``[0, num_classes)``."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{where}: labels must lie in 0..{num_classes - 1}, "
                           f"found {int(labels.min())}..{int(labels.max())}")
    return torch.from_numpy(labels)
