"""A backend defined in one file outside lab/backends/, to show the registry is open: loaded into the
service and the benchmarks with LAB_PLUGINS=tests.plugin_backend. It runs the exported (unsimplified)
ONNX graph with only ONNX Runtime's basic graph optimisations."""
from lab.backends import register_backend
from lab.backends.onnx import OnnxBackend


@register_backend
class OnnxBasicBackend(OnnxBackend):
    name = "onnx_basic"
    file = "model.onnx"
    description = "ONNX Runtime, exported graph, basic optimisations only (a test plugin)"
    serve_by_default = False
    optimization = "basic"
