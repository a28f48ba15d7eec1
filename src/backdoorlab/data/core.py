"""In-memory image datasets: uint8 tensors, batched augmentation on the model's device."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import Tensor


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: shape, classes and which augmentations make sense for it."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    class_names: tuple[str, ...]
    hflip: bool = False  # mirror images: never for digits or traffic signs
    crop_pad: int = 2  # random crop with this much zero padding (0 disables)
    default_target: int = 0
    description: str = ""


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), on one device.

    A float ``x`` of any shape (N, ...) is accepted as a *feature view* (e.g. penultimate
    activations for training a head on them); augmentation is for uint8 images only.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if not ((self.x.dtype == torch.uint8 and self.x.dim() == 4) or (self.x.is_floating_point() and self.x.dim() >= 2)):
            raise ValueError(f"ImageSet.x must be uint8 (N, C, H, W) or a float feature view (N, ...), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageSet.y must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def subset(self, idx: Tensor) -> "ImageSet":
        idx = idx.to(self.x.device)
        return ImageSet(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.x.to(device), self.y.to(device))

    def floats(self) -> Tensor:
        """All images as float in [0, 1] (for small sets; batches use :func:`iterate`)."""
        return to_float(self.x)


@dataclass
class Dataset:
    spec: DatasetSpec
    train: ImageSet
    test: ImageSet
    meta: dict = field(default_factory=dict)

    def with_train(self, train: ImageSet) -> "Dataset":
        return replace(self, train=train)


def to_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def to_uint8(x: Tensor) -> Tensor:
    """Float images in [0, 1] to uint8, rounding to the nearest level (uint8 images pass unchanged)."""
    if x.dtype == torch.uint8:
        return x
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


def augment(x: Tensor, spec: DatasetSpec, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with zero padding and (where allowed) horizontal flip, on a whole float batch."""
    n, _, h, w = x.shape
    dev = x.device
    if spec.crop_pad > 0:
        p = spec.crop_pad
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device="cpu").to(dev)
        rows = (torch.arange(h, device=dev)[None, :] + off[0][:, None])[:, None, :, None]
        cols = (torch.arange(w, device=dev)[None, :] + off[1][:, None])[:, None, None, :]
        bidx = torch.arange(n, device=dev)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if spec.hflip:
        flip = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def iterate(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (float images in [0,1], labels, indices) batches; the data moves to ``device`` once."""
    if device is not None and data.device != torch.device(device):
        data = data.to(device)
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(data.device)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for s in range(0, stop, batch_size):
        idx = order[s : s + batch_size]
        yield to_float(data.x[idx]), data.y[idx], idx
