"""The OpenVINO and torch.compile backends: the same answers as ONNX Runtime / eager torch on the smoke
model's graphs, served by the service when LAB_BACKENDS names them, and refused on an untested version."""
from __future__ import annotations

import numpy as np
import pytest

from lab import preprocess as P
from lab.backends import BackendUnavailable, load_backend
from lab.card import read_card

pytest.importorskip("openvino", reason="openvino is not installed (requirements.lock has it)")


def _batch(card, n=16):
    from tests.test_service import good_image

    rng = np.random.default_rng(0)
    x = np.stack([P.preprocess_bytes(good_image(), card.preprocessing)] * n)
    return (x + rng.normal(0, 0.5, x.shape)).astype(np.float32)  # distinct images around a real one


@pytest.mark.parametrize("ours,reference,tol", [("openvino", "onnx", 0.01), ("openvino_int8", "onnx_int8", None)])
def test_openvino_agrees_with_onnx_runtime_on_the_same_graph(store, ours, reference, tol):
    card = read_card(store["model_dir"])
    x = _batch(card)
    got = load_backend(ours, store["model_dir"], card, threads=1).predict(x)
    want = load_backend(reference, store["model_dir"], card, threads=1).predict(x)
    assert got.shape == want.shape and got.dtype == np.float32
    if tol is not None:  # fp32: the same function; OpenVINO's kernels (convolution, Erf) round differently
        # from ONNX Runtime's: about 1e-3 of the largest logit measured on this graph, bounded at 1e-2
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()
        assert (got.argmax(1) == want.argmax(1)).all()
    else:  # int8: both run the same quantized graph; kernels differ in rounding, so compare in scale
        spread = np.abs(want).max()
        assert np.abs(got - want).max() <= 0.1 * spread, (np.abs(got - want).max(), spread)


def test_openvino_bf16_is_close_to_fp32_where_the_cpu_has_it(store):
    card = read_card(store["model_dir"])
    try:
        bf16 = load_backend("openvino_bf16", store["model_dir"], card, threads=1)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    x = _batch(card)
    got, want = bf16.predict(x), load_backend("openvino", store["model_dir"], card, threads=1).predict(x)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 0.05


def test_an_untested_openvino_is_refused_with_its_reason(store, monkeypatch):
    import openvino

    monkeypatch.setattr(openvino, "__version__", "2099.1.0-1-abc")
    with pytest.raises(BackendUnavailable, match=r"openvino 2099\.1\.0-1-abc is not a version this project tested"):
        load_backend("openvino", store["model_dir"], read_card(store["model_dir"]))


def test_the_service_serves_openvino_when_asked(store, tmp_path):
    import requests

    from bench.server import Server
    from tests.test_service import good_image

    with Server(store["env"], tmp_path / "serve.log", {"LAB_DEFAULT_MODEL": "cifar10-airbench-smoke",
                                                       "LAB_BACKENDS": "onnx,openvino,openvino_int8"}) as s:
        listed = requests.get(f"{s.url}/models/", timeout=10).json()["models"]["cifar10-airbench-smoke"]
        assert {"onnx", "openvino", "openvino_int8"} <= set(listed["backends"]), listed
        answers = {}
        for backend in ("onnx", "openvino"):
            r = requests.post(f"{s.url}/classify", data=good_image(), headers={"Content-Type": "image/png"},
                              params={"backend": backend, "top_k": 3}, timeout=30)
            assert r.status_code == 200, r.text
            answers[backend] = [p["label"] for p in r.json()["predictions"]]
        assert answers["onnx"][0] == answers["openvino"][0], answers


def test_torch_compile_agrees_with_eager_torch(store):
    """torch_compile (lab/backends/torch_compile.py) is the torch backend compiled once at load: the same
    function to float rounding, at every batch size it was compiled for."""
    from lab.backends import get_backend

    try:
        get_backend("torch_compile").check_available()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    card = read_card(store["model_dir"])
    x = _batch(card, 64)
    compiled = load_backend("torch_compile", store["model_dir"], card, threads=2)
    eager = load_backend("torch", store["model_dir"], card, threads=2)
    assert compiled.compile_seconds > 0
    for n in (1, 7, 64):
        got, want = compiled.predict(x[:n]), eager.predict(x[:n])
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), n
