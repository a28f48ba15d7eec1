"""CIFAR-style ResNet-18, PreAct-ResNet-18 and VGG-16 with batch norm, with a width multiplier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Arch, Classifier, conv_bn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        short = self.short(out) if self.short is not None else x
        out = self.conv1(out)
        return self.conv2(torch.relu(self.bn2(out))) + short


def _resnet(arch: Arch, block: type[nn.Module], preact: bool) -> Classifier:
    w = [max(1, round(v * arch.width)) for v in (64, 128, 256, 512)]
    stem: nn.Module = nn.Conv2d(arch.in_channels, w[0], 3, 1, 1, bias=False) if preact else conv_bn(arch.in_channels, w[0])
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    cin = w[0]
    for i, (cout, stride) in enumerate(zip(w, (1, 2, 2, 2)), 1):
        layer: list[nn.Module] = [block(cin, cout, stride), block(cout, cout, 1)]
        if preact and i == 4:
            layer += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        stages.append((f"layer{i}", nn.Sequential(*layer)))
        cin = cout
    stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    stages.append(("head", nn.Linear(cin, arch.num_classes)))
    return Classifier(arch, stages, conv_stage="layer4")


def resnet18(arch: Arch) -> Classifier:
    return _resnet(arch, BasicBlock, preact=False)


def preact_resnet18(arch: Arch) -> Classifier:
    return _resnet(arch, PreActBlock, preact=True)


def vgg16_bn(arch: Arch) -> Classifier:
    """VGG-16 with batch norm (13 convs in five blocks), global average pooling and a linear head."""
    cfg = [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]
    stages: list[tuple[str, nn.Module]] = []
    cin = arch.in_channels
    for i, block in enumerate(cfg, 1):
        mods: list[nn.Module] = []
        for v in block:
            cout = max(1, round(v * arch.width))
            mods.append(conv_bn(cin, cout))
            cin = cout
        mods.append(nn.MaxPool2d(2, ceil_mode=True))
        stages.append((f"block{i}", nn.Sequential(*mods)))
    stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    stages.append(("head", nn.Linear(cin, arch.num_classes)))
    return Classifier(arch, stages, conv_stage="block5")
