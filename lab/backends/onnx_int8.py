"""onnx_int8: the statically quantized graph (QDQ, per-channel int8 weights, uint8 activations).

Published only when its test accuracy is within the preset's bound of the fp32 model (the export
hook in training/export.py decides)."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx import OnnxBackend


@register_backend
class OnnxInt8Backend(OnnxBackend):
    name = "onnx_int8"
    file = "model.int8.onnx"
    description = "ONNX Runtime, static INT8 (QDQ) graph calibrated on training images"
