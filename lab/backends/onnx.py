"""onnx: the onnxsim-simplified ONNX graph (TTA inside) in ONNX Runtime. Needs no torch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lab.backends.base import Backend, BackendUnavailable, register_backend
from lab.hardware import cores

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def onnx_session(path: Path | str, threads: int | None = None, spinning: bool = False,
                 optimization: str = "all", providers: list[str] | None = None):
    """An onnxruntime session with this project's settings (sequential, no spinning, N intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or cores()
    so.inter_op_num_threads = 1
    # Spinning threads burn the cores while idle; with several workers on few cores it only hurts.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=providers or OnnxBackend.devices())


@register_backend
class OnnxBackend(Backend):
    name = "onnx"
    file = "model.sim.onnx"
    description = "ONNX Runtime, onnxsim-simplified graph, fp32"
    optimization = "all"

    @classmethod
    def check_available(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except Exception as e:
            raise BackendUnavailable(f"onnxruntime cannot be imported ({type(e).__name__}: {e})") from None

    @classmethod
    def devices(cls) -> list[str]:
        """CUDA first where onnxruntime has it; $LAB_ONNX_PROVIDERS (comma-separated) overrides."""
        import onnxruntime as ort

        wanted = [p.strip() for p in os.environ.get("LAB_ONNX_PROVIDERS", "").split(",") if p.strip()]
        have = ort.get_available_providers()
        return [p for p in (wanted or PREFERRED_PROVIDERS) if p in have] or ["CPUExecutionProvider"]

    def __init__(self, path: Path, card=None, threads: int | None = None):
        self.session = onnx_session(path, threads, optimization=self.optimization)
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads or cores()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]
