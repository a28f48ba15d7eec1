"""The model contract: ordered named stages, ``features`` (penultimate activations) and ``head``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild a model: stored in every model file and checked on load."""

    name: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    width: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """e.g. "digit-cnn (width 1) for 1x28x28 inputs and 10 classes"."""
        return f"{self.name} (width {self.width:g}) for {self.in_channels}x{self.image_size[0]}x{self.image_size[1]} inputs and {self.num_classes} classes"

    @staticmethod
    def from_dict(d: dict) -> "Arch":
        return Arch(str(d["name"]), int(d["in_channels"]), int(d["num_classes"]), tuple(int(v) for v in d["image_size"]), float(d.get("width", 1.0)))


class Classifier(nn.Module):
    """A classifier as an ordered list of named stages, the last of which is the linear ``head``.

    "The first K layers" means ``stage_names[:K]`` and "the output of layer K" means
    ``forward_to(x, K)`` everywhere in the toolkit. ``features(x)`` is the input of the head
    (flattened penultimate activations); ``conv_stage`` names the stage whose output is the last
    convolutional feature map (what Fine-Pruning prunes).
    """

    def __init__(self, arch: Arch, stages: list[tuple[str, nn.Module]], conv_stage: str) -> None:
        super().__init__()
        if stages[-1][0] != "head" or not isinstance(stages[-1][1], nn.Linear):
            raise ValueError("the last stage must be the linear 'head'")
        self.arch = arch
        self.stages = nn.ModuleDict(stages)
        self.conv_stage = conv_stage
        # Images enter in channels-last layout on the CPU: the same logits to float rounding (4.5e-8),
        # 1.57x the Digit-CNN's fp32 inference images/s on this toolkit's CPU (docs/results.md section 16)
        self.channels_last = True

    @property
    def head(self) -> nn.Linear:
        return self.stages["head"]  # type: ignore[return-value]

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def _index(self, k: int | str) -> int:
        """Number of stages up to and including ``k`` (an index count or a stage name)."""
        if isinstance(k, str):
            return self.stage_names.index(k) + 1
        if not 0 <= k <= len(self.stages):
            raise ValueError(f"layer count {k} out of range 0..{len(self.stages)}")
        return k

    def forward_to(self, x: Tensor, k: int | str) -> Tensor:
        """Output of the first ``k`` stages (k = 0 is the input itself)."""
        n = self._index(k)
        if n and self.channels_last and x.dim() == 4 and x.device.type == "cpu":
            x = x.to(memory_format=torch.channels_last)  # restrides even one-channel images (contiguous() would not)
        for mod in list(self.stages.values())[:n]:
            x = mod(x)
        return x

    def forward_from(self, h: Tensor, k: int | str) -> Tensor:
        """Run the stages after the first ``k`` on an intermediate activation ``h``."""
        for mod in list(self.stages.values())[self._index(k) :]:
            h = mod(h)
        return h

    def forward_range(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Run stages ``start`` .. ``stop - 1`` (0-based) on ``h``, the output of the first ``start``."""
        for mod in list(self.stages.values())[start:stop]:
            h = mod(h)
        return h

    def features(self, x: Tensor) -> Tensor:
        return self.forward_to(x, len(self.stages) - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def stage_parameters(self, names: list[str]) -> Iterator[nn.Parameter]:
        for n in names:
            yield from self.stages[n].parameters()

    def parameter_names_of(self, names: list[str]) -> list[str]:
        return [f"stages.{n}.{p}" for n in names for p, _ in self.stages[n].named_parameters()]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def flat_dim(stages: list[tuple[str, nn.Module]], in_channels: int, size: tuple[int, int]) -> int:
    """Size of the flattened output of ``stages`` for one input of the given shape."""
    with torch.no_grad():
        x = torch.zeros(1, in_channels, *size)
        for _, m in stages:
            m.eval()
            x = m(x)
            m.train()
    return int(x.flatten(1).shape[1])
