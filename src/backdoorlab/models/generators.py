"""Trigger generators: image-to-image networks g with the input's shape, one per kind of input.

LIRA and WB (Doan et al.) learn a trigger function T(x) = clip(x + ε·tanh(g(x)), 0, 1) together
with the classifier. The generators here follow the shapes LIRA's public code uses per dataset
(see ``shared/notes/algorithms.md``, WB section); layer details are ours:

- ``conv-ae``: a small convolutional autoencoder for 28x28 grey images (MNIST, Fashion-MNIST):
  two stride-2 convolutions down to 7x7, two transposed convolutions back (base width 16);
- ``unet``: a UNet for 32x32 colour images (CIFAR-10, GTSRB): double 3x3 convolutions with batch
  norm, average-pool down three times, bilinear up with skip connections (64..512 channels at the
  default base width 64, as in LIRA);
- ``strided-ae``: a four-stage strided-convolution autoencoder (16..128 channels) for 64x64 images
  (Tiny-ImageNet).

Every generator is fully convolutional: it fits any image whose sides its ``divisor`` divides and
returns the raw map g(x) (no output activation; the attack applies tanh and ε). ``in_channels``
(default: ``channels``) widens the input only, for conditioned generators: ISSBA's encoder reads the
image and its secret (mapped to an image by a learned layer) as extra channels, and returns the image's channels. ``auto`` picks the
generator made for the data's image side (28, 32, 64), or else the first that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry


@dataclass(frozen=True)
class GeneratorEntry:
    build: Callable[..., nn.Module]  # (channels, base width, in_channels=None) -> module
    divisor: int  # image sides must be multiples of this
    default_width: int
    made_for: int  # the image side it is the default for
    description: str

    def misfit(self, shape: tuple[int, int, int]) -> str | None:
        """Why a C x H x W input does not fit (None when it does)."""
        _, h, w = shape
        if h % self.divisor or w % self.divisor or h < self.divisor or w < self.divisor:
            return f"needs image sides that are multiples of {self.divisor}, the data is {shape[0]}x{h}x{w}"
        return None


GENERATORS: Registry[GeneratorEntry] = Registry("generator")


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 if stride == 1 else 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _tbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def conv_autoencoder(channels: int, width: int, in_channels: int | None = None) -> nn.Module:
    """28x28 -> 14 -> 7 -> 14 -> 28 (widths w, 2w, 4w)."""
    w = width
    return nn.Sequential(
        *_cbr(in_channels or channels, w), *_cbr(w, 2 * w, 4, 2), *_cbr(2 * w, 4 * w, 4, 2),
        *_tbr(4 * w, 2 * w), *_tbr(2 * w, w), nn.Conv2d(w, channels, 3, 1, 1),
    )


def strided_autoencoder(channels: int, width: int, in_channels: int | None = None) -> nn.Module:
    """Four stride-2 stages (w, 2w, 4w, 8w) down and four transposed convolutions back."""
    ws = [width * 2**i for i in range(4)]
    down: list[nn.Module] = []
    cin = in_channels or channels
    for w in ws:
        down += _cbr(cin, w, 4, 2)
        cin = w
    up: list[nn.Module] = []
    for w in reversed([width] + ws[:-1]):
        up += _tbr(cin, w)
        cin = w
    return nn.Sequential(*down, *up, nn.Conv2d(cin, channels, 3, 1, 1))


class _Double(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(*_cbr(cin, cout), *_cbr(cout, cout))


class UNet(nn.Module):
    """Three average-pool downsamplings (w, 2w, 4w, 8w channels), bilinear upsampling with skips."""

    def __init__(self, channels: int, width: int, in_channels: int | None = None) -> None:
        super().__init__()
        ws = [width * 2**i for i in range(4)]
        self.inc = _Double(in_channels or channels, ws[0])
        self.down = nn.ModuleList(_Double(a, b) for a, b in zip(ws[:-1], ws[1:]))
        self.up = nn.ModuleList(_Double(b + a, a) for a, b in reversed(list(zip(ws[:-1], ws[1:]))))
        self.out = nn.Conv2d(ws[0], channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.inc(x)]
        for d in self.down:
            skips.append(d(F.avg_pool2d(skips[-1], 2)))
        h = skips.pop()
        for u in self.up:
            s = skips.pop()
            h = u(torch.cat([s, F.interpolate(h, size=s.shape[-2:], mode="bilinear", align_corners=False)], 1))
        return self.out(h)


GENERATORS.add("conv-ae", GeneratorEntry(conv_autoencoder, 4, 8, 28, "small conv autoencoder (28x28 grey images)"))
GENERATORS.add("unet", GeneratorEntry(UNet, 8, 64, 32, "UNet, avg-pool down, bilinear up (32x32 colour images)"))
GENERATORS.add("strided-ae", GeneratorEntry(strided_autoencoder, 16, 16, 64, "four-stage strided-conv autoencoder (64x64 images)"))
AUTO_ORDER = ("conv-ae", "unet", "strided-ae")


def generator_name(name: str, shape: tuple[int, int, int], field: str = "generator") -> str:
    """The generator for ``shape``: ``name`` itself if it fits (ConfigError naming ``field`` if not),
    or for ``auto`` the one made for this image side, else the first that fits."""
    if name == "auto":
        made = [n for n in AUTO_ORDER if GENERATORS.get(n).made_for == shape[1] == shape[2] and GENERATORS.get(n).misfit(shape) is None]
        fits = [n for n in AUTO_ORDER if GENERATORS.get(n).misfit(shape) is None]
        if not (made or fits):
            raise ConfigError(field, f"no generator fits {shape[0]}x{shape[1]}x{shape[2]} images (sides must be multiples of 4)")
        return (made or fits)[0]
    if name not in GENERATORS:
        raise ConfigError(field, f"unknown generator {name!r}; choose auto or one of: {', '.join(GENERATORS.names())}")
    why = GENERATORS.get(name).misfit(shape)
    if why:
        raise ConfigError(field, f"{name!r} {why}")
    return name


def build_generator(name: str, channels: int, width: int | None = None) -> nn.Module:
    entry = GENERATORS.get(name)
    return entry.build(channels, entry.default_width if width is None else width)
