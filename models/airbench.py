"""A small, fast CIFAR-10 net in the style of Keller Jordan's airbench94.

A VGG-like stack: a frozen 2x2 "whitening" convolution fitted to the training data (PCA of image
patches), then three groups of Conv3x3-MaxPool-BatchNorm-GELU-Conv3x3-BatchNorm-GELU, a global max-pool
and a linear head. BatchNorm learns only its bias (its scale stays 1), which together with the
scale-invariant filters lets an optimizer like Muon take normalised steps.

The whitening weights are data-dependent: the model declares it (`fit_to_data`, models/base.py) and the
engine calls it with normalised training images before training. Its bias is a role of its own
("whitening_bias"): the recipe trains it for the first epochs only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ImageClassifier
from .registry import register_model


class BatchNormBias(nn.BatchNorm2d):
    """BatchNorm with a fixed scale of 1 and a learned bias; low running-stats inertia."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class Conv3x3(nn.Conv2d):
    """3x3 'same' convolution without bias, initialised partly to the identity (Dirac)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        n = min(self.in_channels, self.out_channels)
        nn.init.dirac_(self.weight.data[:n])


class ConvGroup(nn.Module):
    """conv1 (cin -> mid), pool, BN, GELU, conv2 (mid -> cout), BN, GELU; mid = cout unless pruned apart."""

    def __init__(self, cin: int, cout: int, bn_momentum: float, mid: int | None = None):
        super().__init__()
        mid = cout if mid is None else mid
        self.conv1, self.pool = Conv3x3(cin, mid), nn.MaxPool2d(2)
        self.norm1 = BatchNormBias(mid, bn_momentum)
        self.conv2, self.norm2 = Conv3x3(mid, cout), BatchNormBias(cout, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = self.norm1(self.pool(self.conv1(x)))
        else:
            # The same function in eval mode: BatchNorm's per-channel scale (1 / sqrt(running_var + eps),
            # its weight is frozen at 1) is positive, so it commutes with max-pooling. Normalising
            # before the pool lets exporters fold it into conv1, a cheaper graph in FP32 and INT8.
            x = self.pool(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(self.act(x))))


def conv_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    """Per-conv output widths (group1 conv1, group1 conv2, group2 conv1, ...) from 3 (one per group) or 6."""
    widths = tuple(int(w) for w in widths)
    if len(widths) == 3:
        return tuple(w for w in widths for _ in range(2))
    if len(widths) == 6:
        return widths
    raise ValueError(f"airbench takes 3 widths (one per conv group) or 6 (one per conv); got {len(widths)}")


class AirbenchNet(ImageClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, ...] = (64, 256, 256), whiten_kernel: int = 2,
                 bn_momentum: float = 0.4, logit_scale: float | None = None):
        super().__init__()
        w = conv_widths(widths)
        k = whiten_kernel
        whiten_width = 2 * in_channels * k * k  # each PCA direction, positive and negative
        self.whiten = nn.Conv2d(in_channels, whiten_width, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.features = nn.Sequential(
            nn.GELU(),
            ConvGroup(whiten_width, w[1], bn_momentum, mid=w[0]),
            ConvGroup(w[1], w[3], bn_momentum, mid=w[2]),
            ConvGroup(w[3], w[5], bn_momentum, mid=w[4]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w[5], num_classes, bias=False)
        # A pruned net keeps the scale of the net it was pruned from, so that it computes the same function.
        self.logit_scale = 1.0 / w[5] if logit_scale is None else float(logit_scale)
        with torch.no_grad():
            self.head.weight.mul_(1.0 / self.head.weight.std())

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to the PCA whitening of the k x k patches of `images` (N, C, H, W)."""
        c, (kh, kw) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)        # N, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw).double()
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, kh, kw)
        self.whiten.weight.copy_(torch.cat((filters, -filters)).float())

    def fit_to_data(self, images: torch.Tensor) -> bool:
        self.fit_whitening(images)
        return True

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        return {**super().param_roles(), "whitening_bias": [self.whiten.bias]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.whiten(x))) * self.logit_scale


@register_model
def airbench(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
             widths: tuple[int, ...] = (64, 256, 256), whiten_kernel: int = 2,
             bn_momentum: float = 0.4, logit_scale: float | None = None) -> AirbenchNet:
    """airbench94-style VGG net: data-fitted whitening, 3 conv groups, BN with frozen scale (the default model).

    `widths`: 3 values (each conv group's width) or 6 (each conv's: group1 conv1, group1 conv2, ...), as a
    pruned net has. `logit_scale`: the logits' factor, 1 / last width unless given (a pruned net keeps its
    original's)."""
    del image_size  # any size >= 8 works: the last pooling is adaptive
    return AirbenchNet(num_classes, in_channels, tuple(widths), whiten_kernel, bn_momentum, logit_scale)
