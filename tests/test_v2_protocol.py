"""The Open Inference Protocol (KServe v2 REST, serving/v2.py), proven with Triton's own client
(tritonclient.http) against a real `bentoml serve` (the session server of tests/conftest.py): server
and model metadata, readiness, the model configuration, inference with each input (BYTES images in
binary and JSON, UINT8 pixels, FP32 model inputs), the classification extension, the backend choice;
its answers equal /classify's for the same images. Then malformed requests sent raw: each gets a 4xx
JSON error, none a 5xx, and the service answers the next good request right."""
from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from lab.backends import softmax
from lab.card import read_card
from lab.preprocess import decode_uint8, normalize
from tests.conftest import MAX_BODY, SHARED_DATA, has_real_cifar
from tests.images import awkward_valid, encode, gradient

MODEL = "cifar10-airbench-smoke"


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120, connection_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def spec(store):
    return read_card(store["model_dir"]).preprocessing


def _images() -> list[bytes]:
    """Images of several formats and sizes (real CIFAR-10 test JPEGs too, when there is a copy)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = [encode(gradient(32, 32), "PNG"), encode(gradient(48, 40), "JPEG"),
           encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG"),
           awkward_valid()["cmyk_jpeg"][0], awkward_valid()["palette_png"][0]]
    if has_real_cifar():
        out += [p.read_bytes() for p in sorted((SHARED_DATA / "cifar10-jpg" / "test").glob("*/*.jpg"))[:7]]
    return out


def _classify(server, data: bytes, backend: str | None = None) -> dict:
    params = {"top_k": 10, "model": MODEL, **({"backend": backend} if backend else {})}
    r = requests.post(f"{server.url}/classify", data=data, params=params,
                      headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _probabilities(answer: dict) -> np.ndarray:
    p = np.zeros(len(answer["predictions"]))
    for pred in answer["predictions"]:
        p[pred["index"]] = pred["probability"]
    return p


def _served_version(server) -> str:
    return requests.get(f"{server.url}/models/", timeout=10).json()["models"][MODEL]["tag"].split(":", 1)[1]


# ---------------------------------------------------------------- in process: routes and the JSON bound


def test_routes():
    from serving.v2 import Route, route

    assert route("/v2") == route("/v2/") == Route("server")
    assert route("/v2/health/ready") == Route("ready") and route("/v2/health/live") == Route("live")
    assert route("/v2/models/m") == Route("model", "m") and route("/v2/models/m/versions/3") == Route("model", "m", "3")
    assert route("/v2/models/m/versions/3/infer") == Route("infer", "m", "3")
    assert route("/v2/models/m/config") == Route("config", "m") and route("/v2/models/m/ready") == Route("model_ready", "m")
    for path in ("/v2/models", "/v2/models//infer", "/v2/models/m/versions//infer", "/v2/models/m/stats",
                 "/v2/models/m/infer/x", "/v2/health", "/v2x", "/v3"):
        assert route(path) is None, path


@pytest.mark.parametrize("text", [
    b"[" + b",".join([b"{}"] * 30000) + b"]", b"[" + b",".join([b"[]"] * 30000) + b"]",
    b"{" + b",".join(b'"k%06d":0' % i for i in range(10000)) + b"}", b"[" + b",".join([b"0.5"] * 30000) + b"]",
    b"[" + b",".join([b'"ab"'] * 30000) + b"]", b'["\xf0\x9f\x98\x80' + b"a" * 100000 + b'"]',
    b"[" + b",".join([b"9" * 4000] * 20) + b"]"], ids=["dicts", "lists", "keys", "floats", "strings", "ucs4", "ints"])
def test_json_cost_bounds_what_parsing_takes(text):
    """What the front door reserves for a JSON header before parsing it covers what json.loads takes."""
    import tracemalloc

    from serving.v2 import json_cost

    tracemalloc.start()
    doc = json.loads(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del doc
    assert peak <= json_cost(text), (peak, json_cost(text))


# ---------------------------------------------------------------- metadata, readiness, configuration


def test_server_metadata_liveness_and_readiness(server, client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(meta["extensions"])
    assert meta["name"] and meta["version"]
    ready = requests.get(f"{server.url}/v2/health/ready", timeout=10)
    assert ready.status_code == requests.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_model_metadata_readiness_and_config(server, client, spec):
    version = _served_version(server)
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and version in meta["versions"] and meta["platform"]
    h, w = spec.size
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"image": ("BYTES", [-1, 1]), "pixels": ("UINT8", [-1, h, w, spec.channels]),
                      "normalized": ("FP32", [-1, spec.channels, h, w])}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, 10]), "logits": ("FP32", [-1, 10])}
    assert client.get_model_metadata(MODEL, version)["parameters"]["version"] == version
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(MODEL, "nope")
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 64
    assert {i["name"]: (i["data_type"], i["dims"], i["optional"]) for i in config["input"]} == {
        "image": ("TYPE_STRING", [1], True), "pixels": ("TYPE_UINT8", [h, w, spec.channels], True),
        "normalized": ("TYPE_FP32", [spec.channels, h, w], True)}
    assert {o["name"]: o["dims"] for o in config["output"]} == {"probabilities": [10], "logits": [10]}
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model")


# ---------------------------------------------------------------- inference equals /classify


def _input(kind: str, images: list[bytes], spec, binary: bool) -> triton.InferInput:
    if kind == "image":
        files = [base64.b64encode(b).decode() for b in images] if not binary else images
        tensor = np.array(files, dtype=np.object_)
        x = triton.InferInput("image", [len(images)], "BYTES")
    elif kind == "image_nx1":
        tensor = np.array(images, dtype=np.object_).reshape(-1, 1)
        x = triton.InferInput("image", [len(images), 1], "BYTES")
    elif kind == "pixels":
        tensor = np.stack([decode_uint8(b, spec) for b in images])
        x = triton.InferInput("pixels", list(tensor.shape), "UINT8")
    else:
        tensor = normalize(np.stack([decode_uint8(b, spec) for b in images]), spec)
        x = triton.InferInput("normalized", list(tensor.shape), "FP32")
    x.set_data_from_numpy(tensor, binary_data=binary)
    return x


@pytest.mark.parametrize("kind,binary", [("image", True), ("image", False), ("image_nx1", True),
                                         ("pixels", True), ("pixels", False),
                                         ("normalized", True), ("normalized", False)])
def test_infer_answers_equal_classify(server, client, spec, kind, binary):
    """Every input and encoding: top-1 and every probability equal /classify's for the same images
    (within 1e-6), the logits' softmax equals the probabilities, on the model's default backend."""
    images = _images()
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary),
               triton.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer(MODEL, [_input(kind, images, spec, binary)], outputs=outputs)
    probs, logits = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert probs.shape == logits.shape == (len(images), 10) and probs.dtype == np.float32
    answer = result.get_response()
    assert answer["model_name"] == MODEL and answer["model_version"] == _served_version(server)
    for i, data in enumerate(images):
        want = _classify(server, data)
        assert answer["parameters"]["backend"] == want["backend"]  # the same default backend
        assert int(probs[i].argmax()) == want["predictions"][0]["index"]
        assert np.abs(probs[i] - _probabilities(want)).max() <= 1e-6, (i, kind)
    assert np.abs(softmax(logits.astype(np.float64)) - probs).max() <= 1e-6


def test_default_output_is_probabilities_in_binary(client, spec):
    """tritonclient asks for no output by name: it gets the probabilities, binary (binary_data_output)."""
    result = client.infer(MODEL, [_input("image", _images()[:2], spec, True)])
    assert result.as_numpy("probabilities").shape == (2, 10) and result.as_numpy("logits") is None
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 2 * 10 * 4


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(server, client, spec, binary):
    images = _images()[:4]
    out = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = client.infer(MODEL, [_input("image", images, spec, True)], outputs=[out])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3) and result.get_output("probabilities")["datatype"] == "BYTES"
    for i, data in enumerate(images):
        want = _classify(server, data)["predictions"][:3]
        got = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in top[i]]
        assert [(int(idx), label) for _, idx, label in got] == [(p["index"], p["label"]) for p in want]
        assert max(abs(float(score) - p["probability"]) for (score, _, _), p in zip(got, want)) <= 1e-6


def test_every_backend_is_reachable(server, client, spec):
    """A backend named by request parameter, ?backend= or the X-Lab-Backend header answers as
    /classify?backend= does; naming none gets /classify's default."""
    backends = requests.get(f"{server.url}/models/", timeout=10).json()["models"][MODEL]["backends"]
    images = _images()[:3]
    for backend in backends:
        for how in ("parameters", "query_params", "headers"):
            kw = {"parameters": {"parameters": {"backend": backend}}, "query_params": {"query_params": {"backend": backend}},
                  "headers": {"headers": {"X-Lab-Backend": backend}}}[how]
            result = client.infer(MODEL, [_input("image", images, spec, True)], **kw)
            assert result.get_response()["parameters"]["backend"] == backend, (backend, how)
            probs = result.as_numpy("probabilities")
            for i, data in enumerate(images):
                want = _classify(server, data, backend)
                assert np.abs(probs[i] - _probabilities(want)).max() <= 1e-6, (backend, how)
    # the same name twice is fine; two names are not
    same = client.infer(MODEL, [_input("image", images, spec, True)], parameters={"backend": backends[0]},
                        query_params={"backend": backends[0]})
    assert same.get_response()["parameters"]["backend"] == backends[0]
    default = client.infer(MODEL, [_input("image", images, spec, True)], query_params={"backend": ""})
    assert default.get_response()["parameters"]["backend"] == _classify(server, images[0])["backend"]


def test_versions_are_the_stores(server, client, spec):
    version = _served_version(server)
    result = client.infer(MODEL, [_input("pixels", _images()[:1], spec, True)], model_version=version,
                          request_id="my-id-7")
    assert result.get_response()["model_version"] == version and result.get_response()["id"] == "my-id-7"
    with pytest.raises(InferenceServerException, match="no version"):
        client.infer(MODEL, [_input("pixels", _images()[:1], spec, True)], model_version="nope")


def test_v2_requests_are_timed_and_counted(store, spec, tmp_path):
    """On a server of its own: every `bentoml serve` empties the Prometheus directory of its BENTOML_HOME,
    so the session server's metrics are gone once another test has started a server on the same store."""
    from bench.server import Server

    with Server(store["env"], tmp_path / "serve.log", {"LAB_DEFAULT_MODEL": MODEL, "LAB_BACKENDS": "onnx",
                                                       "LAB_DEFAULT_BACKEND": "onnx"}) as own:
        triton.InferenceServerClient(own.url.removeprefix("http://")).infer(
            MODEL, [_input("image", _images()[:1], spec, True)])
        text = requests.get(f"{own.url}/metrics", timeout=10).text
    assert 'lab_request_seconds_count{route="/v2/models/{name}/infer",status="200"}' in text
    assert 'lab_requests_total{backend="onnx",model="cifar10-airbench-smoke",status="200"}' in text


# ---------------------------------------------------------------- malformed requests, sent raw


def _json_request(tensor: dict, **extra) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _pixels(values=None, shape=(1, 32, 32, 3), **extra) -> dict:
    n = int(np.prod(shape)) if all(d >= 0 for d in shape) else 1
    return {"name": "pixels", "datatype": "UINT8", "shape": list(shape),
            "data": [7] * n if values is None else values, **extra}


def _binary(head: dict, tail: bytes, header_length: int | str | None = None) -> tuple[bytes, dict]:
    text = json.dumps(head).encode()
    return text + tail, {"Inference-Header-Content-Length": str(len(text) if header_length is None else header_length)}


def _bytes_tail(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


GOOD_PNG = encode(gradient(32, 32), "PNG")
IMAGE_HEAD = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(GOOD_PNG) + 4}}]}
INFER = f"/v2/models/{MODEL}/infer"


def _bad_cases() -> dict:
    """name -> (method, path, body, headers, status)."""
    c: dict = {}

    def post(name, body, *rest, headers=None, path=INFER):  # rest: (status,) or (headers, status)
        c[name] = ("POST", path, body, rest[0] if len(rest) == 2 else headers or {}, rest[-1])

    post("header not JSON", b"{not json", 400)
    post("header a JSON array", b"[]", 400)
    post("header a JSON string", b'"x"', 400)
    post("header not UTF-8", b"\xff\xfe{}", 400)
    post("header nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, 400)
    post("empty body", b"", 400)
    post("no inputs", b"{}", 400)
    post("inputs empty", b'{"inputs": []}', 400)
    post("two inputs", json.dumps({"inputs": [_pixels(), _pixels()]}).encode(), 400)
    post("unknown input", _json_request(dict(_pixels(), name="input0")), 400)
    post("datatype FP32 for pixels", _json_request(dict(_pixels(), datatype="FP32")), 400)
    post("datatype FP64", _json_request(dict(_pixels(), datatype="FP64")), 400)
    post("shape of another size", _json_request(_pixels(shape=(1, 31, 32, 3))), 400)
    post("negative shape", _json_request(_pixels(shape=(-1, 32, 32, 3))), 400)
    post("shape of 10^12 images", _json_request(_pixels([7], shape=(10 ** 12, 32, 32, 3))), 413)
    post("shape with a string", _json_request(dict(_pixels(), shape=["1", 32, 32, 3])), 400)
    post("shape 0 images", _json_request(_pixels([], shape=(0, 32, 32, 3))), 400)
    post("65 images", _json_request({"name": "image", "datatype": "BYTES", "shape": [65], "data": ["eA=="] * 65}), 413)
    post("data shorter than the shape", _json_request(_pixels([1] * 10)), 400)
    post("pixel 300", _json_request(_pixels([300] * 3072)), 400)
    post("pixel 1.5", _json_request(_pixels([1.5] * 3072)), 400)
    post("pixel true", _json_request(_pixels([True] * 3072)), 400)
    post("pixels as strings", _json_request(_pixels(["7"] * 3072)), 400)
    post("data nested deeper than the shape", _json_request(_pixels([[[[[7]]]]] * 3072)), 400)
    post("normalized NaN", b'{"inputs": [{"name": "normalized", "datatype": "FP32", "shape": [1, 3, 32, 32], '
                           b'"data": [' + b",".join([b"NaN"] * 3072) + b"]}]}", 400)
    post("normalized 1e39", _json_request({"name": "normalized", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                           "data": [1e39] * 3072}), 400)
    post("image not base64", _json_request({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}), 400)
    post("image not an image", _json_request({"name": "image", "datatype": "BYTES", "shape": [1],
                                              "data": [base64.b64encode(b"hello world").decode()]}), 415)
    post("image truncated", _json_request({"name": "image", "datatype": "BYTES", "shape": [1],
                                           "data": [base64.b64encode(GOOD_PNG[:40]).decode()]}), 400)
    post("image element a number", _json_request({"name": "image", "datatype": "BYTES", "shape": [1], "data": [5]}), 400)
    post("data and binary_data_size", _json_request(_pixels(parameters={"binary_data_size": 3072})), 400)
    post("neither data nor binary_data_size", _json_request({"name": "pixels", "datatype": "UINT8",
                                                             "shape": [1, 32, 32, 3]}), 400)
    post("Inference-Header-Content-Length not a number", *_binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG), "12abc"), 400)
    post("Inference-Header-Content-Length negative", *_binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG), -5), 400)
    post("Inference-Header-Content-Length past the body", *_binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG), 10 ** 30), 400)
    post("binary_data_size past the body", *_binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG)[:-10]), 400)
    post("binary_data_size negative", *_binary({"inputs": [dict(IMAGE_HEAD["inputs"][0], parameters={
        "binary_data_size": -4})]}, _bytes_tail(GOOD_PNG)), 400)
    post("binary_data_size 2^64", *_binary({"inputs": [dict(IMAGE_HEAD["inputs"][0], parameters={
        "binary_data_size": 2 ** 64})]}, _bytes_tail(GOOD_PNG)), 400)
    post("binary_data_size a string", *_binary({"inputs": [dict(IMAGE_HEAD["inputs"][0], parameters={
        "binary_data_size": "12"})]}, _bytes_tail(GOOD_PNG)), 400)
    post("bytes after the inputs' binary data", *_binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG) + b"xyz"), 400)
    post("BYTES element length past its data", *_binary(
        {"inputs": [dict(IMAGE_HEAD["inputs"][0], parameters={"binary_data_size": 4 + 10})]},
        struct.pack("<I", 2 ** 32 - 1) + b"0123456789"), 400)
    post("BYTES length cut at 3 bytes", *_binary(
        {"inputs": [dict(IMAGE_HEAD["inputs"][0], parameters={"binary_data_size": 3})]}, b"\x05\x00\x00"), 400)
    post("BYTES fewer elements than the shape", *_binary(
        {"inputs": [dict(IMAGE_HEAD["inputs"][0], shape=[2])]}, _bytes_tail(GOOD_PNG)), 400)
    post("BYTES more elements than the shape", *_binary(
        {"inputs": [dict(IMAGE_HEAD["inputs"][0], parameters={"binary_data_size": 2 * (len(GOOD_PNG) + 4)})]},
        _bytes_tail(GOOD_PNG, GOOD_PNG)), 400)
    post("UINT8 binary of the wrong size", *_binary(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                     "parameters": {"binary_data_size": 100}}]}, b"\x07" * 100), 400)
    post("FP32 binary NaN", *_binary(
        {"inputs": [{"name": "normalized", "datatype": "FP32", "shape": [1, 3, 32, 32],
                     "parameters": {"binary_data_size": 3072 * 4}}]}, np.full(3072, np.nan, "<f4").tobytes()), 400)
    post("shared memory", _json_request(dict(_pixels(), parameters={"shared_memory_region": "r"})), 400)
    post("unknown output", _json_request(_pixels(), outputs=[{"name": "features"}]), 400)
    post("output twice", _json_request(_pixels(), outputs=[{"name": "logits"}, {"name": "logits"}]), 400)
    post("outputs not a list", _json_request(_pixels(), outputs={"name": "logits"}), 400)
    post("classification 11", _json_request(_pixels(), outputs=[{"name": "probabilities",
                                                                  "parameters": {"classification": 11}}]), 400)
    post("classification a string", _json_request(_pixels(), outputs=[{"name": "probabilities",
                                                                        "parameters": {"classification": "3"}}]), 400)
    post("binary_data_output not a bool", _json_request(_pixels(), parameters={"binary_data_output": "yes"}), 400)
    post("parameters not an object", _json_request(_pixels(), parameters=[1]), 400)
    post("id a number", _json_request(_pixels(), id=5), 400)
    post("unknown backend", _json_request(_pixels(), parameters={"backend": "tensorflow"}), 400)
    post("backend not a string", _json_request(_pixels(), parameters={"backend": 3}), 400)
    post("two backends named", _json_request(_pixels(), parameters={"backend": "onnx"}), 400,
         path=INFER + "?backend=torch")
    post("unknown model", _json_request(_pixels()), 404, path="/v2/models/no-such-model/infer")
    post("unknown version", _json_request(_pixels()), 404, path=f"/v2/models/{MODEL}/versions/nope/infer")
    post("refused model (bad card)", _json_request(_pixels()), 404, path="/v2/models/bad-card-model/infer")
    post("refused backend (tampered file)", _json_request(_pixels(), parameters={"backend": "onnx"}), 404,
         path="/v2/models/tampered-model/infer")
    post("gzip body", _json_request(_pixels()), 415, headers={"Content-Encoding": "gzip"})
    post("body over the limit", b"{" + b" " * MAX_BODY + b"}", 413)
    post("POST on model metadata", b"{}", 405, path=f"/v2/models/{MODEL}")
    c["GET on infer"] = ("GET", INFER, b"", {}, 405)
    c["unknown v2 path"] = ("GET", f"/v2/models/{MODEL}/stats", b"", {}, 404)
    c["metadata of an unknown model"] = ("GET", "/v2/models/no-such-model", b"", {}, 404)
    c["config of an unknown version"] = ("GET", f"/v2/models/{MODEL}/versions/nope/config", b"", {}, 404)
    return c


def _good_v2(server) -> None:
    body, headers = _binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG))  # binary, and no Content-Type at all
    r = requests.post(server.url + INFER, data=body, headers=headers, timeout=60)
    assert r.status_code == 200 and "content-type" in r.headers, r.text
    assert r.headers["content-type"] == "application/json"  # no output asked for binary
    probs = np.array(r.json()["outputs"][0]["data"])
    assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-5


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_malformed_requests_get_a_4xx_json_error(server, name):
    method, path, body, headers, status = _bad_cases()[name]
    r = requests.request(method, server.url + path, data=body, headers=headers, timeout=60)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"], r.text[:300]
    _good_v2(server)


def test_there_are_at_least_30_malformed_cases():
    assert len(_bad_cases()) >= 30


def test_a_binary_request_needs_no_content_type(server):
    body, headers = _binary(IMAGE_HEAD, _bytes_tail(GOOD_PNG))
    r = requests.post(server.url + INFER, data=body, headers=headers, timeout=60)
    assert "content-type" not in {k.lower() for k in r.request.headers} and r.status_code == 200, r.text


def test_the_agreement_benchmark_counts_what_differs(server):
    """bench/v2_agreement.py's comparison, on the session server: tritonclient's binary BYTES answers, one
    image per request and batched, equal /classify's on every image of every backend."""
    from bench.samples import cifar_test_samples
    from bench.v2_agreement import agree

    labels = requests.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()["parameters"]["labels"]
    backends = requests.get(f"{server.url}/models/", timeout=10).json()["models"][MODEL]["backends"]
    samples = cifar_test_samples(12)
    for backend in backends[:2]:
        row = agree(server.url, MODEL, backend, samples, labels, batch=5)
        assert row["images"] == 12 and row["single_top1_differs"] == row["batched_top1_differs"] == 0, row
        assert row["single_max_prob_diff"] <= 1e-6 and row["batched_max_prob_diff"] <= 1e-6, row
