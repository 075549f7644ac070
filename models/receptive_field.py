"""Receptive fields, computed (analytic) and measured (empirical). Pure torch.

Analytic: walk the convs and pools in order with the standard recurrence, from rf = jump = 1 at
the input:
    rf   += (k_eff - 1) * jump        k_eff = dilation * (k - 1) + 1
    jump *= stride
`rf` is the side of the input square one unit of that layer sees, `jump` the input distance between
two neighbouring units.

Empirical: the receptive field is where the input can change one output unit: the nonzero support
of the gradient of the centre unit of a layer's feature map with respect to the input image. The
measurement runs on a copy of the model prepared so that no gradient vanishes by accident:
  - eval mode (BatchNorm uses its statistics, reset to the identity; dropout is off);
  - every conv weight 1/fan_in and every bias 0, input all ones: every activation is positive, so
    each ReLU passes its gradient and no sum of gradients cancels;
  - max-pools replaced by average pools of the same geometry: a max-pool sends the gradient to one
    input per window only (its argmax), so its support is sparser than its receptive field.

`analytic_receptive_field(model)` follows the module order, so it fits chains (a plain CNN, and
nets with identity skips only, like depth_cnn); for a net with branches (the projection shortcuts
of a ResNet) pass the layer spec of its longest path instead.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Union

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str          # "conv" or "pool"
    kernel: int
    stride: int = 1
    dilation: int = 1


@dataclass(frozen=True)
class RFLayer:
    name: str
    kind: str
    kernel: int
    stride: int
    jump: int          # input pixels between neighbouring units of this layer
    rf: int            # side of the input square one unit of this layer sees


_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _square(value, what: str, name: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"{name}: non-square {what} {tuple(value)} is not supported")
        return int(value[0])
    return int(value)


def layer_spec(model: nn.Module) -> list[LayerSpec]:
    """The convs and (non-adaptive) pools of `model` in module order, with their geometry."""
    spec = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kind = "conv"
        elif isinstance(m, _POOLS):
            kind = "pool"
        else:
            continue
        dilation = getattr(m, "dilation", 1)  # AvgPool2d has none
        spec.append(LayerSpec(name, kind, _square(m.kernel_size, "kernel", name),
                              _square(m.stride, "stride", name), _square(dilation, "dilation", name)))
    return spec


def analytic_receptive_field(model_or_spec: Union[nn.Module, Iterable[LayerSpec]]) -> list[RFLayer]:
    """Per layer (conv or pool, in order): its jump and receptive field, by the recurrence above."""
    spec = layer_spec(model_or_spec) if isinstance(model_or_spec, nn.Module) else list(model_or_spec)
    rf, jump, out = 1, 1, []
    for layer in spec:
        k_eff = layer.dilation * (layer.kernel - 1) + 1
        rf += (k_eff - 1) * jump
        jump *= layer.stride
        out.append(RFLayer(layer.name, layer.kind, layer.kernel, layer.stride, jump, rf))
    return out


class _Captured(Exception):
    """Raised by the forward hook: the feature map is caught, the rest of the net need not run."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


@torch.no_grad()
def _prepare(model: nn.Module) -> nn.Module:
    """The copy described in the module docstring: eval, positive weights, average pools."""
    net = copy.deepcopy(model).eval()
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.MaxPool2d):
            # Same window, stride and padding; the gradient then reaches every input of the window.
            avg = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, avg)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.fill_(1.0 / m.weight[0].numel())
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return net


def empirical_receptive_field(model: nn.Module, layer: str, in_channels: int = 3,
                              image_size: int = 64) -> tuple[int, int]:
    """(height, width) of the input region whose pixels have a nonzero gradient of the centre unit
    (all channels) of `layer`'s output, `layer` a name from model.named_modules().

    The image must be large enough for the field to fit: a field that reaches the image border is
    cut there, and this raises instead of returning a clipped size."""
    net = _prepare(model)
    target = net.get_submodule(layer)

    def capture(_module, _inputs, output):
        raise _Captured(output)

    handle = target.register_forward_hook(capture)
    x = torch.ones(1, in_channels, image_size, image_size, requires_grad=True)
    try:
        net(x)
    except _Captured as caught:
        fmap = caught.output
    else:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    finally:
        handle.remove()
    # The centre unit of the feature map: its gradient with respect to the input image.
    h, w = fmap.shape[-2:]
    fmap[0, :, h // 2, w // 2].sum().backward()
    support = x.grad[0].abs().sum(0) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    if rows.numel() == 0:
        raise ValueError(f"layer {layer!r}: the gradient is zero everywhere")
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if top == 0 or left == 0 or bottom == image_size - 1 or right == image_size - 1:
        raise ValueError(f"layer {layer!r}: the receptive field reaches the border of a {image_size}px "
                         f"image; measure with a larger image_size")
    return bottom - top + 1, right - left + 1
