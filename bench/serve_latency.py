#!/usr/bin/env python
"""Serving latency and throughput, per backend, measured side by side in one run.

    python bench/serve_latency.py                         # onnx and torch, the default model
    python bench/serve_latency.py --backends onnx,onnx_int8,torch,torch_bf16 --duration 20

It measures, for the stored model (default cifar10-airbench:latest):
  1. in process (no HTTP): preprocess + backend call at batch 1 (latency) and batch 64 (images/s)
  2. the HTTP floor: the same client against a no-op endpoint of a bare Starlette app under uvicorn
  3. `bentoml serve` with adaptive batching: latency p50/p99 at concurrency 1; throughput, p50/p99
     and errors at concurrency 64; the service's memory (RSS) idle and after the load
  4. the same at concurrency 64 with batching off (LAB_MAX_BATCH_SIZE=1)
  5. overload: 64 clients against a worker that admits 16 at a time: 503s with Retry-After, no hangs
and prints each figure and the ratios the serving targets are stated in.
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

from bench.loadgen import closed_loop, run
from bench.samples import cifar_test_samples
from bench.server import Server
from lab.backends import get_backend, list_backends, load_backend
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


def http_runs(url: str, samples, backends: list[str], c1_requests: int, duration: float, label: str,
              server: Server | None = None, only_c64: bool = False) -> dict:
    out = {}
    for b in backends:
        target = f"{url}/classify?backend={b}" if b != "noop" else f"{url}/noop"
        r = {}
        if not only_c64:
            c1 = run(closed_loop(target, samples, 1, requests=c1_requests, warmup=20))
            r["c1"] = c1.summary()
        c64 = run(closed_loop(target, samples, 64, duration=duration, warmup=64))
        r["c64"] = c64.summary()
        if server is not None:
            r["rss_after_mb"] = server.rss_bytes() / 2**20
        out[b] = r
        c1_txt = (f"c=1 p50 {r['c1']['p50_ms']:.2f} ms p99 {r['c1']['p99_ms']:.2f} ms; " if "c1" in r else "")
        s = r["c64"]
        print(f"  [{label}] {b:<10} {c1_txt}c=64 {s['throughput_rps']:.0f} req/s p50 {s['p50_ms']:.0f} ms "
              f"p99 {s['p99_ms']:.0f} ms errors {s['errors']} "
              f"mean batch {s['mean_batch_size'] or 1:.1f}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-airbench:latest")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load at concurrency 64")
    ap.add_argument("--c1-requests", type=int, default=300)
    ap.add_argument("--reps", type=int, default=300, help="in-process batch-1 repetitions")
    ap.add_argument("--skip-unbatched", action="store_true")
    ap.add_argument("--overload-inflight", type=int, default=16,
                    help="LAB_MAX_INFLIGHT of the overload run (fewer than the 64 clients)")
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        tag, path, card = stored_model(args.model)
    except Exception as e:
        print(f"error: no stored model {args.model!r} ({e}); run `python training/run_all.py` first", file=sys.stderr)
        return 2
    unknown = [b for b in backends if b not in list_backends()]
    if unknown:
        print(f"error: unknown backend(s) {unknown}; valid: {', '.join(list_backends())}", file=sys.stderr)
        return 2
    missing = [b for b in backends if get_backend(b).file not in card.files]
    if missing:
        print(f"error: model {tag} has no file for {missing}; it has {sorted(card.files)}", file=sys.stderr)
        return 2
    spec = card.preprocessing
    samples = cifar_test_samples(1000)
    threads = max(1, cores() // args.workers)
    print(f"model {tag} (TTA level {card.tta_level}, {card.parameters:,} parameters); "
          f"{os.cpu_count()} cores; {args.workers} worker(s) x {threads} threads")
    report = {"model": tag, "workers": args.workers, "threads": threads, "cores": os.cpu_count(),
              "in_process": {}, "floor": {}, "batched": {}, "unbatched": {}}

    print("\n1. in process (preprocess + backend, no HTTP), all cores:")
    for b in backends:
        be = load_backend(b, path, card, cores())
        r = in_process(be, spec, samples, args.reps)
        report["in_process"][b] = r
        print(f"  {b:<10} batch 1: {r['batch1_ms']:.2f} ms (p99 {r['batch1_p99_ms']:.2f}); batch 64: "
              f"{r['batch64_images_per_s']:.0f} images/s; preprocessing alone {r['preprocess_ms']:.3f} ms/image",
              flush=True)
        del be

    env = dict(os.environ, PYTHONPATH=str(REPO), LAB_BACKENDS=",".join(backends))
    logs = args.out / "serve_latency_logs"
    logs.mkdir(exist_ok=True)
    print("\n2. HTTP floor: bare Starlette no-op endpoint under uvicorn:")
    with Server(env, logs / "floor.log", cmd=[str(Path(sys.executable).parent / "uvicorn"), "bench.floor_app:app",
                                                "--host", "127.0.0.1", "--port", "{port}", "--log-level",
                                                "warning"]) as floor:
        report["floor"] = http_runs(floor.url, samples, ["noop"], args.c1_requests, args.duration, "floor")["noop"]

    common = {"LAB_WORKERS": str(args.workers), "LAB_THREADS": str(threads),
              "LAB_DEFAULT_MODEL": tag.split(":")[0]}
    print(f"\n3. bentoml serve, adaptive batching on (max batch 64), {args.workers} worker(s):")
    with Server(env, logs / "batched.log", dict(common, LAB_MAX_BATCH_SIZE="64")) as srv:
        report["rss_idle_mb"] = srv.rss_bytes() / 2**20
        report["batched"] = http_runs(srv.url, samples, backends, args.c1_requests, args.duration, "batched", srv)
    if not args.skip_unbatched:
        print("\n4. bentoml serve, adaptive batching off (LAB_MAX_BATCH_SIZE=1):")
        with Server(env, logs / "unbatched.log", dict(common, LAB_MAX_BATCH_SIZE="1")) as srv:
            report["unbatched"] = http_runs(srv.url, samples, backends, args.c1_requests, args.duration,
                                            "unbatched", srv, only_c64=True)

    print(f"\n5. overload: LAB_MAX_INFLIGHT={args.overload_inflight}, concurrency 64, {backends[0]}:")
    with Server(env, logs / "overload.log", dict(common, LAB_MAX_INFLIGHT=str(args.overload_inflight))) as srv:
        r = run(closed_loop(f"{srv.url}/classify?backend={backends[0]}", samples, 64, duration=args.duration / 2))
        report["overload"] = r.summary()
        o = report["overload"]
        print(f"  {o['requests']} requests: {o['statuses']}; 503s with Retry-After: {o['retry_after_seen']}; "
              f"answered p99 {o['p99_ms']:.0f} ms", flush=True)

    print("\n== summary ==")
    floor = report["floor"]["c1"]["p50_ms"]
    print(f"HTTP floor: p50 {floor:.2f} ms at c=1, {report['floor']['c64']['throughput_rps']:.0f} req/s at c=64")
    print(f"service RSS: {report['rss_idle_mb']:.0f} MiB idle, "
          + ", ".join(f"{report['batched'][b]['rss_after_mb']:.0f} MiB after {b} load" for b in backends))
    for b in backends:
        ip, bt = report["in_process"][b], report["batched"][b]
        p50 = bt["c1"]["p50_ms"]
        budget, stretch = floor + 2 * ip["batch1_ms"], floor + 1.5 * ip["batch1_ms"]
        frac = bt["c64"]["throughput_rps"] / ip["batch64_images_per_s"]
        print(f"{b}: HTTP p50 at c=1 {p50:.2f} ms vs floor + 2 x in-process = {floor:.2f} + 2 x {ip['batch1_ms']:.2f}"
              f" = {budget:.2f} ms -> {'MET' if p50 <= budget else 'NOT MET'}"
              f" (stretch 1.5x = {stretch:.2f} ms: {'met' if p50 <= stretch else 'not met'});"
              f" overhead over in-process {p50 - ip['batch1_ms']:.2f} ms")
        print(f"{' ' * len(b)}  c=64 batched {bt['c64']['throughput_rps']:.0f} req/s = {100 * frac:.0f}% of in-process"
              f" batch-64 {ip['batch64_images_per_s']:.0f} images/s -> {'MET' if frac >= 0.6 else 'NOT MET'} (>= 60%;"
              f" stretch 75%: {'met' if frac >= 0.75 else 'not met'}), errors {bt['c64']['errors']}")
        if report["unbatched"]:
            ub = report["unbatched"][b]["c64"]
            print(f"{' ' * len(b)}  c=64 unbatched {ub['throughput_rps']:.0f} req/s, p99 {ub['p99_ms']:.0f} ms, "
                  f"errors {ub['errors']}: batching gives {bt['c64']['throughput_rps'] / max(ub['throughput_rps'], 1e-9):.2f}x")
    out = args.out / "serve_latency.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
