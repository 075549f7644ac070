"""onnx_raw: the ONNX graph as torch exported it, before onnxsim. For comparisons; not served by default."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx import OnnxBackend


@register_backend
class OnnxRawBackend(OnnxBackend):
    name = "onnx_raw"
    file = "model.onnx"
    description = "ONNX Runtime, the graph as exported (not simplified)"
    serve_by_default = False
