"""Four layers with hand-written backward passes (torch.autograd.Function), and the plain torch
compositions they replace.

  WSConv2dFunction      scaled weight-standardised convolution (NF-Net style):
                        w_hat = gain * (w - mean) / sqrt(fan_in * (var + eps)) per output filter,
                        then conv2d(x, w_hat, b). Backward: the convolution's own adjoints
                        (torch.nn.grad.conv2d_input / conv2d_weight) give dL/dx and dL/dw_hat; the
                        chain rule through the standardisation is written out by hand (the
                        LayerNorm-style formula, plus dL/dgain).
  SqueezeExciteFunction squeeze-and-excitation channel attention (Hu et al. 2018):
                        y = x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2). Backward by hand through
                        the gate, both linear layers, the ReLU and the spatial mean.
  SwishFunction         Swish / SiLU: y = x sigmoid(x); dy/dx = s (1 + x (1 - s)), s = sigmoid(x).
  SoftPoolFunction      SoftPool (Stergiou et al. 2021), k x k windows with stride k: each window's
                        softmax-weighted mean, y = sum_i e^x_i x_i / sum_i e^x_i. Backward by hand:
                        dy/dx_i = w_i (1 + x_i - y), w_i = e^x_i / sum_j e^x_j.

Each has a reference composition of ordinary torch ops (`ws_conv2d_reference`, `squeeze_excite_reference`,
`swish_reference`, `soft_pool2d_reference`) that computes the same function, and an nn.Module
(`WSConv2d`, `SqueezeExcite`, `Swish`, `SoftPool2d`).

How each module becomes standard ops (the export path). A module's `mode` chooses its forward:
  "auto" (default)  the autograd.Function while training with grad enabled (module.training and
                    torch.is_grad_enabled()); otherwise the reference composition
  "function"        always the autograd.Function
  "composition"     always the reference composition
`training.export.export_verified` puts the model in eval(), so the exported graph is the reference
composition, traced by torch.onnx (dynamo) like any other torch code:
  WSConv2d       ReduceMean/Sub/Mul/Sqrt/Div on the weight (onnxsim folds them into a constant
                 standardised weight), then Conv
  SqueezeExcite  ReduceMean over H, W; Gemm (MatMul+Add); Relu; Gemm; Sigmoid; Mul
  Swish          Sigmoid, Mul
  SoftPool2d     ReduceMax over H, W (a per-channel shift for stability; it cancels in the ratio),
                 Sub, Exp, Mul, AveragePool (numerator and denominator), Div
Nothing in the exported graph depends on the autograd.Function tracing through the exporter (torch
2.14's dynamo exporter did trace the Functions' forward too, in mode "function", with the same ops and
parity; a design that relied on it would break whenever that changes). The
tests (tests/test_custom_layers.py) prove the two paths agree in outputs and in gradients, and that
every Function passes torch.autograd.gradcheck in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("auto", "function", "composition")


class _DualPath(nn.Module):
    """A module with a Function path (hand-written backward) and a composition path (plain ops)."""

    mode: str = "auto"

    def set_mode(self, mode: str) -> "_DualPath":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        return self

    def use_function(self) -> bool:
        if self.mode == "auto":
            return self.training and torch.is_grad_enabled()
        return self.mode == "function"

    def run_function(self, fn, *args):
        """fn.apply(*args), in float32 while autocast is on: each hand-written backward is written for the
        dtype of its forward, and autocast would run the forward's products in bf16 but not the backward's."""
        device = args[0].device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn.apply(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                  for a in args))
        return fn.apply(*args)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def set_custom_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set `mode` on every custom layer inside model."""
    for m in model.modules():
        if isinstance(m, _DualPath):
            m.set_mode(mode)
    return model


# ----------------------------------------------------------------------------------------------- (a) WS conv

def _standardize(weight: torch.Tensor, gain: torch.Tensor, eps: float):
    """w_hat = gain * (w - mu) / sqrt(fan_in * (var + eps)), per output filter (biased variance)."""
    w = weight.flatten(1)
    fan_in = w.shape[1]
    mu = w.mean(dim=1, keepdim=True)
    var = w.var(dim=1, unbiased=False, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    x_hat = (w - mu) * inv_std
    w_hat = gain[:, None] * x_hat / math.sqrt(fan_in)
    return w_hat.view_as(weight), x_hat, inv_std


def ws_conv2d_reference(x, weight, gain, bias, stride: int = 1, padding: int = 0, eps: float = 1e-5):
    """Plain ops: standardise the filters, then F.conv2d."""
    w = weight.flatten(1)
    mu = w.mean(dim=1, keepdim=True)
    var = ((w - mu) ** 2).mean(dim=1, keepdim=True)
    w_hat = gain[:, None] * (w - mu) / torch.sqrt(w.shape[1] * (var + eps))
    return F.conv2d(x, w_hat.view_as(weight), bias, stride=stride, padding=padding)


class WSConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gain, bias, stride: int, padding: int, eps: float):
        w_hat, x_hat, inv_std = _standardize(weight, gain, eps)
        ctx.save_for_backward(x, w_hat, x_hat, inv_std, gain)
        ctx.conf = (stride, padding, bias is not None)
        return F.conv2d(x, w_hat, bias, stride=stride, padding=padding)

    @staticmethod
    def backward(ctx, gy):
        x, w_hat, x_hat, inv_std, gain = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        gx = gw = ggain = gb = None
        # 1. the convolution's adjoints: dL/dx (a transposed convolution) and dL/dw_hat
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, w_hat, gy, stride=stride, padding=padding)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = torch.nn.grad.conv2d_weight(x, w_hat.shape, gy, stride=stride, padding=padding).flatten(1)
            scale = 1.0 / math.sqrt(g.shape[1])
            # 2. w_hat = gain * x_hat * scale:  dL/dgain = scale * sum(g * x_hat),  dL/dx_hat = g * gain * scale
            ggain = scale * (g * x_hat).sum(dim=1)
            d_xhat = g * (gain[:, None] * scale)
            # 3. x_hat = (w - mean) / sqrt(var + eps), per filter of n = fan_in values:
            #    dL/dw = inv_std * (d_xhat - mean(d_xhat) - x_hat * mean(d_xhat * x_hat))
            gw = inv_std * (d_xhat - d_xhat.mean(dim=1, keepdim=True)
                            - x_hat * (d_xhat * x_hat).mean(dim=1, keepdim=True))
            gw = gw.view_as(w_hat)
        if has_bias and ctx.needs_input_grad[3]:
            gb = gy.sum(dim=(0, 2, 3))                                  # 4. dL/db: sum over batch and pixels
        return gx, gw, ggain, gb, None, None, None


class WSConv2d(_DualPath):
    """Conv2d with scaled weight standardisation and a learnable per-filter gain (NF-Net's WSConv2d)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.stride, self.padding, self.eps = stride, padding, eps
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight)
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_function():
            return self.run_function(WSConv2dFunction, x, self.weight, self.gain, self.bias, self.stride,
                                     self.padding, self.eps)
        return ws_conv2d_reference(x, self.weight, self.gain, self.bias, self.stride, self.padding, self.eps)


# ----------------------------------------------------------------------------------------------- (b) SE

def squeeze_excite_reference(x, w1, b1, w2, b2):
    """Plain ops: squeeze (spatial mean), excite (Linear-ReLU-Linear-Sigmoid), rescale the channels."""
    gate = torch.sigmoid(F.linear(torch.relu(F.linear(x.mean(dim=(2, 3)), w1, b1)), w2, b2))
    return x * gate[:, :, None, None]


class SqueezeExciteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        s = x.mean(dim=(2, 3))                        # squeeze          (N, C)
        z = torch.relu(F.linear(s, w1, b1))           # reduce + ReLU    (N, R)
        e = torch.sigmoid(F.linear(z, w2, b2))        # expand + gate    (N, C)
        ctx.save_for_backward(x, s, z, e, w1, w2)
        return x * e[:, :, None, None]

    @staticmethod
    def backward(ctx, gy):
        x, s, z, e, w1, w2 = ctx.saved_tensors
        hw = x.shape[2] * x.shape[3]
        de = (gy * x).sum(dim=(2, 3))                 # y = x * e:          dL/de = sum_hw gy * x
        da2 = de * e * (1 - e)                        # e = sigmoid(a2):    dL/da2 = dL/de * e (1 - e)
        gw2, gb2 = da2.t() @ z, da2.sum(dim=0)        # a2 = z W2^T + b2
        dz = da2 @ w2
        da1 = dz * (z > 0).to(dz.dtype)               # z = relu(a1)
        gw1, gb1 = da1.t() @ s, da1.sum(dim=0)        # a1 = s W1^T + b1
        ds = da1 @ w1
        gx = gy * e[:, :, None, None] + (ds / hw)[:, :, None, None]   # direct path + through the mean
        return gx, gw1, gb1, gw2, gb2


class SqueezeExcite(_DualPath):
    """Channel attention: x * sigmoid(fc2(relu(fc1(mean_hw(x)))))."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if self.use_function():
            return self.run_function(SqueezeExciteFunction, *args)
        return squeeze_excite_reference(*args)


# ----------------------------------------------------------------------------------------------- (c) Swish

def swish_reference(x):
    return x * torch.sigmoid(x)


class SwishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return gy * s * (1 + x * (1 - s))             # d(x s)/dx = s + x s (1 - s)


class Swish(_DualPath):
    """Swish / SiLU, x * sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_function(SwishFunction, x) if self.use_function() else swish_reference(x)


# ----------------------------------------------------------------------------------------------- (d) SoftPool

def soft_pool2d_reference(x, kernel_size: int = 2):
    """Plain ops: sum(e^x * x) / sum(e^x) over each k x k window (stride k, floor mode).

    e^x is taken after subtracting each (sample, channel)'s maximum, so it never overflows; the shift
    cancels in the ratio, so it is treated as a constant (detached)."""
    e = torch.exp(x - x.detach().amax(dim=(2, 3), keepdim=True))
    return F.avg_pool2d(e * x, kernel_size) / F.avg_pool2d(e, kernel_size)


class SoftPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k: int):
        e = torch.exp(x - x.amax(dim=(2, 3), keepdim=True))
        den = F.avg_pool2d(e, k)                              # window mean of e (sum / k^2)
        y = F.avg_pool2d(e * x, k) / den
        ctx.save_for_backward(x, e, den, y)
        ctx.k = k
        return y

    @staticmethod
    def backward(ctx, gy):
        x, e, den, y = ctx.saved_tensors
        k = ctx.k
        ho, wo = y.shape[2:]

        def up(t):  # each window's value on each of its k x k pixels
            return t.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)

        xc, ec = x[:, :, :ho * k, :wo * k], e[:, :, :ho * k, :wo * k]
        w = ec / up(den * (k * k))                             # w_i = e_i / sum_window e
        gx = torch.zeros_like(x)                               # pixels in no window (floor mode) get 0
        gx[:, :, :ho * k, :wo * k] = up(gy) * w * (1 + xc - up(y))   # dy/dx_i = w_i (1 + x_i - y)
        return gx, None


class SoftPool2d(_DualPath):
    """SoftPool over k x k windows with stride k."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.kernel_size or x.shape[-2] < self.kernel_size:
            raise ValueError(f"SoftPool2d: input {tuple(x.shape[-2:])} is smaller than the "
                             f"{self.kernel_size}x{self.kernel_size} window")
        if self.use_function():
            return self.run_function(SoftPoolFunction, x, self.kernel_size)
        return soft_pool2d_reference(x, self.kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, mode={self.mode}"
