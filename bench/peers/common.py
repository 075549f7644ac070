"""What the peers' model classes share: the model as the service runs it, with NumPy, Pillow and
onnxruntime only (no BentoML, no torch, nothing of serving/).

The peers run in environments of their own (bench/peers/envs.py) with this repository on sys.path, so
that the images are decoded by lab/preprocess.py itself, driven by the stored model's card.json, exactly
as the service decodes them (lab/preprocess.py imports only NumPy and Pillow;
tests/test_v2_bench.py checks it). The ONNX Runtime session has the service's settings
(lab/backends/onnx.py: sequential, N intra-op threads, 1 inter-op thread, no spinning, every graph
optimization). Probabilities are the softmax of the graph's output, as the service computes them.

The zero model decodes each image as the service's `noop` backend does (the service decodes before its
backend runs) and answers zeros as logits, so every class is equally likely: with it, a load test
measures what the server itself costs.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from lab.preprocess import Preprocessing, decode_uint8, normalize

INPUTS = ("image", "pixels")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def read_card(model_dir: Path | str) -> tuple[Preprocessing, list[str]]:
    """The card's preprocessing and class names, from the stored model's card.json."""
    card = json.loads((Path(model_dir) / "card.json").read_text())
    return Preprocessing.from_dict(card["preprocessing"]), list(card["classes"])


def as_files(elements) -> list[bytes]:
    """A BYTES tensor's elements -> the image files: bytes as they are (binary tensors), str as base64
    (JSON tensors, as tritonclient sends them and the service reads them)."""
    out = []
    for e in np.asarray(elements, dtype=object).ravel():
        if isinstance(e, (bytes, bytearray, memoryview)):
            out.append(bytes(e))
        elif isinstance(e, str):
            out.append(base64.b64decode(e, validate=True))
        else:
            raise ValueError(f"a BYTES element must be bytes or a base64 str, got {type(e).__name__}")
    return out


def model_input(name: str, values, spec: Preprocessing) -> np.ndarray:
    """One request's input -> the model's input batch (float32, the card's layout): `image` files decoded
    one by one as the service decodes them, or `pixels` (uint8 N x H x W x C) normalised by the card."""
    if name == "image":
        return normalize(np.stack([decode_uint8(f, spec) for f in as_files(values)]), spec)
    if name == "pixels":
        h, w = spec.size
        px = np.asarray(values, dtype=np.uint8).reshape(-1, h, w, spec.channels)
        return normalize(px, spec)
    raise ValueError(f"unknown input {name!r}; the inputs are {', '.join(INPUTS)}")


def onnx_session(path: Path | str, threads: int):
    """ONNX Runtime with the service's session settings (lab/backends/onnx.py onnx_session)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


ZERO = "zero"  # a served model's file `zero`: the zero model


def parse_serve(specs: list[str]) -> list[tuple[str, str]]:
    """["name=model.sim.onnx", "name-zero=zero", ...] -> [(name, file)]: the models one peer process serves."""
    out = []
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"a served model is NAME=FILE (FILE: an ONNX file of the model or {ZERO}), not {spec!r}")
        out.append((name, file))
    return out


class Classifier:
    """The stored model in `model_dir` as a peer serves it: `file` (model.sim.onnx or model.int8.onnx) in
    ONNX Runtime with `threads` intra-op threads, or, with zero=True, no model at all."""

    def __init__(self, model_dir: Path | str, file: str = "model.sim.onnx", threads: int = 1, zero: bool = False):
        self.spec, self.classes = read_card(model_dir)
        self.zero = zero = zero or file == ZERO
        self.session = None if zero else onnx_session(Path(model_dir) / file, threads)
        self.input_name = None if zero else self.session.get_inputs()[0].name

    def probabilities(self, name: str, values) -> np.ndarray:
        """float32 [N, K]: the softmax of the model's output on a request's input (zeros' softmax for
        the zero model, after decoding the images all the same)."""
        x = model_input(name, values, self.spec)
        if self.zero:
            return softmax(np.zeros((len(x), len(self.classes)), np.float32)).astype(np.float32)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        return softmax(np.asarray(out, np.float32).reshape(len(x), -1)).astype(np.float32)

    def metadata_inputs(self) -> list[dict]:
        h, w = self.spec.size
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, h, w, self.spec.channels]}]

    def metadata_outputs(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes)]}]
