"""Test-time augmentation as a module, so it can live inside an exported ONNX graph.

level 0: the plain forward pass
level 1: mean of the image and its mirror (2 views)
level 2: level 1, averaged half-and-half with level 1 on the image shifted one pixel up-left and
         down-right with reflect padding (6 views), as in airbench94

All views go through the network as one batch (6 images per input image at level 2): one larger
matrix product is faster than six small ones, above all at batch size 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TTA(nn.Module):
    def __init__(self, net: nn.Module, level: int = 2):
        super().__init__()
        if level not in (0, 1, 2):
            raise ValueError(f"tta level must be 0, 1 or 2, got {level}")
        self.net, self.level = net, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == 0:
            return self.net(x)
        views = [x, x.flip(-1)]
        if self.level == 2:
            h, w = x.shape[-2:]
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            up_left, down_right = padded[..., :h, :w], padded[..., 2:, 2:]
            views += [up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
        n = x.shape[0]
        logits = self.net(torch.cat(views)).reshape(len(views), n, -1)
        mirror = 0.5 * (logits[0] + logits[1])
        if self.level == 1:
            return mirror
        shifted = 0.25 * (logits[2] + logits[3] + logits[4] + logits[5])
        return 0.5 * mirror + 0.5 * shifted


def passes(level: int) -> int:
    """Images through the network per input image at a TTA level (its relative inference cost)."""
    return {0: 1, 1: 2, 2: 6}[level]


def with_tta(net: nn.Module, level: int) -> nn.Module:
    return net if level == 0 else TTA(net, level)
