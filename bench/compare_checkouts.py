#!/usr/bin/env python
"""The service of two checkouts side by side: the same client, the same model, in one run.

    git worktree add ../old <commit>
    python bench/compare_checkouts.py ../old .          # c=64 req/s and c=1 p50 per backend, B - A
    python bench/compare_checkouts.py . . --env-a LAB_INLINE_MAX_MS=0   # one checkout, two settings

Both checkouts' `bentoml serve` run at once, each from its own folder with the no-op backend
(bench/noop_backend.py, copied into a checkout that lacks it) beside the real ones, and are measured in
turn, in rounds (A B, B A, A B, ...; the one not measured is idle), so the machine's drift falls on both
sides. Per backend it prints each side's median c=64 req/s and c=1 p50, and B - A with a 95 %
t-interval over the rounds (paired: the two sides of one round ran within seconds of each other). Two
processes of the same code differ a little too (memory layout): `compare_checkouts.py . .` shows that
resolution on the machine at hand. Every answer is checked against its label.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.loadgen import closed_loop, run
from bench.samples import cifar_test_samples
from bench.server import REPO, Server
from lab import student_t


def interval(diffs: list[float]) -> tuple[float, float]:
    """95 % t-interval of the mean of paired differences (one per round)."""
    d = np.asarray(diffs, dtype=float)
    half = student_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def verdict(lo: float, hi: float) -> str:
    return "not established" if lo <= 0 <= hi else ("B higher" if lo > 0 else "B lower")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs=2, type=Path, help="two project folders (A and B)")
    ap.add_argument("--backends", default="noop,onnx,onnx_int8")
    ap.add_argument("--model", default="cifar10-airbench")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per backend, each side measured once a round")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds at c=64 per side and round")
    ap.add_argument("--c1-requests", type=int, default=150, help="c=1 requests per side and round")
    ap.add_argument("--logs", type=Path, default=REPO / "reports" / "compare_checkouts")
    ap.add_argument("--env-a", default="", help="settings for A's service, K=V,K=V (e.g. LAB_INLINE_MAX_MS=0)")
    ap.add_argument("--env-b", default="", help="settings for B's service, K=V,K=V")
    args = ap.parse_args()
    try:
        extra = [dict(kv.split("=", 1) for kv in e.split(",") if kv.strip()) for e in (args.env_a, args.env_b)]
    except ValueError:
        ap.error("--env-a / --env-b: K=V pairs separated by commas")
    if args.rounds < 2:
        ap.error("--rounds: at least 2 (the interval is over rounds)")
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
    with ExitStack() as stack:
        servers = []
        for i, root in enumerate(roots):
            env = dict(os.environ, PYTHONPATH=str(root), LAB_PLUGINS="bench.noop_backend",
                       LAB_BACKENDS=",".join(backends), LAB_DEFAULT_MODEL=args.model, LAB_WORKERS="1")
            env.update(extra[i])
            servers.append(stack.enter_context(Server(env, args.logs / f"{'AB'[i]}.log", cwd=root)))
            setting = f" {(args.env_a, args.env_b)[i]}" if extra[i] else ""
            print(f"{'AB'[i]}: {root}{setting}", flush=True)
        for b in backends:
            c64, c1 = ([], []), ([], [])  # per side: each round's req/s, each round's p50 ms
            for r in range(args.rounds):
                for side in ((0, 1) if r % 2 == 0 else (1, 0)):  # A B, B A, ...: drift falls on both
                    url = f"{servers[side].url}/classify?backend={b}"
                    fast = run(closed_loop(url, samples, 64, duration=args.duration, warmup=64)).summary()
                    one = run(closed_loop(url, samples, 1, requests=args.c1_requests, warmup=10)).summary()
                    if fast["errors"] or one["errors"] or (b != "noop" and (fast["accuracy"] or 0) < 0.5):
                        print(f"error: {'AB'[side]} {b}: {fast['statuses']} {one['statuses']}, top-1 "
                              f"{fast['accuracy']}", file=sys.stderr)
                        return 1
                    c64[side].append(fast["throughput_rps"])
                    c1[side].append(one["p50_ms"])
            for what, (a, bb), unit in (("c=64", c64, "req/s"), ("c=1 p50", c1, "ms")):
                lo, hi = interval([y - x for x, y in zip(a, bb)])
                print(f"{b:<10} {what:<8} A {statistics.median(a):8.2f}  B {statistics.median(bb):8.2f} {unit:<5}  "
                      f"B-A {statistics.fmean(bb) - statistics.fmean(a):+8.3f} [{lo:+.3f}, {hi:+.3f}] "
                      f"{verdict(lo, hi)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
