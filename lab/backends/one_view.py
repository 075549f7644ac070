"""onnx_1view, onnx_int8_1view, openvino_bf16_1view: the network without test-time augmentation, one
view per image.

The served graph runs the card's TTA views (6 for the default model) in one call; these run 1, about a
sixth of the work, for the accuracy the card states (`hooks.one_view` / `hooks.one_view_int8`). Their
files are made by the export hooks `one_view` and `one_view_int8` (training/export_hooks.py)."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx import OnnxBackend
from lab.backends.openvino import OpenVinoBf16Backend


@register_backend
class OnnxOneViewBackend(OnnxBackend):
    name = "onnx_1view"
    file = "model.1view.sim.onnx"
    description = "ONNX Runtime, fp32, one view (no test-time augmentation)"
    serve_by_default = False
    views = 1


@register_backend
class OnnxInt8OneViewBackend(OnnxBackend):
    name = "onnx_int8_1view"
    file = "model.1view.int8.onnx"
    description = "ONNX Runtime, static INT8, one view (no test-time augmentation)"
    serve_by_default = False
    views = 1


@register_backend
class OpenVinoBf16OneViewBackend(OpenVinoBf16Backend):
    name = "openvino_bf16_1view"
    file = "model.1view.sim.onnx"
    description = "OpenVINO, bf16 inference precision, one view (no test-time augmentation)"
    views = 1
