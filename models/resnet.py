"""Residual networks: small CIFAR ResNets (He et al. 2016), block variants, and ResNet-50 by hand.

One `ResNet` class builds them all from data (timm's style):

    stem     "cifar":    3x3 conv, stride 1, no max-pool (a 32x32 image keeps its resolution)
             "imagenet": 7x7 conv, stride 2, then 3x3 max-pool, stride 2 (torchvision's)
    block    BasicBlock (3x3, 3x3) or Bottleneck (1x1 reduce, 3x3, 1x1 expand x4)
    layers   blocks per stage; stage i is widths[i] wide and halves the resolution (stride 2,
             on the first block) unless it is the first stage
    norm     BatchNorm after every conv (else none, and the convs get a bias)
    dropout  before the head

The layout follows torchvision's ResNet v1.5 (the stride of a bottleneck is on its 3x3 conv; a
projection shortcut, 1x1 conv + BN, wherever the shape changes), so `resnet50` has exactly
torchvision's parameters. Module names: features.stem, features.layer1 ... layerN, head.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .base import ImageClassifier
from .registry import register_model

# The registered variants as data.
VARIANTS = {
    "resnet_small": dict(block="basic", layers=(3, 3, 3), widths=(16, 32, 64)),  # CIFAR ResNet-20
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512)),
}


def _norm(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, norm: bool = True) -> nn.Conv2d:
    """A 'same'-padded conv; without a norm after it, it keeps its bias."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not norm)


def _shortcut(cin: int, cout: int, stride: int, norm: bool) -> nn.Module | None:
    """Identity (None) when the shape is kept, else a 1x1 projection (+ BN) with the block's stride."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride, norm), _norm(cout, norm))


class BasicBlock(nn.Module):
    """relu(x + bn(conv3x3(relu(bn(conv3x3(x)))))): two 3x3 convs, the first with the stride."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, norm: bool = True, drop: float = 0.0):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride, norm), _norm(planes, norm)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()  # between the convs (WRN's place)
        self.conv2, self.bn2 = _conv(planes, planes, 3, 1, norm), _norm(planes, norm)
        self.act = nn.ReLU()
        self.downsample = _shortcut(cin, planes, stride, norm)

    def last_conv_and_norm(self) -> tuple[nn.Conv2d, nn.Module]:
        return self.conv2, self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.drop(self.act(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """relu(x + 1x1 expand(3x3 (stride)(1x1 reduce(x)))): `planes` inside, 4 x planes out (v1.5)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, norm: bool = True, drop: float = 0.0):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv(cin, planes, 1, 1, norm), _norm(planes, norm)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride, norm), _norm(planes, norm)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.conv3, self.bn3 = _conv(planes, cout, 1, 1, norm), _norm(cout, norm)
        self.act = nn.ReLU()
        self.downsample = _shortcut(cin, cout, stride, norm)

    def last_conv_and_norm(self) -> tuple[nn.Conv2d, nn.Module]:
        return self.conv3, self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.drop(self.act(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return self.act(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("cifar", "imagenet")


def _stem(in_channels: int, width: int, stem: str, norm: bool) -> nn.Sequential:
    if stem == "imagenet":
        return nn.Sequential(_conv(in_channels, width, 7, 2, norm), _norm(width, norm), nn.ReLU(),
                             nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Sequential(_conv(in_channels, width, 3, 1, norm), _norm(width, norm), nn.ReLU())


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' is the CIFAR stem for images up to 64 pixels (a 32x32 image would be 8x8 after the
    ImageNet stem), else the ImageNet stem."""
    if stem == "auto":
        return "cifar" if image_size <= 64 else "imagenet"
    if stem not in STEMS:
        raise ValueError(f"stem must be 'auto', 'cifar' or 'imagenet', got {stem!r}")
    return stem


class ResNet(ImageClassifier):
    def __init__(self, num_classes: int, in_channels: int, block: str, layers: tuple[int, ...],
                 widths: tuple[int, ...], stem: str = "cifar", norm: bool = True, dropout: float = 0.0,
                 block_dropout: float = 0.0, zero_init_residual: bool = False):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
        if len(layers) != len(widths):
            raise ValueError(f"one width per stage: {len(layers)} stages, {len(widths)} widths")
        block_cls = BLOCKS[block]
        parts: list[tuple[str, nn.Module]] = [("stem", _stem(in_channels, widths[0], stem, norm))]
        cin = widths[0]
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            # Stage i: n_blocks blocks; the first changes width and (after stage 0) halves the resolution.
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(cin, planes, stride, norm, block_dropout))
                cin = planes * block_cls.expansion
            parts.append((f"layer{i + 1}", nn.Sequential(*blocks)))
        parts += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        if dropout:
            parts.append(("dropout", nn.Dropout(dropout)))
        self.features = nn.Sequential(OrderedDict(parts))
        self.head = nn.Linear(cin, num_classes)
        self._init_weights(norm, zero_init_residual)

    def blocks(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]

    @torch.no_grad()
    def _init_weights(self, norm: bool, zero_init_residual: bool) -> None:
        # torchvision's init: He-normal (fan-out) convs, BN scale 1 and shift 0, default Linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        blocks = self.blocks()
        for b in blocks:
            conv, bn = b.last_conv_and_norm()
            if norm and zero_init_residual:
                # Each block starts as the identity: its last BN scale is 0 (Goyal et al. 2017).
                nn.init.zeros_(bn.weight)
            elif not norm:
                # No BN to keep the signal in range: scale each residual branch's last conv by
                # L^-1/2 over L blocks (Fixup's rescaling) so the sum of L branches keeps its variance.
                conv.weight.mul_(len(blocks) ** -0.5)


def _small_resnet(num_classes, in_channels, image_size, variant, blocks_per_stage, widths, stem, norm,
                  dropout, block_dropout=0.0, widen=1, zero_init_residual=False) -> ResNet:
    spec = {**variant, "widths": tuple(w * widen for w in widths), "layers": (blocks_per_stage,) * len(widths)}
    return ResNet(num_classes, in_channels, stem=resolve_stem(stem, image_size), norm=norm, dropout=dropout,
                  block_dropout=block_dropout, zero_init_residual=zero_init_residual, **spec)


@register_model
def resnet_small(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 blocks_per_stage: int = 3, widths: tuple[int, ...] = (16, 32, 64), stem: str = "auto",
                 norm: bool = False, dropout: float = 0.0) -> ResNet:
    """Plain residual CNN: CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64), no BN, no dropout."""
    return _small_resnet(num_classes, in_channels, image_size, VARIANTS["resnet_small"], blocks_per_stage,
                         widths, stem, norm, dropout)


@register_model
def resnet_small_reg(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                     blocks_per_stage: int = 3, widths: tuple[int, ...] = (16, 32, 64), stem: str = "auto",
                     norm: bool = True, dropout: float = 0.2) -> ResNet:
    """Regularised residual CNN: resnet_small with BatchNorm after every conv and dropout before the head."""
    return _small_resnet(num_classes, in_channels, image_size, VARIANTS["resnet_small"], blocks_per_stage,
                         widths, stem, norm, dropout)


@register_model
def resblock_net(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 block: str = "basic", blocks_per_stage: int = 2, widths: tuple[int, ...] = (16, 32, 64),
                 widen: int = 4, block_dropout: float = 0.0, stem: str = "auto", norm: bool = True,
                 dropout: float = 0.0) -> ResNet:
    """Residual block variants on one CIFAR ResNet: block='basic' | 'bottleneck' (x4 out) | 'wide' (basic x widen)."""
    # basic:      two 3x3 convs, widths as given
    # bottleneck: 1x1 reduce, 3x3, 1x1 expand; `widths` inside the block, 4x widths between blocks
    # wide:       the basic block `widen` times wider (Zagoruyko & Komodakis' WRN; `block_dropout`
    #             between its convs is WRN's dropout). `widen` applies to 'wide' only.
    kinds = {"basic": ("basic", 1), "bottleneck": ("bottleneck", 1), "wide": ("basic", widen)}
    if block not in kinds:
        raise ValueError(f"block must be 'basic', 'bottleneck' or 'wide', got {block!r}")
    kind, factor = kinds[block]
    return _small_resnet(num_classes, in_channels, image_size, {"block": kind}, blocks_per_stage, widths,
                         stem, norm, dropout, block_dropout, widen=factor)


@register_model
def resnet50(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, stem: str = "auto",
             zero_init_residual: bool = False, dropout: float = 0.0) -> ResNet:
    """ResNet-50 by hand (torchvision v1.5 layout, same parameters); CIFAR stem for images <= 64 px."""
    # With the ImageNet stem its parameter count is torchvision's resnet50(num_classes=K) exactly;
    # the CIFAR stem's 3x3 conv has (7*7 - 3*3) * in_channels * 64 fewer weights, nothing else differs.
    return ResNet(num_classes, in_channels, stem=resolve_stem(stem, image_size), dropout=dropout,
                  zero_init_residual=zero_init_residual, **VARIANTS["resnet50"])
