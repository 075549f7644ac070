"""The service, tested as users meet it: a real `bentoml serve` on 127.0.0.1 and real HTTP requests."""
from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from lab.backends import softmax
from lab.backends.onnx import OnnxBackend
from lab.card import read_card
from lab.preprocess import preprocess_bytes
from tests.conftest import MAX_BODY, SHARED_DATA, has_real_cifar
from tests.images import awkward_valid, broken, decompression_bomb, encode, gradient
from bench.server import REPO, Server



def classify(server, data: bytes, ctype: str = "image/jpeg", **params) -> requests.Response:
    return requests.post(f"{server.url}/classify", data=data, headers={"Content-Type": ctype},
                         params=params, timeout=60)


def good_image() -> bytes:
    return encode(gradient(32, 32), "PNG")


def assert_still_serving(server):
    r = classify(server, good_image(), "image/png")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"]


def test_lists_models_and_backends(server):
    r = requests.get(f"{server.url}/models/", timeout=10)
    assert r.status_code == 200
    info = r.json()
    assert info["default"] == "cifar10-airbench-smoke"
    good = info["models"]["cifar10-airbench-smoke"]
    assert {"onnx", "torch"} <= set(good["backends"])
    assert good["card"]["preprocessing"]["size"] == [32, 32]


def test_bentoml_endpoints(server):
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/livez", timeout=10).status_code == 200
    assert "bentoml" in requests.get(f"{server.url}/metrics", timeout=10).text.lower()
    spec = requests.get(f"{server.url}/docs.json", timeout=10).json()
    assert "/classify" in spec["paths"] and "/classify_batch" in spec["paths"]


def test_response_shape_raw_and_multipart(server):
    raw = classify(server, good_image(), "image/png", top_k=5, backend="onnx")
    assert raw.status_code == 200
    body = raw.json()
    assert body["backend"] == "onnx" and body["model"].startswith("cifar10-airbench-smoke:")
    assert len(body["predictions"]) == 5 and body["inference_ms"] > 0
    probs = [p["probability"] for p in body["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    multi = requests.post(f"{server.url}/classify", files={"image": ("x.png", good_image(), "image/png")},
                          data={"backend": "torch", "top_k": "2"}, timeout=60)
    assert multi.status_code == 200, multi.text
    assert multi.json()["backend"] == "torch" and multi.json()["filename"] == "x.png"
    assert len(multi.json()["predictions"]) == 2


def _real_test_images(n: int) -> list[tuple[bytes, str]]:
    root = SHARED_DATA / "cifar10-jpg" / "test"
    files = sorted(root.glob("*/*.jpg"))
    random.Random(0).shuffle(files)
    return [(p.read_bytes(), p.parent.name) for p in files[:n]]


@pytest.mark.skipif(not has_real_cifar(), reason=f"no CIFAR-10 copy in {SHARED_DATA}")
def test_backends_agree_on_real_cifar10_images(server):
    for data, _ in _real_test_images(24):
        a = classify(server, data, backend="onnx", top_k=10).json()
        b = classify(server, data, backend="torch", top_k=10).json()
        assert a["predictions"][0]["index"] == b["predictions"][0]["index"]
        pa = {p["index"]: p["probability"] for p in a["predictions"]}
        pb = {p["index"]: p["probability"] for p in b["predictions"]}
        assert max(abs(pa[k] - pb[k]) for k in pa) < 1e-4


@pytest.mark.parametrize("name", list(broken()))
def test_bad_input_gets_a_4xx_naming_the_problem(server, name):
    data, ctype, status = broken()[name]
    r = classify(server, data, ctype)
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]
    assert_still_serving(server)


def test_decompression_bomb_is_refused(server):
    r = classify(server, decompression_bomb(), "image/png")
    assert r.status_code == 413, r.text
    assert "pixels" in r.json()["error"]
    assert_still_serving(server)


def test_body_over_the_limit_is_refused(server):
    r = classify(server, b"\xff" * (MAX_BODY + 1), "image/jpeg")
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert_still_serving(server)


@pytest.mark.parametrize("params,status,needle", [
    ({"backend": "tensorflow"}, 400, "unknown backend"),
    ({"model": "no-such-model"}, 404, "unknown model"),
    ({"model": "cifar10-airbench-smoke", "version": "nope"}, 404, "no version"),
    ({"top_k": "0"}, 400, "top_k"),
    ({"top_k": "many"}, 400, "top_k"),
])
def test_bad_options(server, params, status, needle):
    r = classify(server, good_image(), "image/png", **params)
    assert r.status_code == status and needle in r.json()["error"], r.text
    assert_still_serving(server)


def test_malformed_multipart_and_batches(server):
    url = f"{server.url}/classify_batch"
    bad = requests.post(url, data=b"--xyz\r\nnot really", timeout=30,
                        headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert 400 <= bad.status_code < 500 and bad.json()["error"]
    assert requests.post(url, data=good_image(), headers={"Content-Type": "image/png"},
                         timeout=30).status_code == 415
    assert requests.post(url, files={"other": ("a.png", good_image())}, timeout=30).status_code == 400
    mixed = requests.post(url, files=[("images", ("ok.png", good_image())), ("images", ("bad.jpg", b"garbage"))],
                          timeout=30)
    assert mixed.status_code == 200, mixed.text  # each image answers for itself
    ok, bad = mixed.json()["results"]
    assert ok["filename"] == "ok.png" and ok["predictions"]
    assert bad["status"] == 415 and "image 1 (bad.jpg)" in bad["error"] and "predictions" not in bad
    assert mixed.json()["errors"] == 1
    all_bad = requests.post(url, files=[("images", ("a.jpg", b"garbage")), ("images", ("b.jpg", b""))], timeout=30)
    assert all_bad.status_code == 415 and len(all_bad.json()["results"]) == 2
    two_files = requests.post(f"{server.url}/classify", files=[("image", ("a.png", good_image())),
                                                                ("image", ("b.png", good_image()))], timeout=30)
    assert two_files.status_code == 400
    assert_still_serving(server)


def test_batch_endpoint_keeps_order(server):
    images = [encode(gradient(20 + i, 30), "PNG") for i in range(5)]
    r = requests.post(f"{server.url}/classify_batch", params={"top_k": 10},
                      files=[("images", (f"{i}.png", b)) for i, b in enumerate(images)], timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [f"{i}.png" for i in range(5)]
    for data, res in zip(images, results):
        single = classify(server, data, "image/png", top_k=10).json()
        assert res["predictions"][0]["index"] == single["predictions"][0]["index"]


@pytest.mark.parametrize("name", list(awkward_valid()))
def test_awkward_but_valid_images_are_classified(server, name):
    data, ctype = awkward_valid()[name]
    r = classify(server, data, ctype)
    assert r.status_code == 200, (name, r.text)
    assert len(r.json()["predictions"]) == 3


def _expected(store, images: list[bytes]) -> list[np.ndarray]:
    card = read_card(store["model_dir"])
    spec = card.preprocessing
    onnx = OnnxBackend(store["model_dir"] / card.backends["onnx"], threads=1)
    return [softmax(onnx.predict(preprocess_bytes(b, spec)[None]))[0] for b in images]


def test_concurrent_clients_each_get_their_own_answer_batched(server, store):
    rng = np.random.default_rng(0)
    images = [encode(gradient(32, 32).rotate(float(a)), "PNG") for a in rng.uniform(0, 360, 32)]
    expected = _expected(store, images)

    def one(i):
        return i, classify(server, images[i], "image/png", top_k=10, backend="onnx")

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    batch_sizes = []
    for i, r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        got = {p["index"]: p["probability"] for p in body["predictions"]}
        assert max(abs(got[k] - expected[i][k]) for k in range(10)) < 1e-4  # its own image's answer
        batch_sizes.append(body["batch_size"])
    assert max(batch_sizes) > 1, batch_sizes  # requests were batched together


def test_concurrency_64_without_errors(server):
    images = [encode(gradient(32, 32).rotate(i * 5.0), "JPEG") for i in range(64)]

    def client(i):
        with requests.Session() as s:
            return [s.post(f"{server.url}/classify", data=images[i], timeout=120,
                           headers={"Content-Type": "image/jpeg"}).status_code for _ in range(4)]

    with ThreadPoolExecutor(64) as pool:
        codes = [c for cs in pool.map(client, range(64)) for c in cs]
    assert codes.count(200) == len(codes) == 256, {c: codes.count(c) for c in set(codes)}


def test_tampered_model_is_refused_and_the_rest_keep_serving(server):
    info = requests.get(f"{server.url}/models/", timeout=10).json()
    tampered = info["models"]["tampered-model"]
    assert "onnx" not in tampered["backends"] and "sha256" in tampered["refused"]["onnx"]
    r = classify(server, good_image(), "image/png", model="tampered-model", backend="onnx")
    assert r.status_code == 404 and "sha256" in r.json()["error"]
    assert "refusing onnx backend of model tampered-model" in server.log()
    assert classify(server, good_image(), "image/png", model="tampered-model",
                    backend="torch").status_code == 200  # its intact file still serves
    assert_still_serving(server)


def test_onnx_only_deployment_serves_without_torch(store, tmp_path):
    blocker = tmp_path / "blocker"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    env = dict(store["env"], PYTHONPATH=f"{blocker}{os.pathsep}{REPO}",
               LAB_DEFAULT_MODEL="cifar10-airbench-smoke")
    s = Server(env, tmp_path / "serve-no-torch.log")
    try:
        r = classify(s, good_image(), "image/png", backend="onnx")
        assert r.status_code == 200, r.text
        t = classify(s, good_image(), "image/png", backend="torch")
        assert t.status_code == 404 and "torch cannot be imported" in t.json()["error"]
    finally:
        s.stop()


def test_no_queueing_at_low_load_after_a_burst(server):
    images = [encode(gradient(32, 32).rotate(i * 3.0), "PNG") for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda b: classify(server, b, "image/png"), images))
    for b in images[:5]:
        r = classify(server, b, "image/png")
        assert r.status_code == 200 and r.json()["queue_ms"] < 50, r.json()


def test_overload_answers_503_with_retry_after_and_recovers(store, tmp_path):
    s = Server(store["env"], tmp_path / "serve-overload.log",
               {"LAB_DEFAULT_MODEL": "cifar10-airbench-smoke", "LAB_MAX_INFLIGHT": "2"})
    try:
        big = encode(gradient(2000, 1500), "PNG")  # slow enough to decode that requests pile up

        def one(_):
            r = classify(s, big, "image/png")
            return r.status_code, r.headers.get("Retry-After")

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(48)))
        codes = [c for c, _ in answers]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        assert all(ra == "1" for c, ra in answers if c == 503)
        assert_still_serving(s)
    finally:
        s.stop()


def test_bentoml_build_accepts_the_bentofile(store, tmp_path):
    """The project's bentofile.yaml, pointed at the test store's model, builds a Bento."""
    import subprocess
    import sys

    text = (REPO / "bentofile.yaml").read_text().replace('"cifar10-airbench:latest"', '"cifar10-airbench-smoke:latest"')
    bentofile = tmp_path / "bentofile.yaml"
    bentofile.write_text(text)
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    proc = subprocess.run([bentoml, "build", "-f", str(bentofile), str(REPO)], env=store["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    listed = subprocess.run([bentoml, "list", "-o", "json"], env=store["env"], capture_output=True, text=True)
    assert "image_classifier" in listed.stdout
    bento = next((Path(store["env"]["BENTOML_HOME"]) / "bentos" / "image_classifier").glob("*/bento.yaml")).parent
    assert (bento / "src" / "serving" / "service.py").exists() and (bento / "src" / "models" / "airbench.py").exists()
    assert "tag: cifar10-airbench-smoke:" in (bento / "bento.yaml").read_text()  # the model, by tag


def test_a_bad_card_is_refused_with_one_line_and_never_500s(server):
    info = requests.get(f"{server.url}/models/", timeout=10).json()
    assert "bad-card-model" not in info["models"]
    (tag, why), = [(t, w) for t, w in info["refused"].items() if t.startswith("bad-card-model:")]
    assert "lacks classes" in why and "\n" not in why
    r = classify(server, good_image(), "image/png", model="bad-card-model")
    assert r.status_code == 404 and "lacks classes" in r.json()["error"], r.text
    assert "refusing model bad-card-model" in server.log()
    assert_still_serving(server)


def test_openapi_describes_the_http_contract_and_every_backend(server):
    from lab.backends import list_backends

    spec = requests.get(f"{server.url}/docs.json", timeout=10).json()
    single = spec["paths"]["/classify"]["post"]
    assert "image/*" in single["requestBody"]["content"]
    form = single["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["backend"]["enum"] == list_backends() and "image" in form
    batch = spec["paths"]["/classify_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "images" in batch["schema"]["properties"]
    assert "tickets" not in json.dumps(spec["paths"]["/classify"])
