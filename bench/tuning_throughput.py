#!/usr/bin/env python
"""Optuna tuning throughput with 1 and 2 worker processes on this machine, against one PostgreSQL study.

    python bench/tuning_throughput.py                         # postgresql+psycopg://postgres@127.0.0.1:5432/test
    python bench/tuning_throughput.py --trials 8 --epochs 1 --storage sqlite:///runs/tp.db

Each setting runs `training/tune.py` on a fresh study with the same work: random parameters (seeded per
setting) and no pruning, so that the two settings train comparable trials; the figure is finished trials
per minute of wall time. Torch threads are split between the workers (2 cores: 1 thread each with 2
workers), which is what bounds the speed-up on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.paths import REPO


def run(workers: int, args, name: str) -> dict:
    cmd = [sys.executable, str(REPO / "training" / "tune.py"), "--no-progress", "--preset", args.preset,
           "--storage", args.storage, "--study-name", name, "--n-trials", str(args.trials), "--n-workers",
           str(workers), "--epochs", str(args.epochs), "--sampler", "random", "--pruner", "none", "--no-publish",
           "--fresh"]
    if args.data_root:
        cmd += ["--data-root", str(args.data_root)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: tune.py failed with {workers} worker(s): {proc.stderr.strip().splitlines()[-1:]}")
    import optuna

    study = optuna.load_study(study_name=name, storage=args.storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    per_worker = {}
    for t in done:
        per_worker[t.user_attrs.get("worker")] = per_worker.get(t.user_attrs.get("worker"), 0) + 1
    busy = sum(t.user_attrs.get("train_seconds", 0) for t in done)
    return {"workers": workers, "trials": len(done), "seconds": seconds, "trials_per_minute": 60 * len(done) / seconds,
            "per_worker": per_worker, "train_seconds_in_trials": busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--preset", default="quick", help="tune.py preset (data sizes)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d%H%M%S")
    results = [run(w, args, f"throughput-{w}w-{stamp}") for w in (1, 2)]
    print(f"Optuna tuning throughput, {args.trials} trials of {args.epochs:g} epoch(s) each ({args.preset} data), "
          f"storage {args.storage.split('@')[-1]}, {os.cpu_count()} cores:")
    for r in results:
        print(f"  {r['workers']} worker(s): {r['trials']} trials in {r['seconds']:.0f} s = "
              f"{r['trials_per_minute']:.2f} trials/min; trials per worker {sorted(r['per_worker'].values())}; "
              f"training time inside trials {r['train_seconds_in_trials']:.0f} s")
    print(f"  speed-up with 2 workers: {results[1]['trials_per_minute'] / results[0]['trials_per_minute']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuning_throughput.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
