"""Inference backends. Each turns a float32 NCHW batch (from serving.preprocess) into logits.

  OnnxBackend   onnxruntime; needs neither torch nor the rest of the project
  TorchBackend  the .pth state_dict in the registry's architecture; imports torch lazily

Both apply the card's test-time augmentation: the ONNX graph has it built in, the torch model is
wrapped with the same `models.tta` module the export used.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path | str, threads: int | None = None, spinning: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        # Spinning threads burn the cores while idle; with several workers on few cores it only hurts.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = so.intra_op_num_threads

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


class TorchBackend:
    name = "torch"

    def __init__(self, pth_path: Path | str, card: dict, threads: int | None = None,
                 precision: str = "fp32", channels_last: bool = True):
        import torch

        from models import create_model, with_tta

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        arch = card["architecture"]
        net = create_model(arch["name"], **arch["kwargs"])
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.model = with_tta(net, card.get("tta_level", 0)).eval()
        self.channels_last = channels_last and any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.precision = precision
        self.threads = torch.get_num_threads()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                     enabled=self.precision == "bf16"):
            return self.model(x).float().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
