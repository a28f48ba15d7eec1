"""Training and evaluation: one trainer, shared metrics."""

from .evaluate import accuracy, attack_success_rate, logits, per_class_accuracy, predict, target_labels
from .trainer import Forward, TrainConfig, TrainHistory, TrainHooks, train

__all__ = ["Forward", "TrainConfig", "TrainHistory", "TrainHooks", "accuracy", "attack_success_rate", "logits", "per_class_accuracy", "predict", "target_labels", "train"]
