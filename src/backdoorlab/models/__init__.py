"""Models: a registry of architectures that all follow the :class:`Classifier` stage contract."""

from __future__ import annotations

from typing import Callable

from ..data.core import DatasetSpec
from ..registry import Registry
from ..validate import check_positive
from .base import Arch, Classifier
from .resnet import preact_resnet18, resnet18, vgg16_bn
from .small import digit_cnn, traffic_cnn

MODELS: Registry[Callable[[Arch], Classifier]] = Registry("model")
MODELS.add("digit-cnn", digit_cnn)
MODELS.add("traffic-cnn", traffic_cnn)
MODELS.add("resnet18", resnet18)
MODELS.add("preact-resnet18", preact_resnet18)
MODELS.add("vgg16-bn", vgg16_bn)


def arch_for(name: str, spec: DatasetSpec, width: float = 1.0) -> Arch:
    MODELS.get(name)  # fail early on an unknown name
    check_positive("width", width)
    return Arch(name, spec.shape[0], spec.num_classes, (spec.shape[1], spec.shape[2]), float(width))


def build_model(arch_or_name: Arch | str, spec: DatasetSpec | None = None, width: float = 1.0) -> Classifier:
    arch = arch_or_name if isinstance(arch_or_name, Arch) else arch_for(arch_or_name, spec, width)  # type: ignore[arg-type]
    return MODELS.get(arch.name)(arch)


__all__ = ["MODELS", "Arch", "Classifier", "arch_for", "build_model"]
