"""One CNN in four kernel shapes, at (nearly) the same parameter count: 3x3, 5x5, 7x7, 1x1+3x3.

Each of `n_layers` layers is Conv-BN-ReLU of the variant's kernel ("1x1+3x3": a 1x1 conv, then a
3x3 conv, each with its BN-ReLU), all `width` channels wide; a 2x2 max-pool after every
`pool_every` layers; then global average pooling and the linear head.

A bigger kernel costs more weights per channel, so each variant gets its own width: `solve_width`
searches the integer width whose parameter count (head included) is nearest `target_params`, for
the actual number of classes and input channels. The variants then agree within a few percent
and differ in their receptive field: `kernel_variants()` reports widths, counts and receptive
fields; `python -m models` prints them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .base import ImageClassifier
from .receptive_field import analytic_receptive_field
from .registry import count_parameters, register_model

# The convs of one layer, per variant: their kernel sizes in order.
KERNELS: dict[str, tuple[int, ...]] = {
    "3x3": (3,),
    "5x5": (5,),
    "7x7": (7,),
    "1x1+3x3": (1, 3),
}
TOLERANCE = 0.05  # the solved width must land within 5% of the target


class KernelCNN(ImageClassifier):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, kernels: tuple[int, ...],
                 width: int, n_layers: int, pool_every: int, norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for i in range(n_layers):
            for k in kernels:
                layers += [nn.Conv2d(c, width, k, padding=k // 2, bias=not norm),
                           nn.BatchNorm2d(width) if norm else nn.Identity(), nn.ReLU()]
                c = width
            if (i + 1) % pool_every == 0 and size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)


def solve_width(count: Callable[[int], int], target: int, max_width: int = 4096) -> int:
    """The width in 1..max_width whose count(width) is nearest `target`; count must grow with width."""
    # Bisect for the smallest width whose count reaches the target ...
    lo, hi = 1, max_width
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    # ... then take it or the width below, whichever is nearer.
    if lo > 1 and target - count(lo - 1) < count(lo) - target:
        return lo - 1
    return lo


def _meta_net(num_classes: int, in_channels: int, kernels: tuple[int, ...], width: int, n_layers: int,
              norm: bool, image_size: int = 32, pool_every: int = 2) -> KernelCNN:
    # Built on the meta device: shapes only, no memory and no random numbers drawn.
    with torch.device("meta"):
        return KernelCNN(num_classes, in_channels, image_size, kernels, width, n_layers, pool_every, norm)


def _param_count(num_classes: int, in_channels: int, kernels: tuple[int, ...], width: int, n_layers: int,
                 norm: bool) -> int:
    return count_parameters(_meta_net(num_classes, in_channels, kernels, width, n_layers, norm))


def width_for(kernel: str, target_params: int, num_classes: int = 10, in_channels: int = 3,
              n_layers: int = 4, norm: bool = True) -> int:
    """The width of variant `kernel` whose parameter count is nearest `target_params`."""
    kernels = _kernels(kernel)
    width = solve_width(lambda w: _param_count(num_classes, in_channels, kernels, w, n_layers, norm),
                        target_params)
    params = _param_count(num_classes, in_channels, kernels, width, n_layers, norm)
    if abs(params - target_params) > TOLERANCE * target_params:
        raise ValueError(f"kernel_cnn {kernel}: the nearest width ({width}) has {params:,} parameters, more than "
                         f"{TOLERANCE:.0%} off the target {target_params:,}; raise target_params")
    return width


def kernel_variants(target_params: int = 150_000, num_classes: int = 10, in_channels: int = 3,
                    n_layers: int = 4, norm: bool = True, image_size: int = 32, pool_every: int = 2) -> dict[str, dict]:
    """Per variant: its solved width, parameter count, relative distance from the target, and the
    analytic receptive field after each layer (its last conv, and the pool if one follows)."""
    rows = {}
    for kernel, kernels in KERNELS.items():
        width = width_for(kernel, target_params, num_classes, in_channels, n_layers, norm)
        net = _meta_net(num_classes, in_channels, kernels, width, n_layers, norm, image_size, pool_every)
        params = count_parameters(net)
        rows[kernel] = dict(width=width, params=params, rel_error=params / target_params - 1,
                            conv_rf=[layer.rf for layer in analytic_receptive_field(net) if layer.kind == "conv"],
                            final_rf=analytic_receptive_field(net)[-1].rf)
    return rows


def format_kernel_variants(rows: dict[str, dict]) -> str:
    """kernel_variants() as a table, one line per variant."""
    return "\n".join(f"{name:8s} width {r['width']:4d}  params {r['params']:8,d} ({r['rel_error']:+.2%})  "
                     f"conv RF {r['conv_rf']}  final RF {r['final_rf']}" for name, r in rows.items())


def _kernels(kernel: str) -> tuple[int, ...]:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return KERNELS[kernel]


@register_model
def kernel_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, kernel: str = "3x3",
               target_params: int = 150_000, width: int | None = None, n_layers: int = 4,
               pool_every: int = 2, norm: bool = True) -> KernelCNN:
    """Kernel-size study CNN: n_layers Conv-BN-ReLU of kernel 3x3|5x5|7x7|1x1+3x3, width solved for target_params."""
    kernels = _kernels(kernel)
    if width is None:
        width = width_for(kernel, target_params, num_classes, in_channels, n_layers, norm)
    return KernelCNN(num_classes, in_channels, image_size, kernels, width, n_layers, pool_every, norm)

