"""The benchmark's Open Inference Protocol half: bench/v2client.py's requests and checker against the real
service (the session server), the checker on wrong and unreadable answers, Locust's v2 option,
bench/v2_compare.py on one server, and the peers' model code (bench/peers/) without installing KServe or
MLServer: its preprocessing is lab/preprocess.py's, its probabilities the service's backend's, and the
peers' locks pin them with hashes."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from bench.loadgen import Result, Sample, closed_loop, run
from bench.samples import cifar_test_samples
from bench.v2client import V2, read_answer, top1
from lab.card import read_card
from tests.conftest import REPO

MODEL = "cifar10-airbench-smoke"


@pytest.fixture(scope="module")
def card(store):
    return read_card(store["model_dir"])


@pytest.fixture(scope="module")
def samples(store):
    s = cifar_test_samples(12, store["data"])
    assert all(x.label is not None for x in s)
    return s


def test_v2_closed_loop_against_the_service_checks_every_answer(server, card, samples):
    """Every input kind and encoding through the v2 path: all 200, every answer read and checked, the
    same top-1 answers as /classify gives for the same images (the same number right)."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    classify = run(closed_loop(f"{server.url}/classify?backend=onnx&model={MODEL}", samples, 2,
                               requests=len(samples)))
    assert classify.ok == len(samples) and classify.checked == len(samples)
    for proto in (V2(input="image", binary=True, labels=card.classes, backend="onnx"),
                  V2(input="image", binary=False, labels=card.classes, backend="onnx"),
                  V2(input="pixels", binary=True, labels=card.classes, backend="onnx", spec=card.preprocessing),
                  V2(input="pixels", binary=False, labels=card.classes, backend="onnx", spec=card.preprocessing),
                  V2(input="image", binary=True, output="classification", backend="onnx")):
        res = run(closed_loop(url, samples, 3, requests=2 * len(samples), protocol=proto))
        assert res.statuses == {200: 2 * len(samples)}, (proto, res.statuses)
        assert res.unreadable == 0 and res.checked == 2 * len(samples), proto
        assert res.correct == 2 * classify.correct, (proto, res.correct, classify.correct)
    # the backend travels in the request: an unknown one is refused by the service, every time
    bad = run(closed_loop(url, samples, 1, requests=3, protocol=V2(labels=card.classes, backend="no-such")))
    assert bad.statuses == {400: 3} and bad.checked == 0


def test_the_v2_checker_flags_wrong_and_unreadable_answers(card):
    k = len(card.classes)
    probs = np.zeros((1, k), np.float32)
    probs[0, 3] = 1.0
    head = {"model_name": "m", "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, k],
                                            "parameters": {"binary_data_size": 4 * k}}]}
    h = json.dumps(head).encode()
    binary = h + probs.tobytes()
    resp_head = f"http/1.1 200 ok\r\ninference-header-content-length: {len(h)}".encode()
    as_json = json.dumps({"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, k],
                                       "data": probs.ravel().tolist()}]}).encode()
    el = b"0.9:3:" + card.classes[3].encode()
    cls_head = json.dumps({"outputs": [{"name": "probabilities", "datatype": "BYTES", "shape": [1, 1],
                                        "parameters": {"binary_data_size": 4 + len(el)}}]}).encode()
    classification = cls_head + len(el).to_bytes(4, "little") + el
    cls_resp = f"http/1.1 200 ok\r\ninference-header-content-length: {len(cls_head)}".encode()
    right, wrong = Sample(b"", "image/png", card.classes[3]), Sample(b"", "image/png", card.classes[4])
    for proto, head_bytes, body in ((V2(labels=card.classes), resp_head, binary),
                                    (V2(labels=card.classes, binary=False), b"http/1.1 200 ok", as_json),
                                    (V2(output="classification"), cls_resp, classification)):
        res = Result()
        proto.check(head_bytes, body, right, res)
        proto.check(head_bytes, body, wrong, res)
        proto.check(head_bytes, body, Sample(b"", "image/png", None), res)  # unlabelled: read, not counted
        assert (res.checked, res.correct, res.unreadable) == (2, 1, 0), proto
    res = Result()
    V2(labels=card.classes).check(b"http/1.1 200 ok", b"<html>not v2</html>", right, res)
    V2(labels=card.classes).check(resp_head, binary[:-8], right, res)  # the binary tail cut short
    assert (res.checked, res.correct, res.unreadable) == (2, 0, 2)
    assert top1(read_answer(as_json), "probabilities", None) == "3"  # no labels: the index
    with pytest.raises(ValueError, match="labels"):
        V2(output="probabilities")
    with pytest.raises(ValueError, match="spec"):
        V2(input="pixels", labels=card.classes)


def test_the_v2_request_is_what_the_protocol_says(card):
    data = b"\xff\xd8\xff\xe0 not really a jpeg"
    body, headers = V2(labels=card.classes, backend="onnx_int8").request(Sample(data, "image/jpeg", "cat"))
    n = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:n])
    assert doc["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1],
                              "parameters": {"binary_data_size": 4 + len(data)}}]
    assert doc["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": True}}]
    assert doc["parameters"] == {"backend": "onnx_int8"} and headers["X-Lab-Backend"] == "onnx_int8"
    assert body[n:] == len(data).to_bytes(4, "little") + data
    body, headers = V2(labels=card.classes, binary=False).request(Sample(data, "image/jpeg", "cat"))
    doc = json.loads(body)
    assert base64.b64decode(doc["inputs"][0]["data"][0]) == data and "X-Lab-Backend" not in headers
    assert "Inference-Header-Content-Length" not in headers


def test_locust_v2_option_checks_every_answer(server, store, tmp_path):
    from bench.load_test import run_locust

    r = run_locust(server.url, "onnx_int8", users=2, spawn_rate=2, run_time=4, out=tmp_path,
                   data_root=str(store["data"]), images=20, model=MODEL, protocol="v2")
    assert r["requests"] > 0 and r["failures"] == 0, r
    assert r["answers_checked"] > 0 and r["accuracy"] is not None, r


def test_v2_compare_measures_one_server_by_url(server, store, tmp_path):
    env = dict(store["env"], LAB_DATA_ROOT=str(store["data"]))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "v2_compare.py"), "--url", server.url, "--model", MODEL,
                           "--input", "image", "--backend", "onnx", "--duration", "1", "--c1-requests", "10",
                           "--open-seconds", "1", "--images", "20", "--out", str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "v2_compare.json").read_text())
    (row,) = rep["rows"]
    assert row["errors"] == 0 and row["unreadable"] == 0 and row["checked"] == row["requests"] > 0
    assert row["accuracy"] is not None and row["c64_rps"] > 0 and "open_p99_ms" in row
    assert "labels from the metadata" in proc.stdout
    assert "| c=1 p50 ms |" in (tmp_path / "v2_compare.md").read_text()


def test_perf_analyzer_missing_or_broken_gives_one_line(tmp_path):
    from bench.v2_compare import perf_analyzer_command, perf_analyzer_status, read_perf_csv

    path, why = perf_analyzer_status("no-such-perf-analyzer-binary")
    assert path is None and "not on PATH" in why and "glibc" in why and "\n" not in why
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\necho 'perf_analyzer: /lib/libc.so.6: version GLIBC_2.38 not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    path, why = perf_analyzer_status(str(fake))
    assert path is None and "exited 1" in why and "GLIBC_2.38" in why
    cmd = perf_analyzer_command("pa", "http://127.0.0.1:3000", "m", tmp_path / "d.json", "onnx", 64, tmp_path / "x.csv",
                                5000)
    assert cmd[cmd.index("-u") + 1] == "127.0.0.1:3000" and "X-Lab-Backend:onnx" in cmd and "64:64" in cmd
    csv = tmp_path / "x.csv"
    csv.write_text("Concurrency,Inferences/Second,Client Send,p50 latency,p90 latency,p95 latency,p99 latency\n"
                   "64,512.5,10,120000,130000,140000,150000\n")
    assert read_perf_csv(csv) == {"rps": 512.5, "p50_ms": 120.0, "p99_ms": 150.0}


# ---------------------------------------------------------------- the peers' code, without the peers


def test_the_peers_preprocessing_is_lab_preprocess(store, card, samples):
    """bench/peers/common.py (what both peers' model classes run) on the same bytes: lab/preprocess.py's
    model input exactly, for binary bytes, base64 (JSON) and pixels; and probabilities equal to the
    service's onnx backend's within 1e-6; the zero model's are uniform."""
    from bench.peers.common import Classifier, model_input
    from lab.backends import load_backend, softmax
    from lab.preprocess import decode_uint8, normalize, preprocess_bytes

    files = [s.body for s in samples]
    want = np.stack([preprocess_bytes(f, card.preprocessing) for f in files])
    got = model_input("image", np.array(files, dtype=object), card.preprocessing)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    b64 = [base64.b64encode(f).decode() for f in files]
    assert np.array_equal(model_input("image", b64, card.preprocessing), want)
    px = np.stack([decode_uint8(f, card.preprocessing) for f in files])
    assert np.array_equal(model_input("pixels", px.ravel().tolist(), card.preprocessing),
                          normalize(px, card.preprocessing))
    clf = Classifier(store["model_dir"], "model.sim.onnx", threads=1)
    ref = softmax(load_backend("onnx", store["model_dir"], card, 1).predict(want))
    assert np.allclose(clf.probabilities("image", files), ref, atol=1e-6)
    zero = Classifier(store["model_dir"], "zero").probabilities("image", files[:2])
    assert np.allclose(zero, 1 / len(card.classes))


def test_lab_preprocess_needs_only_numpy_and_pillow():
    """The peers import bench/peers/common.py (so lab/preprocess.py) in environments without the service's
    packages: it must import nothing but the standard library, NumPy and Pillow."""
    code = ("import sys; before = set(sys.modules); import bench.peers.common; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - {'bench', 'lab'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout.replace("'", '"'))) <= {"numpy", "PIL"}, proc.stdout


@pytest.mark.parametrize("peer,version", [("kserve", "0.21.0"), ("mlserver", "1.7.1")])
def test_each_peer_has_a_lock_of_its_own_with_hashes(peer, version):
    from bench.peers import envs

    lock = envs.lock_path(peer).read_text()
    pins = re.findall(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)(?: ;[^\\\n]*)? \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.M)
    names = {n.lower(): v for n, v, _ in pins}
    assert names.get(peer) == version and names.get("onnxruntime") == "1.32.0", sorted(names)
    packages = [ln for ln in lock.splitlines() if re.match(r"^[A-Za-z0-9]", ln)]
    assert len(packages) == len(pins) > 20  # every package pinned with at least one hash
    assert envs.venv_python(peer).is_relative_to(REPO / ".cache" / "peers")
