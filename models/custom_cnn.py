"""A CNN built from the hand-written layers of models/custom_layers.py (issue 12).

Two stages of WSConv3x3 - Swish - SqueezeExcite - SoftPool2x2, a third WSConv3x3 - Swish, a global
average pool and a linear head. Any image size >= 4 works (the pool at the end is global).

Export path: in eval() (as training.export.export_verified puts it) or without grad, every custom
layer runs its plain-torch reference composition, which torch.onnx (dynamo) traces into standard ONNX
ops (the list is in models/custom_layers.py); while training with grad enabled, the layers run their
autograd.Functions with the hand-written backward passes. The tests show both paths compute the same
outputs and gradients, so the exported graph is the trained function.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ImageClassifier
from .custom_layers import SoftPool2d, SqueezeExcite, Swish, WSConv2d
from .registry import register_model


class CustomCNN(ImageClassifier):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int, reduction: int):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"custom_cnn needs images of at least 4x4 (two 2x2 poolings), got {image_size}")
        w = width
        self.features = nn.Sequential(
            WSConv2d(in_channels, w, 3, padding=1), Swish(), SqueezeExcite(w, reduction), SoftPool2d(2),
            WSConv2d(w, 2 * w, 3, padding=1), Swish(), SqueezeExcite(2 * w, reduction), SoftPool2d(2),
            WSConv2d(2 * w, 4 * w, 3, padding=1), Swish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self._unit_variance_gains(in_channels, image_size)

    @torch.no_grad()
    def _unit_variance_gains(self, in_channels: int, image_size: int) -> None:
        """LSUV-style start (Mishkin & Matas 2016): with no normalisation layer, Swish, the SE gate and
        SoftPool each shrink the signal (std 1 -> 0.0025 by the global pool at a default start, and the
        loss stays at ln 10); set each WSConv's gain, layer by layer, so that its output has unit std on
        a batch of unit Gaussian images. Draws from torch's generator, so the model's seed decides it."""
        h = torch.randn(64, in_channels, image_size, image_size)
        for layer in self.features:
            if isinstance(layer, WSConv2d):
                layer.gain.div_(layer(h).std())
            h = layer(h)


@register_model
def custom_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 32,
               reduction: int = 4) -> CustomCNN:
    """Hand-written-backward CNN: 3 x WSConv-Swish (SE + SoftPool after the first two), global pool, Linear."""
    return CustomCNN(num_classes, in_channels, image_size, width, reduction)
