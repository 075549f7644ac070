#!/usr/bin/env python
"""Serving latency and throughput, per backend, against what the model and HTTP cost alone, in one run.

    python bench/serve_latency.py                                   # onnx and onnx_int8, the default model
    python bench/serve_latency.py --backends onnx,onnx_int8,openvino_bf16 --duration 20

For the stored model (default cifar10-airbench:latest), with this project's raw-socket client
(bench/loadgen.py; every answer checked against the image's label; the client's CPU reported):
  1. in process (no HTTP): preprocess + backend call at batch 1 (latency) and batch 64 (images/s)
  2. the HTTP floor: a bare Starlette no-op endpoint under uvicorn, at c=1 and c=64
  3. `bentoml serve` (1 worker) with the real backends and `noop` (bench/noop_backend.py: no model,
     so it measures the service's own cost): p50/p99 at c=1, throughput at c=64; each real backend's
     in-process figures measured again just before and just after its runs (this machine's speed
     drifts by more than the targets' margins): batch 1 interleaved with the c=1 run in ten blocks,
     batch 64 just before and just after the c=64 run; the targets are judged against these
  4. open loop: Poisson arrivals at 80 % (or each of --open-loads) of each real backend's c=64
     throughput for --open-seconds, latency from each request's due time (no coordinated omission),
     beside a perfect batching server with the same arrivals (bench/ideal_queue.py): simulated with the
     in-process costs, and replayed in this process with the real model (no HTTP); a plot of p99 / p50
     against load
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
from bench.ideal_queue import batch_cost, due_times, replay, simulate
from bench.loadgen import Result, closed_loop, poisson, run
from bench.samples import cifar_test_samples
from bench.server import Server
from lab.backends import get_backend, load_backend
from lab.card import Card, read_card
from lab.hardware import cores
from lab.paths import REPO
from lab.preprocess import Preprocessing, decode_uint8, normalize, preprocess_bytes
from lab.store import get_model

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def stored_model(tag: str) -> tuple[str, Path, Card]:
    m = get_model(tag)
    return m.tag, m.path, read_card(m.path)


def batch_input(bodies: list[bytes], spec: Preprocessing) -> np.ndarray:
    """Image files -> one normalised batch, as the service decodes and stacks them."""
    return normalize(np.stack([decode_uint8(d, spec) for d in bodies]), spec)


def batch64_rate(backend, spec: Preprocessing, data: list[bytes], rounds: int = 5) -> float:
    """Images/s at batch 64 (decoding included), the median of `rounds` after one warm-up call."""
    backend.predict(batch_input(data[:64], spec))
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        backend.predict(batch_input(data[:64], spec))
        rates.append(64 / (time.perf_counter() - t0))
    return statistics.median(rates)


def in_process(backend, spec: Preprocessing, samples, reps: int) -> dict:
    """Batch 1: median latency of preprocess + predict. Batch 64: images/s. Decoding alone, back to back
    and right after a model call (as at c=1 in the service, with the caches cold)."""
    data = [s.body for s in samples]
    for d in data[:10]:
        backend.predict(preprocess_bytes(d, spec)[None])
    lat = []
    for i in range(reps):
        t0 = time.perf_counter()
        backend.predict(preprocess_bytes(data[i % len(data)], spec)[None])
        lat.append(time.perf_counter() - t0)
    pre, cold = [], []
    for d in data[:200]:
        t0 = time.perf_counter()
        preprocess_bytes(d, spec)
        pre.append(time.perf_counter() - t0)
    one = preprocess_bytes(data[0], spec)[None]
    for d in data[:100]:
        backend.predict(one)
        t0 = time.perf_counter()
        preprocess_bytes(d, spec)
        cold.append(time.perf_counter() - t0)
    return {"batch1_ms": 1000 * statistics.median(lat), "batch1_p99_ms": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))],
            "batch64_images_per_s": batch64_rate(backend, spec, data), "preprocess_ms": 1000 * statistics.median(pre),
            "preprocess_after_model_ms": 1000 * statistics.median(cold)}


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


def c1_beside(url: str, samples, requests: int, model, spec: Preprocessing, rounds: int = 10) -> tuple[dict, float]:
    """c=1 over HTTP in `rounds` blocks, each right after as many in-process calls of the same model at
    batch 1 (the service idle meanwhile), so both see the machine at the same speed: (the HTTP run's
    summary, the in-process median in ms)."""
    data, n = [s.body for s in samples], max(1, requests // rounds)
    merged, inproc = Result(), []
    for r in range(rounds):
        for i in range(n):
            t0 = time.perf_counter()
            model.predict(preprocess_bytes(data[(r * n + i) % len(data)], spec)[None])
            inproc.append(time.perf_counter() - t0)
        merged.extend(run(closed_loop(url, samples, 1, requests=n, warmup=20 if r == 0 else 0)))
    return merged.summary(), 1000 * statistics.median(inproc)


def http_runs(url: str, samples, backends: list[str], c1_requests: int, duration: float, label: str,
              server: Server | None = None, only_c64: bool = False, model=None, spec=None) -> dict:
    """c=1 and c=64 against each backend; with `model` (that backend, loaded in this process) the c=1
    run is interleaved with in-process calls (c1_beside) and their median is returned as `c1_inproc_ms`."""
    out = {}
    for b in backends:
        target = f"{url}/classify?backend={b}" if b != "floor" else f"{url}/noop"
        r = {}
        if not only_c64 and model is not None:
            r["c1"], r["c1_inproc_ms"] = c1_beside(target, samples, c1_requests, model, spec)
        elif not only_c64:
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


CURVE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # loads of the perfect server's curve


def plot_open_loop(report: dict, path: Path) -> None:
    """p99 / p50 of the time to answer against the load: the service's measured points over the
    perfect batching server's curve, one panel per backend, the 3x target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["open"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, b in zip(axes[0], names):
        curve = report["open_curve"][b]
        ax.plot([100 * float(f) for f in curve], [c["ratio"] for c in curve.values()], "-", color="gray",
                label="a perfect batching server, simulated (bench/ideal_queue.py)")
        pts = report["open"][b].values()
        ax.plot([100 * p["load"] for p in pts], [p["replay"]["ratio"] for p in pts], "s", color="gray",
                label="the real model in process, same arrivals")
        ax.plot([100 * p["load"] for p in pts], [p["p99_ms"] / p["p50_ms"] for p in pts], "o", color="C0",
                label="the service, measured")
        ax.axhline(3, color="C3", ls="--", lw=1, label="target: p99 <= 3x p50")
        ax.set(title=f"{b}: Poisson arrivals", xlabel="offered load, % of the c=64 throughput",
               ylabel="p99 / p50 of the time to answer", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.suptitle(report["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  plot: {path}")


def where_c1_goes(c1: dict, floor_ms: float) -> str:
    """The c=1 median split by the times each answer reports (medians): decoding, waiting to run (in
    the queue, or none when it ran on the event loop), the batch's normalise + model + softmax; the rest
    is HTTP beyond the floor, the answer's way back to the event loop, and rendering."""
    st = c1.get("stages_p50_ms") or {}
    if not all(k in st for k in ("preprocess_ms", "queue_ms", "inference_ms")):
        return "(the answers carry no stage times)"
    rest = c1["p50_ms"] - floor_ms - st["preprocess_ms"] - st["queue_ms"] - st["inference_ms"]
    return (f"where it goes (medians the answers report): decode {st['preprocess_ms']:.3f} + waiting to run "
            f"{st['queue_ms']:.3f} + normalise/model/softmax {st['inference_ms']:.3f} ms; the rest "
            f"{rest:.3f} ms (HTTP beyond the floor, the way back, rendering)")


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
    ap.add_argument("--open-loads", default="0.8", help="comma-separated loads of the open loop, as fractions "
                                                        "of the c=64 throughput (the target is judged at 0.8)")
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument("--skip-unbatched", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    backends = backends_or_exit(args.backends) or ["onnx"]
    try:
        loads = sorted({float(f) for f in args.open_loads.split(",") if f.strip()})
    except ValueError:
        ap.error(f"--open-loads: fractions like 0.5,0.8, not {args.open_loads!r}")
    if not loads or not all(0 < f < 1.5 for f in loads):
        ap.error(f"--open-loads: fractions of the c=64 throughput between 0 and 1.5, not {args.open_loads!r}")
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
    models = {}
    for b in backends:
        be = load_backend(b, path, card, cores())
        r = in_process(be, spec, samples, args.reps)
        report["in_process"][b] = r
        print(f"  {b:<13} batch 1: {r['batch1_ms']:.2f} ms (p99 {r['batch1_p99_ms']:.2f}); batch 64: "
              f"{r['batch64_images_per_s']:.0f} images/s; preprocessing alone {r['preprocess_ms']:.3f} ms/image "
              f"back to back, {r['preprocess_after_model_ms']:.3f} ms right after a model call (caches cold)",
              flush=True)
        models[b] = be  # kept for the measurements beside the service's (3, 4)

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
        report["batched"] = http_runs(srv.url, samples, ["noop"], args.c1_requests, args.duration, "batched", srv)
        report["around"] = {}
        data = [s.body for s in samples]
        for b in backends:  # in process beside the service's runs: the machine's speed drifts
            before = batch64_rate(models[b], spec, data)
            report["batched"].update(http_runs(srv.url, samples, [b], args.c1_requests, args.duration, "batched",
                                               srv, model=models[b], spec=spec))
            after = batch64_rate(models[b], spec, data)
            ar = report["around"][b] = {"batch1_ms": report["batched"][b]["c1_inproc_ms"],
                                        "batch64_images_per_s": (before + after) / 2,
                                        "batch64_before": before, "batch64_after": after}
            print(f"  {'':<23} in process: batch 1 {ar['batch1_ms']:.2f} ms interleaved with the c=1 run; batch 64 "
                  f"{before:.0f} / {after:.0f} images/s just before / after", flush=True)
        print(f"\n4. open loop: Poisson arrivals at {', '.join(f'{100 * f:.0f}%' for f in loads)} of each "
              f"backend's c=64 throughput, {args.open_seconds:g} s each:")
        report["open"], report["open_curve"] = {}, {}
        for b in backends:
            cap = report["batched"][b]["c64"]["throughput_rps"]
            ip = report["around"][b]
            cost = batch_cost(ip["batch1_ms"], ip["batch64_images_per_s"])
            report["open_curve"][b] = {f"{f:.2f}": simulate(f * cap, *cost, requests=50_000) for f in CURVE}
            be = models[b]  # the real model, in this process, for the replay

            def run_batch(idx: range) -> None:
                be.predict(batch_input([data[k % len(data)] for k in idx], spec))

            for f in loads:
                rate = f * cap
                same = replay(run_batch, due_times(rate, args.open_seconds))  # the service sits idle meanwhile
                r = run(poisson(f"{srv.url}/classify?backend={b}", samples, rate, args.open_seconds,
                                bound_s=0.1)).summary()
                ideal = simulate(rate, *cost)
                report["open"].setdefault(b, {})[f"{f:.2f}"] = dict(r, rate=rate, load=f, ideal=ideal, replay=same)
                print(f"  {b:<13} {100 * f:.0f}%: {rate:.0f} req/s offered: {r['throughput_rps']:.0f} answered, "
                      f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms p99.9 {r['p999_ms']:.1f} ms, errors "
                      f"{r['errors']}, goodput (<= 100 ms) {r['goodput_rps']:.0f} req/s; client CPU "
                      f"{r['client_cpu']:.2f}", flush=True)
                print(f"  {'':<13} a perfect batching server, same load (bench/ideal_queue.py): simulated with the "
                      f"in-process costs p50 {ideal['p50_ms']:.1f} ms p99 {ideal['p99_ms']:.1f} ms = "
                      f"{ideal['ratio']:.2f} x p50; the real model in this process, the same arrivals: p50 "
                      f"{same['p50_ms']:.1f} ms p99 {same['p99_ms']:.1f} ms = {same['ratio']:.2f} x p50 (mean batch "
                      f"{same['mean_batch']:.1f})", flush=True)
            curve = report["open_curve"][b]
            print(f"  {'':<13} the perfect server's p99 / p50 at "
                  + ", ".join(f"{100 * float(f):.0f}%: {c['ratio']:.1f}x" for f, c in curve.items()), flush=True)
        plot_open_loop(report, args.out / "serve_latency_open_loop.png")
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
    print(f"      {where_c1_goes(noop['c1'], floor)}")
    for b in backends:
        ip, bt = report["around"][b], report["batched"][b]
        op = report["open"][b][f"{min(loads, key=lambda f: abs(f - 0.8)):.2f}"]  # the load nearest the target's
        p50, ip1 = bt["c1"]["p50_ms"], bt["c1_inproc_ms"]
        over = p50 - floor - ip1
        frac = bt["c64"]["throughput_rps"] / ip["batch64_images_per_s"]
        need = 0.90 if b == "onnx" else 0.85
        print(f"{b}: c=1 p50 {p50:.2f} ms = floor {floor:.2f} + in-process {ip1:.2f} + {over:.2f} ms -> "
              f"{verdict(over <= 0.5)} (<= +0.5 ms)")
        print(f"{' ' * len(b)}  {where_c1_goes(bt['c1'], floor)}")
        print(f"{' ' * len(b)}  c=64 {bt['c64']['throughput_rps']:.0f} req/s = {100 * frac:.0f}% of in-process batch 64 "
              f"({ip['batch64_images_per_s']:.0f} images/s) -> {verdict(frac >= need)} (>= {100 * need:.0f}%), "
              f"errors {bt['c64']['errors']}, top-1 {100 * (bt['c64']['accuracy'] or 0):.1f}%")
        ideal, same = op["ideal"], op["replay"]
        print(f"{' ' * len(b)}  open loop at {100 * op['load']:.0f}% = {op['rate']:.0f} req/s: p99 {op['p99_ms']:.1f} "
              f"ms = {op['p99_ms'] / op['p50_ms']:.2f} x p50 {op['p50_ms']:.1f} ms, errors {op['errors']} -> "
              f"{verdict(op['p99_ms'] <= 3 * op['p50_ms'] and op['errors'] == 0)} (<= 3x, 0 errors); a perfect "
              f"server at this load: {ideal['ratio']:.2f} x its p50 simulated, {same['ratio']:.2f} x with the real "
              f"model (p99 {same['p99_ms']:.1f} ms); the service's p99 = {op['p99_ms'] / same['p99_ms']:.2f} x the "
              f"real model's -> {verdict(op['p99_ms'] <= 1.5 * same['p99_ms'] and op['errors'] == 0)} "
              f"(<= 1.5x, 0 errors)")
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
