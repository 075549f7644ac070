"""A backend that runs no model: it answers zeros (every class equally likely) at once, so a load test
against it measures what the service costs apart from inference. Loaded only on request:

    LAB_PLUGINS=bench.noop_backend LAB_BACKENDS=onnx,noop bentoml serve

bench/serve_latency.py serves it beside the real backends. It names the model's ONNX file (every card
has one, so the service's hash check passes) but never opens it.
"""
from __future__ import annotations

import numpy as np

from lab.backends import Backend, register_backend


@register_backend
class NoopBackend(Backend):
    name = "noop"
    file = "model.sim.onnx"
    description = "no inference: zeros for every class (measures the service's own cost)"
    serve_by_default = False
    computes_model = False  # its zeros are not the model's answers: the service serves it unproven, by name only

    def __init__(self, path, card, threads: int | None = None):
        self.classes = len(card.classes)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), self.classes), np.float32)
