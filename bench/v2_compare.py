#!/usr/bin/env python
"""Any Open Inference Protocol (KServe v2) server measured with this project's client; and this service
side by side with KServe and MLServer serving the same ONNX files, in one run.

    python bench/v2_compare.py --url http://127.0.0.1:8000 --model resnet --input image [--labels classes.txt]
    python bench/v2_compare.py                      # the side by side, on the stored cifar10-airbench:latest
    python bench/v2_compare.py --model cifar10-airbench-smoke --duration 2 --c1-requests 50 --open-seconds 3

One server (--url): /v2/models/<model>/infer with this project's raw-socket client (bench/loadgen.py,
bench/v2client.py): c=1 p50 / p99, c=64 req/s, then an open loop (Poisson arrivals at --open-load of the
c=64 throughput measured, latency from each request's due time) and the top-1 of every answer against the
image's label (accuracy under load, which perf_analyzer, Locust and the peers' own tools do not report).
`--input image` sends the image files (BYTES), `pixels` the images decoded by lab/preprocess.py at the
model's size (UINT8; needs the model's card: --card). Binary tensors unless --encoding json; labels from
--labels, else the model's metadata (`parameters.labels`, as this service gives), else each answer's
classification extension (the top 1 as "score:index:label").

The side by side (no --url): the stored model (--model, a store tag) served three ways, all up at once,
one worker each, ONNX Runtime with the same intra-op threads (--threads, default this process's cores):
  service   `bentoml serve` with the backends onnx, onnx_int8 and noop (bench/noop_backend.py: decodes the
            image and returns zeros), chosen per request (the request's `backend` parameter and X-Lab-Backend)
  kserve    KServe's Python model server (bench/peers/kserve_model.py): model.sim.onnx, model.int8.onnx and
            a zero model, as three models of one server
  mlserver  Seldon's MLServer with its adaptive batching on (max_batch_size 64, max_batch_time
            --mlserver-batch-time s; bench/peers/mlserver_model.py), the same three models
Each peer runs in an environment of its own, installed from its own lock (bench/peers/envs.py) the first
time, never in the service's. The peers decode the images with lab/preprocess.py and the model's card, as
the service does. Each (server, model) is first proven: a few images whose top-1 must equal ONNX Runtime's
in this process on the same file. Then, the same images and the same client for all: c=1 and c=64 in
--rounds rounds, the servers in turn within each round and their order rotated from round to round (so a
drift of the machine falls on all), then the open loop of each at --open-load of its own c=64
throughput, beside a perfect batching server replayed with the real model in this process at the same
rate (bench/ideal_queue.py; for the service's rows, and every row with --replay-all). Each server is
sent binary tensors when it takes them and JSON tensors otherwise (KServe's REST refuses a binary BYTES
element that is not UTF-8, 500; MLServer's REST has no binary extension); the service is measured both
ways (binary: its bars; json: like for like). Then Triton's perf_analyzer against the service, when its
binary runs here (else one line says why). A table (and the bars, MET / NOT MET) is printed and written to
<out>/v2_compare.json and .md. The figures mean something only on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.ideal_queue import batch_cost, due_times, replay, simulate
from bench.loadgen import Result, Sample, closed_loop, poisson, run
from bench.samples import cifar_test_samples
from bench.server import REPO, Server, free_port
from bench.v2client import V2, model_metadata, read_answer, top1

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

MODELS = ("zero", "onnx", "onnx_int8")                 # the rows: no model, fp32, INT8
FILES = {"zero": "zero", "onnx": "model.sim.onnx", "onnx_int8": "model.int8.onnx"}
SERVICE_BACKEND = {"zero": "noop", "onnx": "onnx", "onnx_int8": "onnx_int8"}
PEERS = ("kserve", "mlserver")


# ---------------------------------------------------------------- measuring one server


def measure(url: str, samples: list[Sample], proto: V2, *, c1_requests: int, duration: float,
            open_load: float, open_seconds: float) -> dict:
    """c=1, c=64, then the open loop at open_load x the c=64 throughput, against one v2 infer URL."""
    c1 = run(closed_loop(url, samples, 1, requests=c1_requests, warmup=10, protocol=proto))
    c64 = run(closed_loop(url, samples, 64, duration=duration, warmup=64, protocol=proto))
    return summarize(c1, c64, *open_loop(url, samples, proto, c64, open_load, open_seconds))


def open_loop(url: str, samples, proto: V2, c64: Result, load: float, seconds: float) -> tuple[Result | None, float]:
    rate = load * c64.ok / c64.seconds if c64.seconds else 0.0
    if rate <= 0 or seconds <= 0:
        return None, rate
    return run(poisson(url, samples, rate, seconds, bound_s=0.1, protocol=proto)), rate


def summarize(c1: Result, c64: Result, op: Result | None, rate: float) -> dict:
    """The row's figures; accuracy and errors over every answer of the row."""
    runs = [r for r in (c1, c64, op) if r is not None]
    checked, correct = sum(r.checked for r in runs), sum(r.correct for r in runs)
    s1, s64 = c1.summary(), c64.summary()
    row = {"c1_p50_ms": s1["p50_ms"], "c1_p99_ms": s1["p99_ms"], "c64_rps": s64["throughput_rps"],
           "c64_p50_ms": s64["p50_ms"], "c64_p99_ms": s64["p99_ms"], "c64_client_cpu": s64["client_cpu"],
           "requests": sum(r.ok + r.errors for r in runs), "errors": sum(r.errors for r in runs),
           "unreadable": sum(r.unreadable for r in runs),
           "statuses": {str(k): sum(r.statuses.get(k, 0) for r in runs)
                        for k in sorted({k for r in runs for k in r.statuses})},
           "checked": checked, "accuracy": correct / checked if checked else None,
           "open_rate": rate, "c1": s1, "c64": s64}
    if op is not None:
        so = op.summary()
        row.update(open_p50_ms=so["p50_ms"], open_p99_ms=so["p99_ms"], open_answered_rps=so["throughput_rps"],
                   open_errors=so["errors"], open=so)
    return row


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def print_row(server: str, model: str, enc: str, r: dict) -> None:
    acc = f"{100 * r['accuracy']:.1f}% of {r['checked']}" if r.get("accuracy") is not None else "-"
    op = (f"open loop {r['open_rate']:.0f}/s: p50 {fmt(r.get('open_p50_ms'), '.1f')} p99 "
          f"{fmt(r.get('open_p99_ms'), '.1f')} ms" if "open_p99_ms" in r else "open loop -")
    rp = f" (perfect server replayed: p99 {r['replay']['p99_ms']:.1f} ms)" if r.get("replay") else ""
    print(f"  {server:<9} {model:<10} {enc:<6} c=1 p50 {r['c1_p50_ms']:.2f} p99 {r['c1_p99_ms']:.2f} ms; c=64 "
          f"{r['c64_rps']:.0f} req/s (client CPU {r['c64_client_cpu']:.2f}); {op}{rp}; top-1 {acc}; errors "
          f"{r['errors']} {r['statuses']}", flush=True)


# ---------------------------------------------------------------- one server given by URL


def labels_for(url: str, model: str, labels_file: Path | None) -> list[str] | None:
    if labels_file is not None:
        return [ln.strip() for ln in labels_file.read_text().splitlines() if ln.strip()]
    try:
        meta = model_metadata(url, model)
    except ValueError:
        return None
    labels = (meta.get("parameters") or {}).get("labels")
    return list(labels) if isinstance(labels, list) and labels else None


def one_server(args) -> int:
    from bench.load_test import check_host

    url = args.url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    url = check_host(url, args.allow_remote)  # load goes to 127.0.0.1 unless --allow-remote
    labels = labels_for(url, args.model, args.labels)
    spec = None
    if args.input == "pixels":
        if args.card is None:
            print("error: --input pixels needs the model's card (--card card.json) to decode the images as the "
                  "model expects", file=sys.stderr)
            return 2
        from lab.preprocess import Preprocessing

        spec = Preprocessing.from_dict(json.loads(args.card.read_text())["preprocessing"])
    proto = V2(input=args.input, binary=args.encoding == "binary", labels=labels, backend=args.backend,
               output="probabilities" if labels else "classification", spec=spec)
    samples = cifar_test_samples(args.images)
    target = f"{url}/v2/models/{args.model}/infer"
    print(f"{target}: input {args.input} ({proto.encoding}), output {proto.output}, labels "
          f"{'from ' + ('--labels' if args.labels else 'the metadata') if labels else 'in each answer'}; "
          f"{len(samples)} images, {sum(s.label is not None for s in samples)} labelled", flush=True)
    row = measure(target, samples, proto, c1_requests=args.c1_requests, duration=args.duration,
                  open_load=args.open_load, open_seconds=args.open_seconds)
    row.update(server=url, model=args.model, encoding=proto.encoding, input=args.input)
    print_row(urlsplit_host(url), args.model, proto.encoding, row)
    write(args.out, {"mode": "one server", "url": url, "model": args.model, "rows": [row],
                     "settings": settings(args)}, [row])
    return 0 if row["errors"] == 0 else 1


def urlsplit_host(url: str) -> str:
    return url.split("://", 1)[-1]


# ---------------------------------------------------------------- the side by side


class Served:
    """One server of the side by side: its base URL, each model's v2 name and backend, its encodings."""

    def __init__(self, name: str, server: Server, names: dict[str, str], backends: dict[str, str | None]):
        self.name, self.server, self.names, self.backends = name, server, names, backends
        self.encodings: list[str] = []
        self.notes: list[str] = []

    def url(self, model: str) -> str:
        return f"{self.server.url}/v2/models/{self.names[model]}/infer"

    def proto(self, model: str, encoding: str, labels: list[str]) -> V2:
        return V2(input="image", binary=encoding == "binary", labels=labels, backend=self.backends[model])


def start_service(tag: str, models: list[str], threads: int, logs: Path) -> Served:
    name = tag.split(":")[0]
    backends = ",".join(dict.fromkeys(SERVICE_BACKEND[m] for m in models))
    env = dict(os.environ, PYTHONPATH=str(REPO), LAB_PLUGINS="bench.noop_backend", LAB_BACKENDS=backends,
               LAB_WORKERS="1", LAB_THREADS=str(threads), LAB_DEFAULT_MODEL=name, LAB_MAX_BATCH_SIZE="64")
    srv = Server(env, logs / "service.log")
    return Served("service", srv, {m: name for m in models}, {m: SERVICE_BACKEND[m] for m in models})


def peer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_", "BENTOML_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def start_kserve(py: Path, model_dir: Path, name: str, models: list[str], threads: int, logs: Path) -> Served:
    names = {m: f"{name}-{m}" for m in models}
    cmd = [str(py), str(REPO / "bench" / "peers" / "kserve_model.py"), "--model-dir", str(model_dir),
           "--threads", str(threads), *[a for m in models for a in ("--serve", f"{names[m]}={FILES[m]}")],
           "--http_port", "{port}", "--enable_grpc", "false", "--workers", "1"]
    srv = Server(peer_env(), logs / "kserve.log", cmd=cmd, ready_path="/v2/health/ready", startup_timeout=180)
    return Served("kserve", srv, names, {m: None for m in models})


def start_mlserver(py: Path, model_dir: Path, name: str, models: list[str], threads: int, logs: Path,
                   folder: Path, batch_time: float) -> Served:
    from bench.peers.mlserver_model import write_settings

    names = {m: f"{name}-{m}" for m in models}
    port = free_port()
    write_settings(folder, serve=[(names[m], FILES[m]) for m in models], model_dir=model_dir, threads=threads,
                   http_port=port, grpc_port=free_port(), metrics_port=free_port(), max_batch_size=64,
                   max_batch_time=batch_time)
    cmd = [str(py.parent / "mlserver"), "start", str(folder)]
    srv = Server(peer_env(), logs / "mlserver.log", cmd=cmd, ready_path="/v2/health/ready", startup_timeout=180,
                 port=port, cwd=folder)
    return Served("mlserver", srv, names, {m: None for m in models})


def reference_top1(model_dir: Path, card, samples: list[Sample], models: list[str], threads: int) -> dict:
    """ONNX Runtime in this process on each model's file, through lab/preprocess.py: the top-1 class name of
    each sample, the answers every server's must equal; and the loaded backends, for the replays."""
    from lab.backends import load_backend, softmax
    from lab.preprocess import preprocess_bytes

    out, backends = {}, {}
    for m in models:
        if m == "zero":
            continue
        be = load_backend(m, model_dir, card, threads)
        x = np.stack([preprocess_bytes(s.body, card.preprocessing) for s in samples])
        out[m] = [card.classes[i] for i in softmax(be.predict(x)).argmax(1)]
        backends[m] = be
    return {"top1": out, "backends": backends}


def prove(served: Served, model: str, encoding: str, samples: list[Sample], labels: list[str],
          expected: list[str] | None) -> str | None:
    """Send each of `samples` once; None if every answer is a 200 whose top-1 is the expected one (the
    uniform answer's for the zero model: the first class), else why not, in one line."""
    import http.client

    proto = served.proto(model, encoding, labels)
    u = served.server
    for i, s in enumerate(samples):
        body, headers = proto.request(s)
        conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=60)
        try:
            conn.request("POST", f"/v2/models/{served.names[model]}/infer", body, headers)
            r = conn.getresponse()
            data, size = r.read(), r.getheader("Inference-Header-Content-Length")
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        if r.status != 200:
            return f"HTTP {r.status}: {data[:100].decode('utf-8', 'replace')!r}"
        try:
            got = top1(read_answer(data, None if size is None else int(size)), "probabilities", labels)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return f"an answer that cannot be read ({e})"
        want = labels[0] if expected is None else expected[i]
        if got != want:
            return f"image {i}: top-1 {got!r}, ONNX Runtime in this process says {want!r}"
    return None


def side_by_side(args) -> int:
    from bench.peers import envs
    from lab.card import read_card
    from lab.hardware import cores
    from lab.store import get_model

    try:
        m = get_model(args.model)
    except Exception as e:
        print(f"error: no stored model {args.model!r} ({e}); run `python training/run_all.py` first", file=sys.stderr)
        return 2
    tag, model_dir, card = m.tag, Path(m.path), read_card(m.path)
    name = tag.split(":")[0]
    models = [x.strip() for x in args.models.split(",") if x.strip()]
    bad = [x for x in models if x not in MODELS or (x != "zero" and FILES[x] not in card.files)]
    if bad:
        print(f"error: --models {bad}: each of {', '.join(MODELS)} whose file the model has ({sorted(card.files)})",
              file=sys.stderr)
        return 2
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p not in PEERS for p in peers):
        print(f"error: --peers: of {', '.join(PEERS)}", file=sys.stderr)
        return 2
    threads = args.threads or cores()
    labels = list(card.classes)
    samples = cifar_test_samples(args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    print(f"model {tag}: {', '.join(models)}; {len(samples)} images ({sum(s.label is not None for s in samples)} "
          f"labelled); servers: service, {', '.join(peers) or 'no peers'}; 1 worker each, {threads} ONNX Runtime "
          f"threads; {os.cpu_count()} cores", flush=True)
    pys = {}
    for p in peers:  # before any server starts: the first time, minutes of installing
        pys[p] = envs.ensure(p, log=lambda s: print("  " + s, flush=True))
    ref = reference_top1(model_dir, card, samples[:8], models, threads)
    rows: list[dict] = []
    report = {"mode": "side by side", "model": tag, "threads": threads, "cores": os.cpu_count(),
                        "settings": settings(args), "servers": {}, "rows": rows}
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="v2-compare-mlserver-")))
        servers = [start_service(tag, models, threads, logs)]
        stack.callback(servers[0].server.stop)
        for p in peers:
            s = (start_kserve(pys[p], model_dir, name, models, threads, logs) if p == "kserve" else
                 start_mlserver(pys[p], model_dir, name, models, threads, logs, folder, args.mlserver_batch_time))
            stack.callback(s.server.stop)
            servers.append(s)
        print("\nproving each server's answers (top-1 = ONNX Runtime in this process, 8 images):", flush=True)
        for s in servers:
            for enc in ("binary", "json"):
                why = [(m, prove(s, m, enc, samples[:8], labels, ref["top1"].get(m))) for m in models]
                failed = [(m, w) for m, w in why if w]
                if not failed:
                    s.encodings.append(enc)
                else:
                    s.notes.append(f"{enc} refused: " + "; ".join(f"{m}: {w}" for m, w in failed))
                print(f"  {s.name:<9} {enc:<6} " + ("every model right" if not failed else s.notes[-1]), flush=True)
            if s.name != "service" and "binary" in s.encodings:
                s.encodings = ["binary"]  # a peer is measured in its best encoding
            report["servers"][s.name] = {"url": s.server.url, "models": s.names, "encodings": s.encodings,
                                         "notes": s.notes}
        cells = [(s, m, enc) for m in models for s in servers for enc in s.encodings]
        if not cells:
            print("error: no server answered right", file=sys.stderr)
            return 1
        merged = {(s.name, m, enc): (Result(), Result()) for s, m, enc in cells}
        per_round = args.duration / args.rounds
        c1_per_round = max(1, args.c1_requests // args.rounds)
        print(f"\nc=1 ({args.c1_requests} requests) and c=64 ({args.duration:g} s) in {args.rounds} rounds, the servers "
              f"in turn:", flush=True)
        for r in range(args.rounds):
            for m in models:
                order = [c for c in cells if c[1] == m]
                k = r % len(order)
                for s, _, enc in order[k:] + order[:k]:  # rotated each round
                    proto = s.proto(m, enc, labels)
                    a, b = merged[(s.name, m, enc)]
                    a.extend(run(closed_loop(s.url(m), samples, 1, requests=c1_per_round, warmup=10 if r == 0 else 0,
                                             protocol=proto)))
                    fast = run(closed_loop(s.url(m), samples, 64, duration=per_round, warmup=64 if r == 0 else 0,
                                           protocol=proto))
                    b.extend(fast)
                    b.client_cpu = max(b.client_cpu, fast.client_cpu)  # the busiest round's
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
        print(f"\nopen loop at {100 * args.open_load:.0f}% of each one's c=64 throughput, {args.open_seconds:g} s:",
              flush=True)
        for s, m, enc in cells:
            c1, c64 = merged[(s.name, m, enc)]
            op, rate = open_loop(s.url(m), samples, s.proto(m, enc, labels), c64, args.open_load, args.open_seconds)
            row = summarize(c1, c64, op, rate)
            row.update(server=s.name, model=m, encoding=enc)
            be = ref["backends"].get(m)
            if op is not None and be is not None and (s.name == "service" or args.replay_all):
                row["replay"] = replay_model(be, card, samples, rate, args.open_seconds)
                # the same perfect server with this server's own measured costs instead of the model's alone
                row["own_costs"] = simulate(rate, *batch_cost(row["c1_p50_ms"], row["c64_rps"]), requests=100_000)
            rows.append(row)
            print_row(s.name, m, enc, row)
    report["perf_analyzer"] = perf_analyzer(args, tag, models, samples, threads, logs)
    report["bars"] = bars(rows)
    print("\n== the bars (meaningful on a quiet machine only) ==")
    for line in report["bars"]:
        print(line)
    write(args.out, report, rows)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def replay_model(be, card, samples, rate: float, seconds: float) -> dict:
    """The perfect batching server with the real model in this process, the open loop's arrivals."""
    from lab.preprocess import decode_uint8, normalize

    px = [decode_uint8(s.body, card.preprocessing) for s in samples]

    def run_batch(idx: range) -> None:
        be.predict(normalize(np.stack([px[k % len(px)] for k in idx]), card.preprocessing))

    return replay(run_batch, due_times(rate, seconds))


def bars(rows: list[dict]) -> list[str]:
    """The issue's bars against the peers' rows, MET / NOT MET (the service in binary tensors)."""
    def get(server, model, enc=None):
        c = [r for r in rows if r["server"] == server and r["model"] == model and (enc is None or r["encoding"] == enc)]
        return c[0] if c else None

    out = []
    verdict = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    for model in dict.fromkeys(r["model"] for r in rows):
        me = get("service", model, "binary")
        peers = [r for r in rows if r["model"] == model and r["server"] != "service"]
        if me is None:
            continue
        if peers and model == "zero":
            best = max(peers, key=lambda r: r["c64_rps"])
            out.append(f"servers' own cost (zero model, c=64): service {me['c64_rps']:.0f} req/s, fastest peer "
                       f"{best['server']} {best['c64_rps']:.0f} ({best['encoding']}) -> "
                       f"{verdict(me['c64_rps'] >= best['c64_rps'])} (>= the fastest peer)")
        elif peers:
            worst = [r for r in peers if r["c64_rps"] > me["c64_rps"]]
            out.append(f"{model} c=64: service {me['c64_rps']:.0f} req/s; " + ", ".join(
                f"{r['server']} {r['c64_rps']:.0f} ({r['encoding']})" for r in peers)
                + f" -> {verdict(not worst)} (>= each peer)")
            fast = min(peers, key=lambda r: r["c1_p50_ms"])
            out.append(f"{model} c=1 p50: service {me['c1_p50_ms']:.2f} ms; faster peer {fast['server']} "
                       f"{fast['c1_p50_ms']:.2f} ms -> {verdict(me['c1_p50_ms'] <= fast['c1_p50_ms'] + 0.1)} "
                       f"(<= + 0.1 ms)")
        if model != "zero" and me.get("replay") and "open_p99_ms" in me:
            ratio = me["open_p99_ms"] / me["replay"]["p99_ms"]
            out.append(f"{model} open loop at {me['open_rate']:.0f} req/s: service p99 {me['open_p99_ms']:.1f} ms = "
                       f"{ratio:.2f} x the perfect batching server's replayed with the real model "
                       f"({me['replay']['p99_ms']:.1f} ms), errors {me['open_errors']} -> "
                       f"{verdict(ratio <= 1.5 and me['open_errors'] == 0)} (<= 1.5x, 0 errors)")
            if "busy" in me["replay"] and me.get("own_costs"):
                own = me["open_p99_ms"] / me["own_costs"]["p99_ms"]
                out.append(f"  why: these arrivals kept the model alone busy {100 * me['replay']['busy']:.0f}% of the "
                           f"time, and are {100 * me['open_rate'] / me['c64_rps']:.0f}% of the service's own c=64 "
                           f"capacity (its per-request cost on these cores: HTTP, decoding, the hand-off); a perfect "
                           f"batching server with the service's own measured costs (c=1 {me['c1_p50_ms']:.2f} ms, "
                           f"c=64 {me['c64_rps']:.0f} req/s), simulated: p99 {me['own_costs']['p99_ms']:.1f} ms; the "
                           f"service's = {own:.2f} x that")
    return out


# ---------------------------------------------------------------- perf_analyzer


def perf_analyzer_status(binary: str = "perf_analyzer") -> tuple[str | None, str]:
    """(the binary's path, its version line) when `perf_analyzer --version` exits 0 here; else (None, why)."""
    path = shutil.which(binary)
    if path is None:
        return None, (f"{binary} is not on PATH (pip's perf-analyzer 0.1.0, the only one for this platform, is a "
                      f"placeholder without the binary; Triton's SDK container or a build of it gives one, and "
                      f"its binaries need glibc >= 2.38; here {glibc()})")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return None, f"{path} does not run here ({type(e).__name__}: {e}; {glibc()})"
    except subprocess.TimeoutExpired:
        return None, f"{path} --version did not answer in 30 s"
    first = ((proc.stdout or proc.stderr).strip().splitlines() or [""])[0][:200]
    if proc.returncode != 0:
        return None, f"{path} --version exited {proc.returncode}: {first} ({glibc()})"
    return path, first


def glibc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or "glibc unknown"
    except (ValueError, OSError):
        return "glibc unknown"


def perf_analyzer_data(samples: list[Sample], path: Path, n: int = 100) -> Path:
    """perf_analyzer's --input-data file: `image` BYTES elements, b64 of the 4-byte length + file (as
    perf_analyzer sends a b64 BYTES input as it is), shape [1], one image a step."""
    import base64

    data = [{"image": {"b64": base64.b64encode(len(s.body).to_bytes(4, "little") + s.body).decode(), "shape": [1]}}
            for s in samples[:n]]
    path.write_text(json.dumps({"data": data}))
    return path


def perf_analyzer_command(binary: str, url: str, model: str, data: Path, backend: str, concurrency: int,
                          csv: Path, interval_ms: int) -> list[str]:
    host = url.split("://", 1)[-1]
    return [binary, "-m", model, "-u", host, "-i", "http", "--input-data", str(data), "-H", f"X-Lab-Backend:{backend}",
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(interval_ms),
            "-f", str(csv)]


def read_perf_csv(csv: Path) -> dict:
    """perf_analyzer's -f CSV (latencies in microseconds) -> req/s and p50 / p99 in ms."""
    lines = [ln for ln in csv.read_text().splitlines() if ln.strip()]
    head, row = lines[0].split(","), lines[1].split(",")
    d = dict(zip(head, row))
    return {"rps": float(d["Inferences/Second"]), "p50_ms": float(d["p50 latency"]) / 1000,
            "p99_ms": float(d["p99 latency"]) / 1000}


def perf_analyzer(args, tag: str, models: list[str], samples, threads: int, logs: Path) -> dict:
    """perf_analyzer against a service of its own (started again, the peers stopped), at c=1 and c=64 per
    backend, beside this client's figures; or one line saying why it cannot run here."""
    binary, info = perf_analyzer_status(args.perf_analyzer)
    if binary is None:
        print(f"\nperf_analyzer: not run: {info}", flush=True)
        return {"run": False, "why": info}
    print(f"\nperf_analyzer ({info}) against the service:", flush=True)
    out = {"run": True, "version": info, "rows": []}
    data = perf_analyzer_data(samples, logs / "perf_analyzer_input.json")
    with start_service(tag, models, threads, logs).server as srv:
        for m in models:
            for c in (1, 64):
                csv = logs / f"perf_analyzer_{m}_c{c}.csv"
                cmd = perf_analyzer_command(binary, srv.url, tag.split(":")[0], data, SERVICE_BACKEND[m], c, csv,
                                            int(args.perf_interval * 1000))
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0 or not csv.exists():
                    why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                    print(f"  {m} c={c}: perf_analyzer exited {proc.returncode}: {why[0][:200]}", flush=True)
                    out["rows"].append({"model": m, "concurrency": c, "error": why[0][:500], "command": cmd})
                    continue
                r = dict(read_perf_csv(csv), model=m, concurrency=c, command=cmd)
                out["rows"].append(r)
                print(f"  {m:<10} c={c:<3} {r['rps']:.0f} req/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                      f"(answers not checked)", flush=True)
    return out


# ---------------------------------------------------------------- the report


def settings(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def busy_share(replay: dict | None) -> str:
    return f"{100 * replay['busy']:.0f}%" if replay and "busy" in replay else "-"


def markdown(report: dict, rows: list[dict]) -> str:
    lines = [f"# Open Inference Protocol servers side by side" if report["mode"] == "side by side"
             else f"# An Open Inference Protocol server: {report.get('url')}", "",
             f"Model `{report['model']}`; command `python bench/v2_compare.py "
             f"{' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} cores. "
             f"Measured on a busy machine, these figures mean nothing: measure on a quiet one.", "",
             "| server | model | encoding | c=1 p50 ms | c=1 p99 ms | c=64 req/s | open loop req/s | open p50 ms "
             "| open p99 ms | perfect server p99 ms | model busy | perfect server at its own costs p99 ms "
             "| top-1 under load | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f}% of {r['checked']}" if r.get("accuracy") is not None else "-"
        lines.append(f"| {r['server']} | {r['model']} | {r['encoding']} | {r['c1_p50_ms']:.2f} | {r['c1_p99_ms']:.2f} "
                     f"| {r['c64_rps']:.0f} | {r['open_rate']:.0f} | {fmt(r.get('open_p50_ms'), '.1f')} | "
                     f"{fmt(r.get('open_p99_ms'), '.1f')} | {fmt((r.get('replay') or {}).get('p99_ms'), '.1f')} | "
                     f"{busy_share(r.get('replay'))} | "
                     f"{fmt((r.get('own_costs') or {}).get('p99_ms'), '.1f')} | {acc} | {r['errors']} |")
    for name, s in (report.get("servers") or {}).items():
        for note in s.get("notes", []):
            lines.append(f"\n{name}: {note}")
    pa = report.get("perf_analyzer")
    if pa:
        lines.append("")
        if not pa["run"]:
            lines.append(f"perf_analyzer: not run: {pa['why']}")
        else:
            lines += ["perf_analyzer against the service (answers not checked):", "",
                      "| model | concurrency | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['concurrency']} | {fmt(r.get('rps'), '.0f')} | {fmt(r.get('p50_ms'))} | "
                      f"{fmt(r.get('p99_ms'))} |" for r in pa["rows"]]
    if report.get("bars"):
        lines += ["", "Bars:", ""] + [f"- {b}" for b in report["bars"]]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "v2_compare.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "v2_compare.md").write_text(markdown(report, rows))
    print(f"\nwritten: {out / 'v2_compare.md'}, {out / 'v2_compare.json'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="measure this v2 server only (http://host:port)")
    ap.add_argument("--model", default="cifar10-airbench:latest",
                    help="with --url: the v2 model name; else the stored model (a store tag)")
    ap.add_argument("--input", choices=("image", "pixels"), default="image", help="with --url: the input sent")
    ap.add_argument("--encoding", choices=("binary", "json"), default="binary", help="with --url: tensors as")
    ap.add_argument("--allow-remote", action="store_true", help="with --url: load a server not on 127.0.0.1")
    ap.add_argument("--backend", help="with --url: a backend of this service (request parameter and X-Lab-Backend)")
    ap.add_argument("--labels", type=Path, help="with --url: class names, one a line, by output index")
    ap.add_argument("--card", type=Path, help="with --url --input pixels: the model's card.json (its preprocessing)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"side by side: of {', '.join(MODELS)}")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"side by side: of {', '.join(PEERS)} (empty: none)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: this process's cores)")
    ap.add_argument("--mlserver-batch-time", type=float, default=0.001,
                    help="MLServer's max_batch_time, seconds (its batching needs > 0)")
    ap.add_argument("--images", type=int, default=1000, help="test images sent (each as often)")
    ap.add_argument("--c1-requests", type=int, default=500)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds at c=64 (in all, over the rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="side by side: rounds of c=1 and c=64, servers in turn")
    ap.add_argument("--open-load", type=float, default=0.8, help="the open loop's rate, a fraction of c=64 req/s")
    ap.add_argument("--open-seconds", type=float, default=60.0)
    ap.add_argument("--replay-all", action="store_true",
                    help="the perfect batching server replayed for the peers' rows too (the service's: always)")
    ap.add_argument("--perf-analyzer", default="perf_analyzer", help="perf_analyzer's binary (name or path)")
    ap.add_argument("--perf-interval", type=float, default=5.0, help="perf_analyzer's measurement interval, s")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "v2_compare")
    args = ap.parse_args()
    if not 0 < args.open_load < 1.5:
        ap.error("--open-load: a fraction of the c=64 throughput, between 0 and 1.5")
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    return one_server(args) if args.url else side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
