"""Quantization-aware training (QAT): fine-tune a trained net with INT8 fake quantization in the loop and
export it as a QDQ ONNX graph that ONNX Runtime runs as INT8 (lab/backends/onnx_int8.py), for networks
that post-training INT8 (training/quantize.py) hurts too much.

    qat = prepare(net, calibration)                          # float32 NCHW training images, normalised
    finetune(qat, train_set, spec, cfg, epochs=1, teacher=fp32_logits)
    record = export_qdq(qat, tta_level, parity_batch, out_dir / "model.qat.int8.onnx")

The approach: hand-written fake quantization (torch.fake_quantize_per_tensor_affine / _per_channel_affine,
straight-through gradients) in wrapper modules around each Conv2d, WSConv2d and Linear the net calls,
exported with the project's dynamo exporter. Chosen because it is the only route in this torch (2.14)
that both exists and reaches the layers the nets use: PT2E (prepare_qat_pt2e and its quantizers) has
left torch.ao for torchao, which is not installed (nor is NNCF); eager torch.ao.quantization.prepare_qat
swaps only nn.Conv2d / nn.Linear (not custom_cnn's WSConv2d, whose quantized weight is the *standardised*
filter) and needs QuantStub / DeQuantStub edits in every model. For the export, the net is copied with
its integers fixed and its fake quantization run as one custom op whose ONNX translation is
QuantizeLinear -> DequantizeLinear (the one torch-version workaround, see `qdq`); a small pass on the
graph then stores each weight as an int8 initializer and each bias as int32 (scale = input scale x weight
scale), the form ONNX Runtime's own quantizer writes, so no float weight is left in the file. onnxsim is
not run: the exporter's graph needs nothing from it (onnxsim 0.8.1 was checked to keep both the QDQ pairs
and the int8 initializers, so running it would be harmless today, but it would be one more tool between
the checked graph and the file, whose future versions may fold QDQ on constants).

What is quantized matches what ONNX Runtime fuses into INT8 kernels (checked at export on the graph ORT
optimises, `int8_kernels`): per output channel symmetric int8 weights (range +-127, or ORT's 7-bit +-64 on
CPUs without int8 dot products, where ORT's kernels would saturate 8-bit ones; see prepare), per-tensor asymmetric u8 (or s8)
activations at every quantized layer's input, a convolution's output quantized too (ORT makes a
QLinearConv only of DequantizeLinear -> Conv -> QuantizeLinear; a Linear runs as QGemm with a float output
without one, so the logits stay float). Everything else (Swish, squeeze-excite, SoftPool, pooling,
BatchNorm) stays float, unlike post-training quantization with ORT's defaults, which quantizes every
operator it has a kernel for.

Activation ranges are calibrated with MinMax on training images (ORT's default recipe: the fp32 net's
range of each tensor over the calibration images) and then stay frozen during the fine-tune; weight
scales follow the weights (max |w| per channel each step, as any exporter computes them from the final
weights). Frozen rather than learned (LSQ) or moving averages: a fine-tune of an epoch or two at a tenth
of the training LR barely moves the fp32 ranges; learned scales need their own learning rate and are
unstable in so short a run; and a frozen grid makes the trained function exactly the exported one, with
no observer state that drifts between the last step and the export. BatchNorm stays in eval mode (its
running statistics frozen) for the same reason.

Refusals raise QATError with one line: a net with no layer to quantize, a net the exporter cannot
trace, a graph ONNX Runtime would not run as INT8, or an export that disagrees with the fake-quant net.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import tempfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.custom_layers import WSConv2d

ACTIVATIONS = {"u8": (0, 255), "s8": (-128, 127)}    # per-tensor asymmetric, as ORT's QuantType.QUInt8 / QInt8
WEIGHT_QMAX = {False: 127, True: 64}                 # symmetric int8 weights; reduce_range: ORT's 7-bit range
# The torch-version-specific part, all of it in this block (tests/test_qat.py checks that it still works):
# torch.export cannot trace torch.fake_quantize_per_tensor_affine once the batch axis is dynamic (torch
# 2.14: "UnsupportedOperatorException: aten.fake_quantize_per_tensor_affine_cachemask.default"; with a
# fixed batch it exports, but the served graph takes any batch), and torch.onnx converts fake_quantize_*
# only for the ranges (0, 255) and (-128, 127). So the copy that is exported runs its fake quantization as
# one custom op, lab_qat::qdq, whose ONNX translation is QuantizeLinear -> DequantizeLinear: the integer
# type is the zero point's (uint8 / int8), the scale per tensor (0-d) or per channel along `axis`.


def _qdq_eager(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear (ONNX semantics: round half to even, saturate)."""
    info = torch.iinfo(zero_point.dtype)
    zp = zero_point.to(torch.int32)
    if scale.ndim == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zp, info.min, info.max)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, axis, info.min, info.max)


if not hasattr(torch.ops.lab_qat, "qdq"):   # once per process (this file may run as __main__ and be imported)
    torch.library.custom_op("lab_qat::qdq", _qdq_eager, mutates_args=()).register_fake(
        lambda x, scale, zero_point, axis: torch.empty_like(x))
qdq = torch.ops.lab_qat.qdq.default


def _qdq_onnx(x, scale, zero_point, axis: int):
    from onnxscript import opset18 as op

    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, axis=axis), scale, zero_point, axis=axis)


EXPORT_TRANSLATIONS = {qdq: _qdq_onnx}


INT8_KERNELS = ("QLinearConv", "QGemm", "ConvInteger", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv")
# export parity: fake-quant torch vs ONNX Runtime INT8 logits (see export_qdq)
PARITY_ATOL = 0.02
PARITY_TOP1 = 0.99


class QATError(ValueError):
    """A net, setting or export that quantization-aware training refuses; the message is one line."""


# ---------------------------------------------------------------- fake quantization modules


class ActQuant(nn.Module):
    """Per-tensor asymmetric fake quantization of an activation: ONNX's QuantizeLinear + DequantizeLinear.

    While `observing`, it records the running min and max of what passes through (MinMax calibration) and
    returns it unchanged; `freeze()` turns them into a scale and zero point (ORT's compute_scale_zp: the
    range widened to include 0), after which it fake-quantizes."""

    def __init__(self, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.observing = True
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.exporting = False   # export_qdq's frozen copy: lab_qat::qdq with the scale and a typed zero point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            return qdq(x, self.scale, self.zero_point.to(torch.uint8 if self.qmin == 0 else torch.int8), -1)
        if self.observing:
            with torch.no_grad():
                self.min_val.copy_(torch.minimum(self.min_val, x.detach().min().float()))
                self.max_val.copy_(torch.maximum(self.max_val, x.detach().max().float()))
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def freeze(self) -> None:
        if not torch.isfinite(self.min_val) or not torch.isfinite(self.max_val):
            raise QATError("a quantized layer saw no calibration data (it is not on the forward path, or the "
                           "calibration set is empty)")
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        scale = (hi - lo) / (self.qmax - self.qmin)
        if scale < np.finfo(np.float32).tiny:
            scale, zp = 1.0, 0
        else:
            zp = int(np.clip(round(self.qmin - lo / scale), self.qmin, self.qmax))
        self.scale.fill_(float(np.float32(scale)))
        self.zero_point.fill_(zp)
        self.observing = False

    def extra_repr(self) -> str:
        return (f"range=({self.qmin}, {self.qmax}), " + ("observing" if self.observing else
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"))


def _ws_weight(layer: WSConv2d) -> torch.Tensor:
    """WSConv2d's standardised filters, the composition of models.custom_layers.ws_conv2d_reference."""
    w = layer.weight.flatten(1)
    mu = w.mean(dim=1, keepdim=True)
    var = ((w - mu) ** 2).mean(dim=1, keepdim=True)
    return (layer.gain[:, None] * (w - mu) / torch.sqrt(w.shape[1] * (var + layer.eps))).view_as(layer.weight)


def _plain_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is base.forward


def _kind(module: nn.Module) -> str | None:
    """"conv" / "wsconv" / "linear" for the layers QAT quantizes; None for the rest."""
    if isinstance(module, WSConv2d) and _plain_forward(module, WSConv2d):
        return "wsconv"
    if isinstance(module, nn.Conv2d) and _plain_forward(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear) and _plain_forward(module, nn.Linear):
        return "linear"
    return None


class QuantLayer(nn.Module):
    """A Conv2d / WSConv2d / Linear with fake-quantized input, weight (per output channel, symmetric),
    bias (int32 at input scale x weight scale) and, for a convolution, output. Keeps the original layer
    as `layer`, so its parameters are the ones trained."""

    def __init__(self, layer: nn.Module, kind: str, act_range: tuple[int, int], weight_qmax: int):
        super().__init__()
        self.layer, self.kind, self.weight_qmax = layer, kind, weight_qmax
        self.input_quant = ActQuant(*act_range)
        self.output_quant = ActQuant(*act_range) if kind != "linear" else None
        self.exporting = False   # export_qdq's frozen copy: the integers computed once, as constants

    # the wrapped layer's parameters under their own names, so that a model naming them (airbench's
    # param_roles: self.whiten.bias) finds them through the wrapper
    @property
    def weight(self) -> nn.Parameter:
        return self.layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.layer.bias

    def effective_weight(self) -> torch.Tensor:
        return _ws_weight(self.layer) if self.kind == "wsconv" else self.layer.weight

    def weight_scale(self, w: torch.Tensor) -> torch.Tensor:
        return (w.detach().abs().flatten(1).amax(1).float() / self.weight_qmax).clamp_min(1e-12)

    def quantized_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fake-quantized weight and bias (straight-through gradients)."""
        w = self.effective_weight()
        scale = self.weight_scale(w)
        zeros = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
        wq = torch.fake_quantize_per_channel_affine(w, scale, zeros, 0, -self.weight_qmax, self.weight_qmax)
        b = self.layer.bias
        if b is not None:
            b_scale = self.input_quant.scale * scale
            bq = torch.round(b.detach() / b_scale).clamp(-2 ** 31, 2 ** 31 - 1) * b_scale
            b = b + (bq - b).detach()
        return wq, b

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "conv":
            return self.layer._conv_forward(x, w, b)
        if self.kind == "wsconv":
            return F.conv2d(x, w, b, stride=self.layer.stride, padding=self.layer.padding)
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        if self.exporting:
            zeros = torch.zeros(len(self.export_scale), dtype=torch.int8)
            w = qdq(self.export_weight, self.export_scale, zeros, 0)
            b = self.export_bias
        elif self.input_quant.observing:    # calibration: the fp32 net
            w, b = self.effective_weight(), self.layer.bias
        else:
            w, b = self.quantized_weight_and_bias()
        y = self._op(x, w, b)
        return self.output_quant(y) if self.output_quant is not None else y

    @torch.no_grad()
    def freeze_for_export(self) -> None:
        """Replace the weight computation by constants: the dequantized integer weight and its scale (the
        exporter writes QuantizeLinear -> DequantizeLinear on them, which _fold_constant_quantizers turns
        into an int8 initializer), and the dequantized int32 bias."""
        wq, b = self.quantized_weight_and_bias()
        self.register_buffer("export_scale", self.weight_scale(self.effective_weight()).clone())
        self.register_buffer("export_weight", wq.detach().clone().contiguous())
        self.register_buffer("export_bias", None if b is None else b.detach().clone())
        for q in (self.input_quant, self.output_quant):
            if q is not None:
                q.exporting = True
        self.exporting = True

    def extra_repr(self) -> str:
        return f"kind={self.kind}, weight_qmax={self.weight_qmax}"


class QATNet(nn.Module):
    """The net with its Conv2d / WSConv2d / Linear layers wrapped in QuantLayer. Trains with the project's
    engine like a registry model: the net's roles (head, ...) carry over, it has no data-fitted layer to
    refit (fit_to_data is a no-op: the net is trained already), and its BatchNorm layers stay in eval mode."""

    def __init__(self, net: nn.Module, activations: str, reduce_range: bool, layers: list[str],
                 left_float: list[str]):
        super().__init__()
        self.net = net
        self.activations, self.reduce_range = activations, reduce_range
        self.quantized_layers, self.left_float = layers, left_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> "QATNet":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def fit_to_data(self, images: torch.Tensor) -> bool:
        del images
        return False

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier() if hasattr(self.net, "get_classifier") else nn.Identity()

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        if hasattr(self.net, "param_roles"):
            return self.net.param_roles()
        return {"head": []}

    def quant_layers(self) -> list[QuantLayer]:
        return [m for m in self.modules() if isinstance(m, QuantLayer)]

    def settings(self) -> dict:
        qmax = WEIGHT_QMAX[self.reduce_range]
        return {"weights": f"int8 per output channel, symmetric (+-{qmax})", "activations":
                f"{self.activations} per tensor, asymmetric, MinMax-calibrated, frozen",
                "reduce_range": self.reduce_range, "quantized_layers": len(self.quantized_layers),
                "left_float": list(self.left_float)}


# ---------------------------------------------------------------- prepare


def _batches(calibration: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(calibration, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(calibration)
        if t.ndim != 4 or len(t) == 0:
            raise QATError(f"calibration images must be a non-empty float NCHW batch, got shape {tuple(t.shape)}")
        return [t[i:i + batch_size] for i in range(0, len(t), batch_size)]
    return (torch.as_tensor(b) for b in calibration)


def prepare(net: nn.Module, calibration: Any, *, activations: str = "u8", reduce_range: bool | None = None,
            batch_size: int = 256) -> QATNet:
    """A copy of `net` (trained, fp32) with fake quantization at every Conv2d / WSConv2d / Linear whose
    forward is the plain one, activation ranges calibrated (MinMax) on `calibration`: normalised float
    NCHW training images (an array or tensor, or an iterable of batches). `activations`: "u8" or "s8".
    `reduce_range`: 7-bit weights; None = on a CPU without int8 dot products (AVX2 only), for u8 and s8
    activations alike: there ORT's int8 kernels add pairs of products in 16 bits, which 8-bit weights
    overflow (measured: s8 activations with 8-bit weights miss parity on AVX2, 0.24 logits on a small CNN;
    with 7-bit weights they match to 5e-7). `net` itself is not changed."""
    if activations not in ACTIVATIONS:
        raise QATError(f"unknown activation type {activations!r}; valid: {', '.join(ACTIVATIONS)}")
    if reduce_range is None:
        from lab.hardware import cpu_has_int8_dot

        reduce_range = not cpu_has_int8_dot()
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    batches = [b.to(device, torch.float32) for b in _batches(calibration, batch_size)]
    if not batches or not len(batches[0]):
        raise QATError("no calibration images")
    inner = copy.deepcopy(net).float().eval()
    # only layers that run as modules are quantized: a Linear whose weight a parent reads directly (the
    # squeeze-excite of custom_cnn) is not a layer of the graph
    called: set[str] = set()
    candidates = {name: kind for name, m in inner.named_modules() if (kind := _kind(m)) is not None}
    hooks = [inner.get_submodule(name).register_forward_hook(lambda *_, n=name: called.add(n))
             for name in candidates]
    try:
        with torch.no_grad():
            inner(batches[0][:2])
    except Exception as e:
        raise QATError(f"{type(net).__name__} fails on the calibration images: {_one_line(e)}") from e
    finally:
        for h in hooks:
            h.remove()
    targets, left_float = [], []
    for name, module in inner.named_modules():
        if any(name.startswith(t + ".") for t, _ in targets):
            continue   # inside a layer already taken (none of the supported layers nest)
        if name in candidates and name in called:
            targets.append((name, candidates[name]))
        elif name in candidates:
            left_float.append(f"{name} ({type(module).__name__}: its weights are used, it is not called)")
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)):
            left_float.append(f"{name} ({type(module).__name__}: its own forward)")
    if not targets:
        raise QATError(f"{type(net).__name__} has no Conv2d, WSConv2d or Linear layer (with a plain forward) "
                       f"to quantize")
    for name, kind in targets:
        if not name:   # the net itself is one layer
            inner = QuantLayer(inner, kind, ACTIVATIONS[activations], WEIGHT_QMAX[reduce_range])
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = inner.get_submodule(parent_name)
        setattr(parent, attr, QuantLayer(getattr(parent, attr), kind, ACTIVATIONS[activations],
                                         WEIGHT_QMAX[reduce_range]))
    qat = QATNet(inner, activations, reduce_range, [n or "<net>" for n, _ in targets], left_float).to(device)
    qat.eval()
    with torch.no_grad():
        for batch in batches:
            qat(batch)
    for layer in qat.quant_layers():
        layer.input_quant.freeze()
        if layer.output_quant is not None:
            layer.output_quant.freeze()
    return qat


# ---------------------------------------------------------------- fine-tune


def finetune(qat_net: QATNet, train_set: Any, spec: Any, cfg: Any, epochs: float = 1.0, *,
             teacher: torch.Tensor | None = None, lr_scale: float = 0.1, **train_kwargs) -> Any:
    """A few epochs of training.engine.train on `qat_net` (straight-through gradients through the fake
    quantization), with `cfg` (the model's TrainConfig) at `epochs`, its learning rates times `lr_scale`
    (a fine-tune of a trained net: a tenth of the training LR by default), fp32 (bf16 autocast would
    quantize the quantization grid itself) and not compiled. `teacher`: logits per training image for
    a distillation loss (cfg.distill_weight, cfg.distill_temperature; e.g. the fp32 net's own outputs).
    Returns the engine's TrainResult; qat_net is trained in place (and is its `model`, unless cfg
    averages weights)."""
    if not isinstance(qat_net, QATNet):
        raise QATError(f"finetune takes the QATNet prepare() returns, not {type(qat_net).__name__}")
    if not epochs > 0 or not lr_scale > 0:
        raise QATError(f"epochs and lr_scale must be positive, got {epochs!r} and {lr_scale!r}")
    from training.engine import train

    scaled = {k: getattr(cfg, k) * lr_scale for k in ("lr", "head_lr", "bias_lr") if getattr(cfg, k) is not None}
    cfg = dataclasses.replace(cfg, epochs=epochs, precision="fp32", compile=False, **scaled)
    train_kwargs.setdefault("progress", False)
    return train(qat_net, train_set, spec, cfg, teacher=teacher, **train_kwargs)


# ---------------------------------------------------------------- export


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _axis(node, default: int = 1) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), default)


def _broadcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _fold_constant_quantizers(model) -> int:
    """Each QuantizeLinear of a constant becomes its integer initializer (ONNX semantics: round half to
    even, saturate to the zero point's type), so the file holds int8 weights. Returns how many."""
    from onnx import numpy_helper

    consts = _constants(model)
    keep, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in consts and len(node.input) == 3 \
                and node.input[1] in consts and node.input[2] in consts:
            x, scale, zp = consts[node.input[0]], consts[node.input[1]], consts[node.input[2]]
            axis = _axis(node) % max(x.ndim, 1)
            info = np.iinfo(zp.dtype)
            q = np.rint(x.astype(np.float32) / _broadcast(scale, x.ndim, axis)) + _broadcast(zp, x.ndim, axis)
            model.graph.initializer.append(numpy_helper.from_array(
                np.clip(q, info.min, info.max).astype(zp.dtype), node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    _drop_unused(model)
    return folded


def _quantize_biases(model) -> int:
    """A Conv/Gemm whose input and weight come from DequantizeLinear and whose bias is a float constant:
    the bias becomes an int32 initializer with its DequantizeLinear (scale = input scale x weight scale,
    zero point 0), the form ORT's quantizer writes and ORT's QLinearConv/QGemm fusion takes."""
    from onnx import helper, numpy_helper

    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    new_nodes, done = [], 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in consts:
            dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
            if dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear" \
                    and dq_x.input[1] in consts and dq_w.input[1] in consts:
                s = (consts[dq_x.input[1]].astype(np.float32) * consts[dq_w.input[1]].astype(np.float32))
                b = consts[node.input[2]].astype(np.float32)
                s = np.broadcast_to(s, b.shape).astype(np.float32)
                q = np.clip(np.rint(b / s), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
                base = f"{node.output[0]}_bias"   # per node: two layers may share one float bias constant
                model.graph.initializer.extend([numpy_helper.from_array(q, base + "_int32"),
                                                numpy_helper.from_array(s, base + "_int32_scale")])
                new_nodes.append(helper.make_node("DequantizeLinear", [base + "_int32", base + "_int32_scale"],
                                                  [base + "_dequantized"], axis=0, name=base + "_DequantizeLinear"))
                node.input[2] = base + "_dequantized"
                done += 1
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_unused(model)
    return done


def _drop_unused(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _one_line(e: BaseException) -> str:
    """The innermost cause of an exception, as one line (the exporter wraps the reason in pages of advice)."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:300]}"


def ort_kernels(path: Path) -> dict[str, int]:
    """The operators of the graph ONNX Runtime runs (ORT_ENABLE_ALL, CPU; its optimized model saved and
    read back): op type -> count."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3   # ORT warns that an ENABLE_ALL model is specific to this machine: it is
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops: dict[str, int] = {}
        for node in onnx.load(so.optimized_model_filepath).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def export_qdq(qat_net: QATNet, tta_level: int, batch: np.ndarray, path: Path, *, atol: float = PARITY_ATOL,
               min_top1: float = PARITY_TOP1, threads: int | None = None) -> dict:
    """Write `path`: qat_net (with its TTA views, dynamic batch) as a QDQ ONNX graph with int8 weights and
    int32 biases, and check it: it loads in ONNX Runtime, holds QuantizeLinear/DequantizeLinear, ORT runs
    every quantized layer as an INT8 kernel (QLinearConv / QGemm in its optimised graph), and on `batch`
    (normalised float32 NCHW images) its logits agree with the fake-quant torch net: max |logit diff| at
    most `atol` x max(1, largest |logit|), top-1 agreement at least `min_top1`.

    The tolerance: the torch net and ORT compute the same integers, except where a requantization lands
    within float32 rounding of a half step (torch sums in float32, ORT in int32; the float ops between the
    quantized layers differ in their last bits too), which moves that value by one step, 1/255 of the
    tensor's range. Measured: 5e-7 on a small trained simple_cnn, 0.2 % of the logit scale on custom_cnn
    trained on CIFAR-10 images (0.012 at logits of 6.2), while a wrong kernel is far outside: 8-bit weights
    saturating AVX2's 16-bit sums moved the logits by 6 %. 0.02 x the logit scale (max(1, largest |logit|))
    keeps ten times the measured error and catches that; a top-1 may flip only where two logits tie within
    that error, hence 99 %.

    Returns the record (path, bytes, ops, int8_kernels, parity, settings); raises QATError otherwise."""
    import onnx

    from lab.backends.onnx_int8 import OnnxInt8Backend
    from models import with_tta

    if not isinstance(qat_net, QATNet):
        raise QATError(f"export_qdq takes the QATNet prepare() returns, not {type(qat_net).__name__}")
    path = Path(path)
    frozen = copy.deepcopy(qat_net).cpu().float().eval().to(memory_format=torch.contiguous_format)
    for layer in frozen.quant_layers():
        layer.freeze_for_export()
    model = with_tta(frozen, tta_level).eval()
    example = torch.as_tensor(batch[:2]).float()
    try:
        with redirect_stdout(io.StringIO()):
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18,
                                        input_names=["input"], output_names=["logits"],
                                        custom_translation_table=EXPORT_TRANSLATIONS,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        graph = program.model_proto
    except Exception as e:
        raise QATError(f"the QAT net cannot be exported to ONNX: {_one_line(e)}") from e
    folded = _fold_constant_quantizers(graph)
    biases = _quantize_biases(graph)
    for node in graph.graph.node:   # the exporter's per-node debug records (stack traces with local paths)
        del node.metadata_props[:]
    try:
        onnx.checker.check_model(graph)
    except Exception as e:
        raise QATError(f"the exported QDQ graph is not valid ONNX: {_one_line(e)}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))

    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    n_layers = len(frozen.quant_layers())
    int8_weights = sum(1 for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2)
    if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear") or int8_weights < n_layers:
        raise QATError(f"the exported graph is not a QDQ graph with int8 weights: {ops.get('QuantizeLinear', 0)} "
                       f"QuantizeLinear, {ops.get('DequantizeLinear', 0)} DequantizeLinear, {int8_weights} int8 "
                       f"weights for {n_layers} quantized layers")
    try:
        kernels = ort_kernels(path)
        backend = OnnxInt8Backend(path, threads=threads or min(4, os.cpu_count() or 1))
    except Exception as e:
        raise QATError(f"ONNX Runtime cannot load {path.name}: {_one_line(e)}") from e
    int8_ops = {k: v for k, v in kernels.items() if k in INT8_KERNELS}
    float_ops = {k: v for k, v in kernels.items() if k in FLOAT_KERNELS}
    if sum(int8_ops.values()) < n_layers:
        raise QATError(f"ONNX Runtime runs {sum(int8_ops.values())} of the {n_layers} quantized layers of "
                       f"{path.name} as INT8 kernels ({int8_ops or 'none'}; float: {float_ops or 'none'})")

    batch = np.ascontiguousarray(batch, np.float32)
    qat_net_mode = qat_net.training
    with torch.no_grad():
        device = next(qat_net.parameters()).device
        expected = with_tta(qat_net.eval(), tta_level)(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    qat_net.train(qat_net_mode)
    got = backend.predict(batch)
    if got.shape != expected.shape:
        raise QATError(f"{path.name} returns shape {got.shape}, the QAT net {expected.shape}")
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(got - expected).max())
    top1 = float((got.argmax(1) == expected.argmax(1)).mean())
    parity = {"max_abs_diff": diff, "top1_agreement": top1, "images": len(batch), "atol": atol, "scale": scale,
              "min_top1": min_top1, "ok": diff <= atol * scale and top1 >= min_top1}
    if not parity["ok"]:
        raise QATError(f"{path.name} disagrees with the fake-quant torch net on {len(batch)} images: max |logit "
                       f"diff| {diff:.3g} (tolerance {atol:g} x logit scale {scale:.3g}), top-1 agreement "
                       f"{100 * top1:.2f}% (at least {100 * min_top1:g}%)")
    return {"path": str(path), "bytes": path.stat().st_size, "tta_level": tta_level, "ops": ops,
            "int8_weights": int8_weights, "folded_quantizers": folded, "int32_biases": biases,
            "int8_kernels": int8_ops, "float_kernels": float_ops, "parity": parity, **frozen.settings()}


# ---------------------------------------------------------------- a small-scale check on real data


def small_check(data_root: Path, work_dir: Path, *, model: str = "custom_cnn", recipe: str = "study_sgd",
                train_images: int = 5000, test_images: int = 2000, epochs: float = 2.0, qat_epochs: float = 1.0,
                lr_scale: float = 0.1, distill: float = 0.0, seed: int = 0, threads: int = 1,
                log=print) -> dict:
    """Train `model` on `train_images` CIFAR-10 training images, then compare on `test_images` test images
    the fp32 net, post-training INT8 (training/quantize.py's default recipe on the ONNX export) and QAT
    (prepare on the same 512 calibration images, fine-tune `qat_epochs`, export_qdq). One seed, small scale:
    a check that the pieces work together and of the direction, not the figure of a full run."""
    import time

    from lab.backends.onnx import OnnxBackend
    from lab.backends.onnx_int8 import OnnxInt8Backend
    from models import create_model
    from training import data as D
    from training.engine import train
    from training.evaluate import predict_backend
    from training.export import export_verified
    from training.pipeline import make_spec
    from training.quantize import SHUFFLE_SEED, Recipe, quantize_int8
    from training.recipes import make_config

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    cache = work_dir / "cache"
    train_set = D.shuffled(D.load_dataset("cifar10", "train", data_root, cache_dir=cache, progress=False), seed)
    train_set = train_set.subset(slice(0, train_images))
    test = D.shuffled(D.load_dataset("cifar10", "test", data_root, cache_dir=cache, progress=False), seed + 1)
    test = test.subset(slice(0, test_images))
    spec = make_spec(train_set)
    labels = test.labels.numpy()

    def accuracy(backend) -> float:
        return float((predict_backend(backend, test, spec).argmax(1) == labels).mean())

    cfg = make_config(recipe, dataset="cifar10", epochs=epochs, threads=threads, precision="fp32")
    net = train(create_model(model, seed=seed), train_set, spec, cfg, progress=False, log=lambda *_: None).model
    net = net.cpu().eval()
    t_train = time.perf_counter() - t0
    parity_batch = D.to_float(test.images[:64], spec).numpy()
    export_verified(net, cfg.tta_level, parity_batch, work_dir)
    fp32_acc = accuracy(OnnxBackend(work_dir / "model.sim.onnx", threads=threads))
    calibration = D.to_float(D.shuffled(train_set, SHUFFLE_SEED).images[:Recipe().calibration_images], spec)
    quantize_int8(work_dir / "model.sim.onnx", calibration.numpy(), work_dir / "model.int8.onnx", Recipe())
    ptq_acc = accuracy(OnnxInt8Backend(work_dir / "model.int8.onnx", threads=threads))
    t1 = time.perf_counter()
    qat = prepare(net, calibration)
    teacher = None
    if distill:
        with torch.no_grad():
            teacher = torch.cat([net(D.to_float(train_set.images[i:i + 500], spec))
                                 for i in range(0, len(train_set), 500)])
        cfg = dataclasses.replace(cfg, distill_weight=distill, distill_temperature=1.0)
    before = export_qdq(qat, cfg.tta_level, parity_batch, work_dir / "model.qat0.int8.onnx", threads=threads)
    grid_acc = accuracy(OnnxInt8Backend(work_dir / "model.qat0.int8.onnx", threads=threads))
    result = finetune(qat, train_set, spec, cfg, qat_epochs, teacher=teacher, lr_scale=lr_scale,
                      log=lambda *_: None)
    record = export_qdq(qat, cfg.tta_level, parity_batch, work_dir / "model.qat.int8.onnx", threads=threads)
    qat_acc = accuracy(OnnxInt8Backend(work_dir / "model.qat.int8.onnx", threads=threads))
    out = {"model": model, "recipe": recipe, "train_images": len(train_set), "test_images": len(test),
           "epochs": epochs, "qat_epochs": qat_epochs, "lr_scale": lr_scale, "distill": distill, "seed": seed,
           "fp32": fp32_acc, "ptq": ptq_acc, "ptq_recipe": Recipe().name, "qat_grid_before_finetune": grid_acc,
           "qat": qat_acc, "qat_train_loss": result.history[-1]["train_loss"],
           "parity_before_finetune": before["parity"], "parity": record["parity"],
           "int8_kernels": record["int8_kernels"], "bytes": {"fp32_sim": (work_dir / "model.sim.onnx").stat().st_size,
                                                             "ptq": (work_dir / "model.int8.onnx").stat().st_size,
                                                             "qat": record["bytes"]},
           "seconds": {"train": round(t_train, 1), "qat": round(time.perf_counter() - t1, 1),
                       "total": round(time.perf_counter() - t0, 1)}}
    log(f"{model} on {len(train_set)} training images ({epochs:g} epochs, {recipe}), {len(test)} test images: "
        f"fp32 {100 * fp32_acc:.2f}%, PTQ INT8 ({Recipe().name}) {100 * ptq_acc:.2f}%, QAT grid before the "
        f"fine-tune {100 * grid_acc:.2f}%, QAT INT8 ({qat_epochs:g} epoch) {100 * qat_acc:.2f}%")
    return out


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description="Small-scale check on real CIFAR-10: fp32 vs post-training INT8 vs QAT.")
    p.add_argument("--data", type=Path, required=True, help="the data root (holding cifar10-jpg/)")
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--model", default="custom_cnn")
    p.add_argument("--recipe", default="study_sgd")
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--qat-epochs", type=float, default=1.0)
    p.add_argument("--lr-scale", type=float, default=0.1)
    p.add_argument("--distill", type=float, default=0.0, help="distillation weight, the fp32 net as teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    a.work_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(small_check(a.data, a.work_dir, model=a.model, recipe=a.recipe, train_images=a.train_images,
                                 test_images=a.test_images, epochs=a.epochs, qat_epochs=a.qat_epochs,
                                 lr_scale=a.lr_scale, distill=a.distill, seed=a.seed, threads=a.threads), indent=1))
