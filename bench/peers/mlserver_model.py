"""Seldon's MLServer serving a stored model with ONNX Runtime, its adaptive batching on.

Run in the mlserver environment (bench/peers/envs.py), never in the service's, with this repository on
PYTHONPATH (MLServer imports the class by name, in its inference worker processes too):

    write_settings(folder, serve=[("m-onnx", "model.sim.onnx"), ("m-zero", "zero")], model_dir=..., threads=2,
                   http_port=8080, grpc_port=8081, metrics_port=8082, max_batch_size=64, max_batch_time=0.001)
    PYTHONPATH=<repo> .cache/peers/mlserver/venv/bin/mlserver start <folder>

The model class is MLServer's own `mlserver.MLModel`. It serves `/v2/models/<name>/infer` with an
`image` (BYTES: JSON strings, base64, since MLServer's REST has no binary tensor extension) or `pixels`
(UINT8) input and answers `probabilities` (FP32 [N, K], JSON). Adaptive batching (`max_batch_size`,
`max_batch_time` in seconds; MLServer batches nothing with a time of 0) merges requests into one call of
`predict`. The model is bench/peers/common.py's Classifier: lab/preprocess.py with the card's
preprocessing, the same ONNX file and session settings as the service, or the zero model (`zero`); one
server serves every model of `serve`, as the service serves its backends.
`write_settings` imports nothing of MLServer, so the benchmark calls it from the service's environment.
"""
from __future__ import annotations

import json
from pathlib import Path

IMPLEMENTATION = "bench.peers.mlserver_model.OnnxClassifier"


def write_settings(folder: Path, *, serve: list[tuple[str, str]], model_dir: Path, threads: int = 1,
                   http_port: int, grpc_port: int, metrics_port: int, max_batch_size: int = 64,
                   max_batch_time: float = 0.001, parallel_workers: int = 1) -> Path:
    """MLServer's settings.json and <name>/model-settings.json for each (name, file) of `serve` (file: an
    ONNX file of the stored model or `zero`) in `folder`, the folder to `mlserver start`. MLServer's own
    defaults otherwise (one inference worker process: parallel_workers 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
        "parallel_workers": parallel_workers, "load_models_at_startup": True}, indent=1))
    for name, file in serve:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": IMPLEMENTATION, "max_batch_size": max_batch_size,
            "max_batch_time": max_batch_time,
            "parameters": {"extra": {"model_dir": str(model_dir), "file": file, "threads": threads}}}, indent=1))
    return folder


try:
    from mlserver import MLModel
    from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, ResponseOutput
except ImportError:  # the service's environment: write_settings only
    MLModel = None

if MLModel is not None:
    from bench.peers.common import Classifier

    class OnnxClassifier(MLModel):
        async def load(self) -> bool:
            extra = self.settings.parameters.extra
            self.clf = Classifier(extra["model_dir"], extra.get("file", "model.sim.onnx"), int(extra["threads"]))
            self.inputs = [MetadataTensor(**t) for t in self.clf.metadata_inputs()]
            self.outputs = [MetadataTensor(**t) for t in self.clf.metadata_outputs()]
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            inp = payload.inputs[0]
            probs = self.clf.probabilities(inp.name, inp.data.root)
            return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                     outputs=[ResponseOutput(name="probabilities", shape=list(probs.shape),
                                                             datatype="FP32", data=probs.ravel().tolist())])
