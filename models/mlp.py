"""Fully connected nets (the seeds' 3-4 layer MLP for MNIST and CIFAR-10)."""
from __future__ import annotations

import torch.nn as nn

from .base import ImageClassifier
from .registry import register_model


class MLP(ImageClassifier):
    """Flatten, then one Linear-ReLU(-Dropout) block per hidden width, then the classifier."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: tuple[int, ...],
                 dropout: float | tuple[float, ...]):
        super().__init__()
        drops = tuple(dropout) if isinstance(dropout, (tuple, list)) else (dropout,) * len(hidden)
        if len(drops) != len(hidden):
            raise ValueError(f"dropout needs one value per hidden layer ({len(hidden)}), got {len(drops)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h, p in zip(hidden, drops):
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if p:
                layers.append(nn.Dropout(p))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)


@register_model
def mlp(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
        hidden: tuple[int, ...] = (512, 256), dropout: float | tuple[float, ...] = 0.0) -> MLP:
    """Fully connected net: len(hidden)+1 Linear layers (3 by default), ReLU, optional dropout per layer."""
    return MLP(num_classes, in_channels, image_size, tuple(hidden), dropout)
