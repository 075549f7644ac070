#!/usr/bin/env python
"""Headless Locust runs, per backend, bounded in users and time, with accuracy under load.

    python bench/load_test.py --host http://127.0.0.1:3000 --backends onnx,torch --users 16 --run-time 30
    python bench/load_test.py --serve --backends onnx,onnx_int8      # start bentoml serve, test, stop it
    python bench/load_test.py --serve --workers 2                    # Locust master + 2 worker processes

Writes Locust's CSV files and a JSON summary per backend into --out, and prints the summary. A service
that is down or answers errors still gives a finished run, with the errors counted.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from lab.paths import REPO

LOCUSTFILE = REPO / "bench" / "locustfile.py"
MAX_USERS, MAX_SECONDS = 512, 3600


def _locust() -> str:
    return str(Path(sys.executable).with_name("locust"))


def check_host(host: str, allow_remote: bool) -> str:
    u = urlparse(host)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SystemExit(f"error: --host must be an http(s) URL, got {host!r}")
    if u.hostname not in ("127.0.0.1", "localhost", "::1") and not allow_remote:
        raise SystemExit(f"error: load goes only to 127.0.0.1 unless you pass --allow-remote ({host})")
    return host.rstrip("/")


def run_locust(host: str, backend: str, users: int, spawn_rate: float, run_time: int, out: Path,
               workers: int = 0, images: int = 500, data_root: str = "", model: str = "",
               protocol: str = "classify") -> dict:
    """One bounded headless run (master + `workers` worker processes when workers > 0); `protocol` v2
    sends Open Inference Protocol requests to /v2/models/<model>/infer instead of /classify."""
    prefix = out / f"locust_{backend}"
    acc = out / f"locust_{backend}_accuracy.json"
    common = ["-f", str(LOCUSTFILE), "--backends", backend, "--images", str(images), "--protocol", protocol]
    if data_root:
        common += ["--data-root", data_root]
    if model:
        common += ["--model", model]
    cmd = [_locust(), *common, "--headless", "--host", host, "-u", str(users), "-r", str(spawn_rate),
           "-t", f"{run_time}s", "--stop-timeout", "5", "--csv", str(prefix), "--accuracy-out", str(acc),
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    procs = []
    if workers:
        port = _free_port()
        cmd += ["--master", "--expect-workers", str(workers), "--master-bind-host", "127.0.0.1",
                "--master-bind-port", str(port)]
        for _ in range(workers):
            procs.append(subprocess.Popen([_locust(), *common, "--worker", "--master-host", "127.0.0.1",
                                           "--master-port", str(port), "--loglevel", "WARNING"],
                                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=run_time + 120)
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    stats = _read_stats(prefix.with_name(prefix.name + "_stats.csv"),
                        f"{'infer' if protocol == 'v2' else 'classify'}[{backend}]")
    failures = _read_failures(prefix.with_name(prefix.name + "_failures.csv"))
    accuracy = json.loads(acc.read_text()).get(backend, {}) if acc.exists() else {}
    summary = {"backend": backend, "users": users, "run_time_s": run_time, "workers": workers,
               "seconds": round(time.time() - t0, 1), "locust_exit": proc.returncode, **stats,
               "failure_kinds": failures, "accuracy": accuracy.get("accuracy"),
               "answers_checked": accuracy.get("checked", 0)}
    if proc.returncode not in (0, 1) and not stats.get("requests"):
        summary["locust_error"] = proc.stderr[-2000:]
    return summary


def _free_port() -> int:
    from bench.server import free_port

    return free_port()


def _read_stats(path: Path, name: str) -> dict:
    if not path.exists():
        return {"requests": 0, "failures": 0}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["Name"] == name:
                def num(k):
                    try:
                        return float(row[k])
                    except (KeyError, ValueError):
                        return None
                return {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                        "rps": num("Requests/s"), "p50_ms": num("50%"), "p90_ms": num("90%"),
                        "p99_ms": num("99%"), "mean_ms": num("Average Response Time")}
    return {"requests": 0, "failures": 0}


def _read_failures(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as f:
        return {row["Error"][:120]: int(row["Occurrences"]) for row in csv.DictReader(f)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:3000")
    ap.add_argument("--allow-remote", action="store_true", help="allow a host other than 127.0.0.1")
    ap.add_argument("--serve", action="store_true", help="start bentoml serve on a free port, stop it after")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--spawn-rate", type=float, default=16)
    ap.add_argument("--run-time", type=int, default=20, help="seconds per backend")
    ap.add_argument("--workers", type=int, default=0, help="Locust worker processes (0 = one local process)")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--data-root", default="")
    ap.add_argument("--model", default="")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "load_test")
    args = ap.parse_args(argv)
    if not 1 <= args.users <= MAX_USERS or not 1 <= args.run_time <= MAX_SECONDS:
        raise SystemExit(f"error: --users must be in 1..{MAX_USERS} and --run-time in 1..{MAX_SECONDS} s")
    args.out.mkdir(parents=True, exist_ok=True)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    server = None
    if args.serve:
        from bench.server import Server

        env = dict(os.environ, PYTHONPATH=str(REPO), BENTOML_DO_NOT_TRACK="True")
        if args.model:
            env["LAB_DEFAULT_MODEL"] = args.model.split(":")[0]
        server = Server(env, args.out / "serve.log")
        host = server.url
    else:
        host = check_host(args.host, args.allow_remote)
    results = []
    try:
        for b in backends:
            r = run_locust(host, b, args.users, args.spawn_rate, args.run_time, args.out, args.workers,
                           args.images, args.data_root, args.model)
            results.append(r)
            acc = f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "n/a"
            print(f"{b:<10} {r['requests']:>6} requests, {r['failures']} failures, "
                  f"{r.get('rps') or 0:.1f} req/s, p50 {r.get('p50_ms') or float('nan'):.0f} ms, "
                  f"p99 {r.get('p99_ms') or float('nan'):.0f} ms, accuracy under load {acc} "
                  f"({r['answers_checked']} answers checked)", flush=True)
    finally:
        if server is not None:
            server.stop()
    (args.out / "load_test.json").write_text(json.dumps(results, indent=1))
    print(f"written: {args.out / 'load_test.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
