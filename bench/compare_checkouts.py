#!/usr/bin/env python
"""The service of two checkouts side by side: the same client, the same model, in one run.

    git worktree add ../old <commit>
    python bench/compare_checkouts.py ../old .          # c=64 req/s and c=1 p50 per backend, twice each
    python bench/compare_checkouts.py . . --env-a LAB_INLINE_MAX_MS=0   # one checkout, two settings

Each checkout's `bentoml serve` runs in turn (A, B, A, B) from its own folder with the no-op backend
(bench/noop_backend.py, copied into a checkout that lacks it) beside the real ones, so a change to the
request path is measured against what it replaced. Every answer is checked against its label.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench.loadgen import closed_loop, run
from bench.samples import cifar_test_samples
from bench.server import REPO, Server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs=2, type=Path, help="two project folders (A and B)")
    ap.add_argument("--backends", default="noop,onnx,onnx_int8")
    ap.add_argument("--model", default="cifar10-airbench")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds at c=64")
    ap.add_argument("--c1-requests", type=int, default=400)
    ap.add_argument("--logs", type=Path, default=REPO / "reports" / "compare_checkouts")
    ap.add_argument("--env-a", default="", help="settings for A's service, K=V,K=V (e.g. LAB_INLINE_MAX_MS=0)")
    ap.add_argument("--env-b", default="", help="settings for B's service, K=V,K=V")
    args = ap.parse_args()
    try:
        extra = [dict(kv.split("=", 1) for kv in e.split(",") if kv.strip()) for e in (args.env_a, args.env_b)]
    except ValueError:
        ap.error("--env-a / --env-b: K=V pairs separated by commas")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.logs.mkdir(parents=True, exist_ok=True)
    samples = cifar_test_samples(1000)
    roots = [c.resolve() for c in args.checkouts]
    for root in roots:
        if not (root / "serving" / "service.py").is_file():
            print(f"error: {root} is not a checkout of this project", file=sys.stderr)
            return 2
        if not (root / "bench" / "noop_backend.py").exists():
            shutil.copy(REPO / "bench" / "noop_backend.py", root / "bench" / "noop_backend.py")
    for i, root in enumerate(roots * 2):
        name = "AB"[i % 2]
        env = dict(os.environ, PYTHONPATH=str(root), LAB_PLUGINS="bench.noop_backend", LAB_BACKENDS=",".join(backends),
                   LAB_DEFAULT_MODEL=args.model, LAB_WORKERS="1")
        env.update(extra[i % 2])
        label = f"{name} ({root.name}{' ' + (args.env_a, args.env_b)[i % 2] if extra[i % 2] else ''})"
        with Server(env, args.logs / f"{name}{i // 2}.log", cwd=root) as s:
            for b in backends:
                url = f"{s.url}/classify?backend={b}"
                c64 = run(closed_loop(url, samples, 64, duration=args.duration, warmup=64)).summary()
                c1 = run(closed_loop(url, samples, 1, requests=args.c1_requests, warmup=20)).summary()
                acc = f"top-1 {100 * c64['accuracy']:.1f}%" if b != "noop" and c64["accuracy"] is not None else ""
                print(f"{label} {b:<10} c=64 {c64['throughput_rps']:7.0f} req/s errors {c64['errors']}  "
                      f"c=1 p50 {c1['p50_ms']:.2f} ms  client CPU {c64['client_cpu']:.2f}  {acc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
