"""The Latent Backdoor paper's Digit CNN and TrafficSign CNN, for any input size and channel count."""

from __future__ import annotations

from torch import nn

from .base import Arch, Classifier, flat_dim


def digit_cnn(arch: Arch) -> Classifier:
    """conv16 5x5, pool, conv32 5x5, pool, fc512, fc ('same' padding so any input size works)."""
    c = arch.in_channels
    w16, w32, w512 = (max(1, round(v * arch.width)) for v in (16, 32, 512))
    stages: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Sequential(nn.Conv2d(c, w16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True))),
        ("conv2", nn.Sequential(nn.Conv2d(w16, w32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True))),
    ]
    d = flat_dim(stages, c, arch.image_size)
    stages.append(("fc1", nn.Sequential(nn.Flatten(), nn.Linear(d, w512), nn.ReLU(inplace=True))))
    stages.append(("head", nn.Linear(w512, arch.num_classes)))
    return Classifier(arch, stages, conv_stage="conv2")


def traffic_cnn(arch: Arch) -> Classifier:
    """Six 3x3 convs (32, 32, 64, 64, 128, 128) with a pool after each pair, fc512, fc."""
    c = arch.in_channels
    widths = [max(1, round(v * arch.width)) for v in (32, 64, 128)]
    stages: list[tuple[str, nn.Module]] = []
    for i, w in enumerate(widths, 1):
        stages.append((f"block{i}", nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        )))
        c = w
    d = flat_dim(stages, arch.in_channels, arch.image_size)
    w512 = max(1, round(512 * arch.width))
    stages.append(("fc1", nn.Sequential(nn.Flatten(), nn.Linear(d, w512), nn.ReLU(inplace=True))))
    stages.append(("head", nn.Linear(w512, arch.num_classes)))
    return Classifier(arch, stages, conv_stage="block3")
