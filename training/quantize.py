"""Static INT8 quantization of the simplified ONNX model with onnxruntime.quantization.

QDQ format, per-channel int8 weights, uint8 activations (the u8 x s8 kernels are the fast ones on x86)
with MinMax ranges calibrated on *training* images (never test images). The TTA views are part of the
graph, so calibration sees them too. The export hook that runs it is in training/export_hooks.py.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a float32 NCHW array."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 64):
        self.chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self.input_name = input_name

    def get_next(self):
        return {self.input_name: self.chunks.pop(0)} if self.chunks else None

    def rewind(self):  # not needed by MinMax; part of the protocol
        pass


def quantize_int8(fp32_onnx: Path, calibration: np.ndarray, out: Path) -> Path:
    """Write `out`, the INT8 version of `fp32_onnx`, calibrated on `calibration` (float32 NCHW)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # graph optimisations (BN folding) and ONNX shape inference; the symbolic pass cannot follow the
        # TTA's batch-dependent Reshape, and the ONNX pass is enough for quantization
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Batches(calibration.astype(np.float32), input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out

