"""The seeds' simple CNN: `n_layers` blocks of Conv2d-ReLU-MaxPool, then Flatten and Linear.

Its knobs are the ones the seeds tuned with Optuna: `n_layers` (1-5) and `kernel_size` (3-7).
"""
from __future__ import annotations

import torch.nn as nn

from .base import ImageClassifier
from .registry import register_model


class SimpleCNN(ImageClassifier):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, n_layers: int, kernel_size: int,
                 width: int, dropout: float, hidden: int):
        super().__init__()
        if not 1 <= n_layers <= 5:
            raise ValueError(f"n_layers must be in 1..5, got {n_layers}")
        if not 3 <= kernel_size <= 7:
            raise ValueError(f"kernel_size must be in 3..7, got {kernel_size}")
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for i in range(n_layers):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)]
            if size >= 2:  # a 28x28 input allows 4 poolings, 32x32 five
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = out
        layers.append(nn.Flatten())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(c * size * size, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)


@register_model
def simple_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
               n_layers: int = 2, kernel_size: int = 3, width: int = 32,
               dropout: float = 0.0, hidden: int = 128) -> SimpleCNN:
    """The seeds' CNN: n_layers x (Conv-ReLU-MaxPool), Flatten, Linear-ReLU, Linear (n_layers 1-5, kernel 3-7)."""
    return SimpleCNN(num_classes, in_channels, image_size, n_layers, kernel_size, width, dropout, hidden)
