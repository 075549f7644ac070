#!/usr/bin/env python
"""Serving latency and throughput, per backend, against what the model and HTTP cost alone, in one run.

    python bench/serve_latency.py                                   # onnx and onnx_int8, the default model
    python bench/serve_latency.py --backends onnx,onnx_int8,openvino_bf16 --duration 20

For the stored model (default cifar10-airbench:latest), with this project's raw-socket client
(bench/loadgen.py; every answer checked against the image's label; the client's CPU reported):
  1. in process (no HTTP): preprocess + backend call at batch 1 (latency) and batch 64 (images/s)
  2. the HTTP floor: a bare Starlette no-op endpoint under uvicorn, at c=1 and c=64
  3. `bentoml serve` (1 worker) with the real backends and `noop` (bench/noop_backend.py: no model,
     so it measures the service's own cost): p50/p99 at c=1, throughput at c=64
  4. open loop: Poisson arrivals at 80 % of each real backend's c=64 throughput for --open-seconds,
     latency from each request's due time (no coordinated omission), beside what a perfect batching
     server with the in-process costs would do with the same load (bench/ideal_queue.py)
  5. overload: 256 connections from one address for --overload-seconds against the first backend:
     goodput (200s a second) against the c=64 capacity, and how fast the excess is refused
  6. (unless --skip-unbatched) c=64 with batching off (LAB_MAX_BATCH_SIZE=1)
and prints the service's targets (docs/benchmarks.md) with MET / NOT MET.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.accuracy_report import backends_or_exit
from bench.ideal_queue import batch_cost, simulate
from bench.loadgen import closed_loop, poisson, run
from bench.samples import cifar_test_samples
from bench.server import Server
from lab.backends import get_backend, load_backend
from lab.card import Card, read_card
from lab.hardware import cores
from lab.paths import REPO
from lab.preprocess import Preprocessing, normalize, open_image, preprocess_bytes, to_uint8
from lab.store import get_model

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def stored_model(tag: str) -> tuple[str, Path, Card]:
    m = get_model(tag)
    return m.tag, m.path, read_card(m.path)


def in_process(backend, spec: Preprocessing, samples, reps: int, rounds: int = 5) -> dict:
    """Batch 1: median latency of preprocess + predict. Batch 64: images/s, median over rounds."""
    data = [s.body for s in samples]
    for d in data[:10]:
        backend.predict(preprocess_bytes(d, spec)[None])
    lat = []
    for i in range(reps):
        t0 = time.perf_counter()
        backend.predict(preprocess_bytes(data[i % len(data)], spec)[None])
        lat.append(time.perf_counter() - t0)
    batch = data[:64]
    tput = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        x = normalize(np.stack([to_uint8(open_image(d), spec) for d in batch]), spec)
        backend.predict(x)
        tput.append(len(batch) / (time.perf_counter() - t0))
    pre = []
    for d in data[:200]:
        t0 = time.perf_counter()
        preprocess_bytes(d, spec)
        pre.append(time.perf_counter() - t0)
    return {"batch1_ms": 1000 * statistics.median(lat), "batch1_p99_ms": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))],
            "batch64_images_per_s": statistics.median(tput), "preprocess_ms": 1000 * statistics.median(pre)}


def handoff_us(reps: int = 2000) -> float:
    """Median microseconds of a no-op's round trip to a worker thread and back, as the service would
    hand it an image to decode (anyio.to_thread on the event loop)."""
    import anyio

    async def go():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(int)
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)

    return run(go())


def http_runs(url: str, samples, backends: list[str], c1_requests: int, duration: float, label: str,
              server: Server | None = None, only_c64: bool = False) -> dict:
    out = {}
    for b in backends:
        target = f"{url}/classify?backend={b}" if b != "floor" else f"{url}/noop"
        r = {}
        if not only_c64:
            r["c1"] = run(closed_loop(target, samples, 1, requests=c1_requests, warmup=20)).summary()
        r["c64"] = run(closed_loop(target, samples, 64, duration=duration, warmup=64)).summary()
        if server is not None:
            r["rss_after_mb"] = server.rss_bytes() / 2**20
        out[b] = r
        c1_txt = (f"c=1 p50 {r['c1']['p50_ms']:.2f} ms p99 {r['c1']['p99_ms']:.2f} ms; " if "c1" in r else "")
        s = r["c64"]
        acc = f"top-1 {100 * s['accuracy']:.1f}% of {s['checked']}; " if s["accuracy"] is not None and b != "noop" else ""
        print(f"  [{label}] {b:<13} {c1_txt}c=64 {s['throughput_rps']:.0f} req/s p50 {s['p50_ms']:.1f} ms "
              f"p99 {s['p99_ms']:.1f} ms errors {s['errors']} mean batch {s['mean_batch_size'] or 1:.1f}; "
              f"{acc}client CPU {s['client_cpu']:.2f}", flush=True)
    return out


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-airbench:latest")
    ap.add_argument("--backends", default="onnx,onnx_int8", help="real backends (noop is always added)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load at concurrency 64")
    ap.add_argument("--c1-requests", type=int, default=500)
    ap.add_argument("--reps", type=int, default=300, help="in-process batch-1 repetitions")
    ap.add_argument("--open-seconds", type=float, default=60.0, help="seconds of each open-loop run")
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument("--skip-unbatched", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    backends = backends_or_exit(args.backends) or ["onnx"]
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        tag, path, card = stored_model(args.model)
    except Exception as e:
        print(f"error: no stored model {args.model!r} ({e}); run `python training/run_all.py` first", file=sys.stderr)
        return 2
    missing = [b for b in backends if get_backend(b).file not in card.files]
    if missing:
        print(f"error: model {tag} has no file for {missing}; it has {sorted(card.files)}", file=sys.stderr)
        return 2
    spec = card.preprocessing
    samples = cifar_test_samples(1000)
    threads = cores()
    print(f"model {tag} (TTA level {card.tta_level}, {card.parameters:,} parameters); "
          f"{os.cpu_count()} cores; 1 worker x {threads} threads")
    report = {"model": tag, "threads": threads, "cores": os.cpu_count(), "in_process": {}}

    print("\n1. in process (preprocess + backend, no HTTP), all cores:")
    for b in backends:
        be = load_backend(b, path, card, cores())
        r = in_process(be, spec, samples, args.reps)
        report["in_process"][b] = r
        print(f"  {b:<13} batch 1: {r['batch1_ms']:.2f} ms (p99 {r['batch1_p99_ms']:.2f}); batch 64: "
              f"{r['batch64_images_per_s']:.0f} images/s; preprocessing alone {r['preprocess_ms']:.3f} ms/image",
              flush=True)
        del be

    report["handoff_us"] = handoff_us()
    print(f"  a thread hand-off and back (anyio.to_thread, no work): {report['handoff_us']:.0f} us; decoding "
          f"a CIFAR-10 JPEG on the event loop instead costs its preprocessing time above")

    env = dict(os.environ, PYTHONPATH=str(REPO), LAB_PLUGINS="bench.noop_backend",
               LAB_BACKENDS=",".join([*backends, "noop"]))
    logs = args.out / "serve_latency_logs"
    logs.mkdir(exist_ok=True)
    print("\n2. HTTP floor: bare Starlette no-op endpoint under uvicorn:")
    with Server(env, logs / "floor.log", cmd=[str(Path(sys.executable).parent / "uvicorn"), "bench.floor_app:app",
                                                "--host", "127.0.0.1", "--port", "{port}", "--log-level",
                                                "warning"]) as floor:
        report["floor"] = http_runs(floor.url, samples, ["floor"], args.c1_requests, args.duration, "floor")["floor"]

    common = {"LAB_WORKERS": "1", "LAB_THREADS": str(threads), "LAB_DEFAULT_MODEL": tag.split(":")[0]}
    print("\n3. bentoml serve, batching on (max batch 64), 1 worker:")
    with Server(env, logs / "batched.log", dict(common, LAB_MAX_BATCH_SIZE="64")) as srv:
        report["rss_idle_mb"] = srv.rss_bytes() / 2**20
        report["batched"] = http_runs(srv.url, samples, ["noop", *backends], args.c1_requests, args.duration,
                                      "batched", srv)
        print(f"\n4. open loop: Poisson arrivals at 80% of each backend's c=64 throughput, {args.open_seconds:g} s:")
        report["open"] = {}
        for b in backends:
            rate = 0.8 * report["batched"][b]["c64"]["throughput_rps"]
            r = run(poisson(f"{srv.url}/classify?backend={b}", samples, rate, args.open_seconds,
                            bound_s=0.1)).summary()
            ip = report["in_process"][b]
            ideal = simulate(rate, *batch_cost(ip["batch1_ms"], ip["batch64_images_per_s"]))
            report["open"][b] = dict(r, rate=rate, ideal=ideal)
            print(f"  {b:<13} {rate:.0f} req/s offered: {r['throughput_rps']:.0f} answered, p50 {r['p50_ms']:.1f} ms "
                  f"p99 {r['p99_ms']:.1f} ms p99.9 {r['p999_ms']:.1f} ms, errors {r['errors']}, goodput (<= 100 ms) "
                  f"{r['goodput_rps']:.0f} req/s; client CPU {r['client_cpu']:.2f}", flush=True)
            print(f"  {'':<13} a perfect batching server with the in-process costs, same load (bench/ideal_queue.py): "
                  f"p50 {ideal['p50_ms']:.1f} ms p99 {ideal['p99_ms']:.1f} ms = {ideal['ratio']:.2f} x p50", flush=True)
        b = backends[0]
        print(f"\n5. overload: 256 connections from one address, {args.overload_seconds:g} s, {b}:")
        r = run(closed_loop(f"{srv.url}/classify?backend={b}", samples, 256, duration=args.overload_seconds)).summary()
        report["overload"] = r
        print(f"  {r['requests']} requests: {r['statuses']}; 200s {r['throughput_rps']:.0f}/s; 503s with Retry-After "
              f"{r['retry_after_seen']}, refused within p99 {r['refusal_p99_ms'] or 0:.1f} ms; answered p99 "
              f"{r['p99_ms']:.0f} ms; client CPU {r['client_cpu']:.2f}", flush=True)
    if not args.skip_unbatched:
        print("\n6. bentoml serve, batching off (LAB_MAX_BATCH_SIZE=1):")
        with Server(env, logs / "unbatched.log", dict(common, LAB_MAX_BATCH_SIZE="1")) as srv:
            report["unbatched"] = http_runs(srv.url, samples, backends, args.c1_requests, args.duration,
                                            "unbatched", srv, only_c64=True)

    print("\n== the service's targets ==")
    floor = report["floor"]["c1"]["p50_ms"]
    noop = report["batched"]["noop"]
    print(f"HTTP floor: p50 {floor:.2f} ms at c=1, {report['floor']['c64']['throughput_rps']:.0f} req/s at c=64")
    print(f"service RSS: {report['rss_idle_mb']:.0f} MiB idle, "
          + ", ".join(f"{report['batched'][b]['rss_after_mb']:.0f} MiB after {b} load" for b in backends))
    n = noop["c64"]["throughput_rps"]
    print(f"noop: c=64 {n:.0f} req/s (the service's own cost {1000 / n:.3f} ms a request) -> {verdict(n >= 3000)} "
          f"(>= 3,000); c=1 p50 {noop['c1']['p50_ms']:.2f} ms = floor + {noop['c1']['p50_ms'] - floor:.2f} ms")
    for b in backends:
        ip, bt, op = report["in_process"][b], report["batched"][b], report["open"][b]
        p50 = bt["c1"]["p50_ms"]
        over = p50 - floor - ip["batch1_ms"]
        frac = bt["c64"]["throughput_rps"] / ip["batch64_images_per_s"]
        need = 0.90 if b == "onnx" else 0.85
        print(f"{b}: c=1 p50 {p50:.2f} ms = floor {floor:.2f} + in-process {ip['batch1_ms']:.2f} + {over:.2f} ms -> "
              f"{verdict(over <= 0.5)} (<= +0.5 ms)")
        print(f"{' ' * len(b)}  c=64 {bt['c64']['throughput_rps']:.0f} req/s = {100 * frac:.0f}% of in-process batch 64 "
              f"({ip['batch64_images_per_s']:.0f} images/s) -> {verdict(frac >= need)} (>= {100 * need:.0f}%), "
              f"errors {bt['c64']['errors']}, top-1 {100 * (bt['c64']['accuracy'] or 0):.1f}%")
        print(f"{' ' * len(b)}  open loop at {op['rate']:.0f} req/s: p99 {op['p99_ms']:.1f} ms = "
              f"{op['p99_ms'] / op['p50_ms']:.2f} x p50 {op['p50_ms']:.1f} ms, errors {op['errors']} -> "
              f"{verdict(op['p99_ms'] <= 3 * op['p50_ms'] and op['errors'] == 0)} (<= 3x, 0 errors); a perfect "
              f"server at this load: {op['ideal']['ratio']:.2f} x, p99 {op['ideal']['p99_ms']:.1f} ms (the service's "
              f"p99 is {op['p99_ms'] / op['ideal']['p99_ms']:.2f} x that)")
        if report.get("unbatched"):
            ub = report["unbatched"][b]["c64"]
            print(f"{' ' * len(b)}  c=64 unbatched {ub['throughput_rps']:.0f} req/s: batching gives "
                  f"{bt['c64']['throughput_rps'] / max(ub['throughput_rps'], 1e-9):.2f}x")
    o, cap = report["overload"], report["batched"][backends[0]]["c64"]["throughput_rps"]
    fast = o["refusal_p99_ms"] is None or o["refusal_p99_ms"] <= 100
    others = {k: v for k, v in o["statuses"].items() if k not in ("200", "503")}
    print(f"overload ({backends[0]}, 256 connections): goodput {o['throughput_rps']:.0f} req/s = "
          f"{100 * o['throughput_rps'] / cap:.0f}% of c=64 capacity {cap:.0f}; 503s {o['statuses'].get('503', 0)} "
          f"(Retry-After on {o['retry_after_seen']}), refused in p99 {o['refusal_p99_ms'] or 0:.1f} ms; other "
          f"statuses {others or 'none'} -> {verdict(o['throughput_rps'] >= 0.9 * cap and fast and not others)} "
          f"(>= 90%, fast 503s)")
    out = args.out / "serve_latency.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
