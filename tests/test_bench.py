"""Benchmarks and reports, on the smoke model: Locust runs, the accuracy report, INT8, faults."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench.load_test import run_locust
from bench.loadgen import closed_loop, run
from bench.samples import cifar_test_samples
from bench.server import free_port
from lab.card import read_card
from tests.conftest import REPO


def bench_script(store, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a bench/ script as a user would, against the test store and data."""
    env = dict(store["env"], LAB_DATA_ROOT=str(store["data"]))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_headless_locust_per_backend_checks_every_answer(server, store, tmp_path):
    for backend in ("onnx", "torch"):
        r = run_locust(server.url, backend, users=4, spawn_rate=4, run_time=4, out=tmp_path,
                       data_root=str(store["data"]), images=40)
        assert r["requests"] > 0 and r["failures"] == 0, r
        assert r["answers_checked"] > 0 and r["accuracy"] is not None, r
        assert (tmp_path / f"locust_{backend}_stats.csv").exists()


def test_locust_master_with_one_worker(server, store, tmp_path):
    r = run_locust(server.url, "onnx", users=2, spawn_rate=2, run_time=4, out=tmp_path, workers=1,
                   data_root=str(store["data"]), images=20)
    assert r["requests"] > 0 and r["failures"] == 0, r
    assert r["answers_checked"] > 0  # tallied on the worker, reported to the master


def test_a_port_with_nothing_listening_gives_a_finished_run_with_errors(tmp_path, store):
    url = f"http://127.0.0.1:{free_port()}"
    # long enough for Locust to start its users on a busy machine (each request then fails at once)
    r = run_locust(url, "onnx", users=2, spawn_rate=2, run_time=6, out=tmp_path, data_root=str(store["data"]),
                   images=10)
    assert r["requests"] > 0 and r["failures"] == r["requests"], r
    res = run(closed_loop(f"{url}/classify", cifar_test_samples(5, store["data"]), 2, requests=6))
    assert res.statuses == {0: 6} and res.errors == 6 and res.ok == 0


def test_the_load_generator_keeps_the_stage_times_each_answer_reports(server, store):
    from bench.serve_latency import where_c1_goes

    res = run(closed_loop(f"{server.url}/classify?backend=onnx", cifar_test_samples(5, store["data"]), 1, requests=8))
    s = res.summary()
    assert res.ok == 8 and sorted(s["stages_p50_ms"]) == ["inference_ms", "preprocess_ms", "queue_ms"]
    assert all(len(v) == 8 and min(v) >= 0 for v in res.stages.values())
    assert "decode" in where_c1_goes(s, floor_ms=0.0) and "stage times" in where_c1_goes({"p50_ms": 1.0}, 0.0)


def test_load_test_refuses_remote_hosts():
    from bench.load_test import check_host

    with pytest.raises(SystemExit, match="127.0.0.1"):
        check_host("http://example.com:3000", allow_remote=False)
    assert check_host("http://127.0.0.1:3000/", allow_remote=False) == "http://127.0.0.1:3000"


def test_accuracy_report_matches_direct_evaluation(store, tmp_path):
    from models import create_model, with_tta
    from training.data import load_dataset
    from training.evaluate import predict_torch

    bench_script(store, "accuracy_report.py", "--model", "cifar10-airbench-smoke", "--limit", "100",
                 "--out", str(tmp_path))
    rep = json.loads((tmp_path / "accuracy.json").read_text())
    card = read_card(store["model_dir"])
    net = create_model(card.architecture.name, **card.architecture.kwargs)
    net.load_state_dict(torch.load(store["model_dir"] / "model.pth", weights_only=True))
    test = load_dataset("cifar10", "test", store["data"], progress=False)
    assert len(test) == 100
    logits = predict_torch(with_tta(net, card.tta_level).eval(), test, card.preprocessing)
    direct = float((logits.argmax(1) == test.labels.numpy()).mean())
    assert rep["backends"]["torch"]["accuracy"] == pytest.approx(direct)
    assert rep["backends"]["onnx"]["accuracy"] == pytest.approx(direct)
    assert rep["top1_differences"]["torch"]["onnx"] == 0
    from lab.hardware import cpu_has_native_bf16

    # and what else runs here; torch_bf16 only where the CPU computes bf16 natively (the backend says so)
    assert {"torch", "onnx_raw", "onnx", "onnx_int8"} <= set(rep["backends"])
    assert ("torch_bf16" in rep["backends"]) == cpu_has_native_bf16()
    md = (tmp_path / "accuracy.md").read_text()
    assert "Accuracy for class: airplane" in md and "INT8 vs FP32 ONNX" in md
    assert (tmp_path / "per_class_accuracy.png").exists() and (tmp_path / "confusion_onnx_int8.png").exists()


def test_int8_record_in_the_card(store):
    card = read_card(store["model_dir"])
    i8 = card.int8
    assert i8["calibration"].startswith("training images")
    assert 0 <= i8["accuracy"] <= 1 and i8["drop"] == pytest.approx(i8["fp32_accuracy"] - i8["accuracy"])
    assert card.backends["onnx_int8"] == "model.int8.onnx" and "model.int8.onnx" in card.files


def test_combined_report_end_to_end(combined_report):
    out = combined_report  # bench/report.py with small settings (tests/conftest.py)
    md = (out / "report.md").read_text()
    for heading in ("## Training", "## Export parity", "## Accuracy and latency per backend",
                    "## Serving: concurrency sweep", "## Serving: MLPerf-style scenarios", "## Locust"):
        assert heading in md, heading
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and '<nav class="toc"' in html
    assert md.count("Command: `python ") >= 6  # the report's own command and each section's
    data = json.loads((out / "report.json").read_text())
    assert set(data["sweep"]) == {"onnx", "onnx_int8"}
    for b in ("onnx", "onnx_int8"):
        assert all(r["errors"] == 0 for r in data["sweep"][b])
        sc = data["scenarios"][b]
        assert sc["single_stream"]["ok"] == 10 and sc["offline"]["ok"] == 40
        assert sc["offline"]["accuracy"] is not None


def test_the_ideal_queue_matches_queueing_theory():
    """M/D/1 (one request at a time, fixed service time): mean wait rho / (2 mu (1 - rho)) (Pollaczek-
    Khinchine); batching shortens the tail at the same load; the batch cost goes through both points."""
    import numpy as np

    from bench.ideal_queue import batch_cost, simulate, sojourn

    service, rate = 0.005, 160.0  # rho = 0.8
    rng = np.random.default_rng(1)
    arrivals = np.cumsum(rng.exponential(1 / rate, 400_000))
    wait = sojourn(arrivals, 0.0, service, max_batch=1)[40_000:] - service
    theory = 0.8 / (2 * (1 / service) * 0.2)
    assert abs(wait.mean() - theory) / theory < 0.05, (wait.mean(), theory)
    single = simulate(rate, 0.0, service, max_batch=1)
    assert 3.5 < single["ratio"] < 6, single  # the tail queueing alone gives at 80 % load
    a, b = batch_cost(batch1_ms=5.0, batch64_images_per_s=64 / 0.064)
    assert abs(a + b - 0.005) < 1e-12 and abs(a + 64 * b - 0.064) < 1e-12
    batched = simulate(rate, a, b)
    assert batched["p99_ms"] < single["p99_ms"], (batched, single)


def test_the_open_loop_plot_puts_the_service_over_the_perfect_servers_curve(tmp_path):
    """serve_latency.py's open-loop plot from a report shaped as the script writes it; and loads that
    are not fractions are refused with one line before anything is served."""
    from bench.ideal_queue import simulate
    from bench.serve_latency import CURVE, plot_open_loop

    curve = {f"{f:.2f}": simulate(f * 100, 0.001, 0.008, requests=5_000) for f in CURVE}
    point = dict(load=0.8, rate=80.0, p50_ms=12.0, p99_ms=60.0, ideal=curve["0.80"], replay=dict(curve["0.80"]))
    report = {"model": "m:1", "open": {"onnx": {"0.80": point}}, "open_curve": {"onnx": curve}}
    out = tmp_path / "open.png"
    plot_open_loop(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in ("fast", "0.8,2"):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_latency.py"), "--open-loads", bad],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--open-loads" in proc.stderr, proc.stderr[-2000:]


def test_the_replay_answers_every_arrival_once_in_batches_of_what_has_arrived():
    """bench/ideal_queue.py replay: the arrival stream is loadgen's; each request runs once, in order, in
    batches no larger than the limit, and a batch holds only requests that had arrived when it started."""
    import random
    import time

    from bench.ideal_queue import due_times, replay

    due = due_times(rate=400, seconds=0.5, seed=3)
    rng, t, expect = random.Random(3), 0.0, []
    while t < 0.5:
        expect.append(t)
        t += rng.expovariate(400)
    assert due == expect
    seen, start = [], time.perf_counter()

    def run_batch(idx: range) -> None:
        now = time.perf_counter() - start
        assert all(due[k] <= now + 1e-3 for k in idx), "a request ran before it arrived"
        seen.append(list(idx))
        time.sleep(0.004)  # a model call: arrivals pile up behind it

    r = replay(run_batch, due, max_batch=8)
    assert [k for b in seen for k in b] == list(range(len(due)))
    assert 1 < max(map(len, seen)) <= 8 and r["requests"] == len(due) and r["p99_ms"] >= r["p50_ms"] > 0
    assert 0 < r["busy"] <= 1  # the share of the time the model (here: a 4 ms sleep) ran


def test_the_checkout_comparison_says_not_established_when_its_interval_straddles_zero():
    from bench.compare_checkouts import interval, verdict

    lo, hi = interval([0.10, 0.12, 0.09, 0.11, 0.10, 0.13])
    assert 0.09 <= lo < hi <= 0.13 and verdict(lo, hi) == "B higher"
    lo, hi = interval([-0.2, 0.3, -0.1, 0.25, -0.3, 0.2])
    assert lo < 0 < hi and verdict(lo, hi) == "not established"
    assert verdict(*interval([-1.0, -1.2, -0.9])) == "B lower"


def test_the_closed_loop_sends_every_sample_equally_often_at_any_concurrency():
    """Accuracy under load is measured on the images sent: all of them, each as often."""
    import asyncio
    from collections import Counter

    from bench.loadgen import Sample

    seen: Counter = Counter()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                                  if line.startswith(b"content-length")))
                seen[await reader.readexactly(length)] += 1
                await asyncio.sleep(0.001 * (len(seen) % 3))  # answers out of step across connections
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except asyncio.IncompleteReadError:  # the client closed its connection
            writer.close()

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        samples = [Sample(body=str(k).encode(), content_type="image/png") for k in range(100)]
        res = await closed_loop(f"http://127.0.0.1:{port}/x", samples, 16, requests=400)
        server.close()
        return res

    res = asyncio.run(go())
    assert res.ok == 400 and len(seen) == 100 and set(seen.values()) == {4}


def test_the_ideal_queue_prices_a_load_from_the_command_line():
    import re
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "bench" / "ideal_queue.py")
    ok = subprocess.run([sys.executable, script, "--rate", "100", "--batch1-ms", "5", "--batch64", "200",
                         "--requests", "20000"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    p50, p99 = map(float, re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", ok.stdout).groups())
    assert 0 < p50 < p99
    bad = subprocess.run([sys.executable, script, "--rate", "-1", "--batch1-ms", "5", "--batch64", "200"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
