"""Fully connected nets (the seeds' 3-4 layer MLP for MNIST and CIFAR-10)."""
from __future__ import annotations

import torch.nn as nn

from .registry import register_model


@register_model
def mlp(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
        hidden: tuple[int, ...] = (512, 256), dropout: float = 0.0) -> nn.Module:
    """Flatten, then `len(hidden)` Linear-ReLU(-Dropout) layers, then the classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
