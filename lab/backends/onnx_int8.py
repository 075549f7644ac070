"""onnx_int8: the statically quantized graph (QDQ), with the INT8 recipe the export chose on held-out
training images (training/quantize.py: calibration method, per-channel or per-tensor weights, u8 or s8
activations; the card's `int8.recipe` says which).

Published only when its test accuracy is within the preset's bound of the fp32 model (the export
hook `int8` in training/export_hooks.py decides)."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx import OnnxBackend


@register_backend
class OnnxInt8Backend(OnnxBackend):
    name = "onnx_int8"
    file = "model.int8.onnx"
    description = "ONNX Runtime, static INT8 (QDQ) graph calibrated on training images"
