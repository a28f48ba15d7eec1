"""Training and evaluation: one trainer, shared metrics."""

from .evaluate import accuracy, attack_success_rate, logits, per_class_accuracy, predict, target_labels
from .trainer import TrainConfig, TrainHistory, train

__all__ = ["TrainConfig", "TrainHistory", "accuracy", "attack_success_rate", "logits", "per_class_accuracy", "predict", "target_labels", "train"]
