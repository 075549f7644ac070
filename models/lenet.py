"""LeNet-5 (LeCun et al. 1998): the first CNN of every course, for MNIST-sized inputs and CIFAR alike."""
from __future__ import annotations

import torch.nn as nn

from .base import ImageClassifier, flat_features
from .registry import register_model


class LeNet5(ImageClassifier):
    """conv 5x5 (6) - pool - conv 5x5 (16) - pool - fc 120 - fc 84 - classifier; tanh as in the paper."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        body = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),   # C1, S2
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),                       # C3, S4
            nn.Flatten())
        self.features = nn.Sequential(
            body, nn.Linear(flat_features(body, in_channels, image_size), 120), nn.Tanh(),  # C5
            nn.Linear(120, 84), nn.Tanh())                                                  # F6
        self.head = nn.Linear(84, num_classes)


@register_model
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    """LeNet-5: two 5x5 conv + average-pool stages, then 120-84 fully connected, tanh (about 60k parameters)."""
    return LeNet5(num_classes, in_channels, image_size)
