"""One CNN at any depth, plain or residual: the depth study's net (vanishing gradients vs skips).

`depth` conv layers, all `width` channels wide:
    layer 0            Conv-(BN)-ReLU from the image, then a 2x2 max-pool
    layers 1..depth-1  plain:    x = relu(bn(conv(x)))
                       residual: x = x + relu(bn(conv(x)))     (an identity skip around each conv)
then global average pooling and the linear head. Plain and residual have the same convs and the
same parameter count: the only difference is the skip.

Defaults are chosen so that the plain net shows vanishing gradients: no BatchNorm (`norm=False`)
and PyTorch's default conv init (`init="torch"`, uniform with variance 1/(3 fan_in), a third of
what keeps a ReLU net's signal at scale), so the signal and the gradient shrink by about
sqrt(6) per plain layer; the identity skips carry them past. `init="kaiming"` (He, fan-in) or
`norm=True` take that away. (Residual with init="kaiming" and no norm grows instead: each skip
adds a branch as large as its input.)

Per-layer gradient norms: `conv_layers()` are the convs in depth order, named
features.layers.<i>.conv (`named_conv_layers()`).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .base import ImageClassifier
from .registry import register_model

INITS = ("torch", "kaiming")


class ConvLayer(nn.Module):
    """Conv-(BN)-ReLU, with the input added back when `residual` (then in and out widths agree)."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: bool, residual: bool, pool: bool = False):
        super().__init__()
        if residual and cin != cout:
            raise ValueError("a residual layer keeps its width")
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
        self.norm = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = nn.ReLU()
        self.residual = residual
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.conv(x)))
        if self.residual:  # a constructor flag, not a tensor value: the graph is fixed
            y = x + y
        return self.pool(y)


class DepthCNN(ImageClassifier):
    def __init__(self, num_classes: int, in_channels: int, depth: int, width: int, residual: bool,
                 norm: bool, kernel: int, init: str):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        layers = [ConvLayer(in_channels, width, kernel, norm, residual=False, pool=True)]
        layers += [ConvLayer(width, width, kernel, norm, residual) for _ in range(depth - 1)]
        self.features = nn.Sequential(OrderedDict(
            layers=nn.Sequential(*layers), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        self.head = nn.Linear(width, num_classes)
        if init == "kaiming":
            for conv in self.conv_layers():
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def conv_layers(self) -> list[nn.Conv2d]:
        """The convs in depth order (input side first)."""
        return [layer.conv for layer in self.features.layers]

    def named_conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        return [(f"features.layers.{i}.conv", conv) for i, conv in enumerate(self.conv_layers())]


@register_model
def depth_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 8,
              residual: bool = False, width: int = 32, norm: bool = False, kernel: int = 3,
              init: str = "torch") -> DepthCNN:
    """Depth study CNN: `depth` conv layers (3x3) of one width, plain or residual (identity skips); no BN by default."""
    del image_size  # any size >= 2: one 2x2 pool, then global average pooling
    return DepthCNN(num_classes, in_channels, depth, width, residual, norm, kernel, init)
