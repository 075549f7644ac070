#!/usr/bin/env python
"""KServe's Python model server (`kserve.ModelServer`) serving a stored model with ONNX Runtime.

Run in the kserve environment (bench/peers/envs.py), never in the service's, with this repository on
PYTHONPATH (it is not installed there; lab/preprocess.py decodes the images):

    PYTHONPATH=<repo> .cache/peers/kserve/venv/bin/python bench/peers/kserve_model.py --model-dir <stored model folder> \
        --serve m-onnx=model.sim.onnx --serve m-int8=model.int8.onnx --serve m-zero=zero --threads 2 \
        --http_port 8080 --enable_grpc false

The model class is KServe's own `kserve.Model` with a synchronous `predict`, as KServe's examples write it
(KServe runs it on its event loop; it has no adaptive batching in the Python server: in a cluster a
batcher sidecar does that). It serves `/v2/models/<name>/infer` with an `image` (BYTES, JSON base64 or
binary) or `pixels` (UINT8) input and answers `probabilities` (FP32 [N, K]), binary when asked. The model
is bench/peers/common.py's Classifier: lab/preprocess.py with the card's preprocessing, the same ONNX file
and session settings as the service, or the zero model (`=zero`); one process serves every `--serve`d
model, as the service serves its backends. Every other flag is KServe's own (`--http_port`, `--workers`,
`--enable_grpc`, ...).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.peers.common import Classifier, parse_serve


def make_model(name: str, clf: Classifier):
    """A kserve.Model answering `probabilities` with `clf` (imports kserve: its environment only)."""
    from kserve import InferOutput, InferRequest, InferResponse, Model

    class OnnxClassifier(Model):
        def __init__(self):
            super().__init__(name)
            self.clf = clf
            self.ready = True

        def load(self) -> bool:
            self.ready = True
            return True

        def get_input_types(self):
            return self.clf.metadata_inputs()

        def get_output_types(self):
            return self.clf.metadata_outputs()

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            inp = payload.inputs[0]
            values = inp.data if inp.datatype == "BYTES" and inp.data is not None else inp.as_numpy()
            probs = self.clf.probabilities(inp.name, values)
            out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
            out.set_data_from_numpy(probs, binary_data=False)  # the response's encoder makes it binary if asked
            return InferResponse(response_id=payload.id or "", model_name=name, infer_outputs=[out],
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs)

    return OnnxClassifier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="the stored model's folder (card.json, ONNX files)")
    ap.add_argument("--serve", action="append", required=True, metavar="NAME=FILE",
                    help="a model to serve as /v2/models/NAME: an ONNX file of the stored model (model.sim.onnx, "
                         "model.int8.onnx) or `zero` (no model: zeros as logits, after decoding the images)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (the service's)")
    args, _ = ap.parse_known_args()  # the rest is KServe's (it parses sys.argv itself)
    models = [make_model(name, Classifier(args.model_dir, file, args.threads)) for name, file in parse_serve(args.serve)]
    from kserve import ModelServer

    ModelServer().start(models)


if __name__ == "__main__":
    main()
