"""openvino, openvino_bf16, openvino_int8: the exported ONNX graphs compiled by OpenVINO. Needs no torch.

OpenVINO reads ONNX itself, so these need no file of their own: `openvino` compiles the simplified fp32
graph at fp32 precision, `openvino_bf16` the same graph with bf16 inference precision (where the CPU
has native bf16: OpenVINO's CPU plugin lists BF16 in its optimization capabilities), `openvino_int8`
the QDQ graph of onnx_int8, which OpenVINO runs with int8 kernels. The device is OpenVINO's own choice
among `Core().available_devices`: CPU unless $LAB_OPENVINO_DEVICE names another it lists.

Only OpenVINO versions this project tested are used (TESTED_OPENVINO): another version is refused with
its reason (the model is served on its other backends), like the other guarded versions.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from lab.backends.base import Backend, BackendUnavailable, register_backend
from lab.hardware import cores

TESTED_OPENVINO = ("2026.4.1",)


def _core():
    import openvino as ov

    return ov.Core()


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    file = "model.sim.onnx"
    description = "OpenVINO, onnxsim-simplified graph, fp32"
    serve_by_default = False  # LAB_BACKENDS=...,openvino serves it
    precision = "f32"         # OpenVINO's inference precision hint

    @classmethod
    def check_available(cls) -> None:
        try:
            import openvino
        except Exception as e:
            raise BackendUnavailable(f"openvino cannot be imported ({type(e).__name__}: {e})") from None
        version = openvino.__version__.split("-")[0]
        if version not in TESTED_OPENVINO:
            raise BackendUnavailable(f"openvino {openvino.__version__} is not a version this project tested "
                                     f"({', '.join(TESTED_OPENVINO)})")

    @classmethod
    def devices(cls) -> list[str]:
        """OpenVINO's devices here; $LAB_OPENVINO_DEVICE first when it is one of them."""
        have = _core().available_devices
        wanted = os.environ.get("LAB_OPENVINO_DEVICE", "").strip()
        return [wanted, *[d for d in have if d != wanted]] if wanted in have else ["CPU", *[d for d in have if d != "CPU"]]

    shape_warmup = True  # each new batch size costs about 50 ms the first time (3.3 s over sizes 1..64 here)

    def __init__(self, path: Path, card=None, threads: int | None = None):
        core = _core()
        self.device = self.devices()[0]
        self.threads = threads or cores()
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": self.precision}
        if self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        self.compiled = core.compile_model(core.read_model(str(path)), self.device, config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: one batch at a time

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            out = self.request.infer({0: np.ascontiguousarray(batch, np.float32)})
            return np.array(out[self.compiled.output(0)], dtype=np.float32, copy=True)


@register_backend
class OpenVinoBf16Backend(OpenVinoBackend):
    name = "openvino_bf16"
    description = "OpenVINO, onnxsim-simplified graph, bf16 inference precision (CPUs with native bf16)"
    precision = "bf16"

    @classmethod
    def check_available(cls) -> None:
        super().check_available()
        caps = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in caps:
            raise BackendUnavailable(f"this CPU has no native bf16 for OpenVINO (capabilities: {', '.join(caps)})")


@register_backend
class OpenVinoInt8Backend(OpenVinoBackend):
    name = "openvino_int8"
    file = "model.int8.onnx"
    description = "OpenVINO, the static INT8 (QDQ) graph of onnx_int8"
