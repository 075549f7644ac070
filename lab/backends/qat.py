"""onnx_int8_qat: the served architecture fine-tuned with its INT8 quantization in the loop
(quantization-aware training, training/compress/qat.py), exported as a QDQ graph with int8 weights that
ONNX Runtime runs as INT8 kernels; made by the export hook `qat` where post-training INT8 changes too many
answers (training/export_hooks.py)."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx_int8 import OnnxInt8Backend


@register_backend
class OnnxInt8QatBackend(OnnxInt8Backend):
    name = "onnx_int8_qat"
    file = "model.qat.int8.onnx"
    description = "ONNX Runtime, INT8 (QDQ) from quantization-aware training of the served network"
    serve_by_default = False
    network = "qat"
    method = "qat"
