"""What a perfect server would do with the open-loop benchmark's traffic: the floor for its tail.

    from bench.ideal_queue import batch_cost, simulate
    a, b = batch_cost(batch1_ms=7.35, batch64_images_per_s=157)   # seconds: a batch of k costs a + b*k
    simulate(rate=120, a=a, b=b)    # {"p50_ms": ..., "p99_ms": ..., "ratio": p99 / p50}
    replay(run_batch, due_times(rate=120, seconds=60))   # the same server built from the real model

The server has no overhead at all: requests arrive as a Poisson stream, wait in one FIFO queue, and
whenever the server is free it takes everything waiting (up to `max_batch`) as one batch that costs
a + b*k seconds, the straight line through the model's measured in-process batch-1 latency and
batch-64 throughput (or through a server's measured c=1 latency and c=64 throughput: then it is a perfect
batching server with that server's own per-request cost). The time from arrival to answer is what the open loop measures (bench/loadgen.py
`poisson`, from each request's due time). Queueing alone gives this a long tail: at 80 % load an M/D/1
queue (no batching) has a p99 of several times its median, so a measured tail is judged against this
floor, not against a fixed multiple of the median.

`replay` is that server made of the real model instead of a formula: the benchmark's arrival times
(`due_times`, the same stream as bench/loadgen.py `poisson` with the same seed) fed in real time to a
loop in this process that runs, whenever it is free, everything that has arrived (up to `max_batch`) as
one call. Its tail has the model's true cost at each batch size and the machine's jitter, and no HTTP,
no parsing and no thread hand-off: what is left between it and the service is the service's own. It
reports the share of the time the model ran (`busy`): the load the arrivals put on the model alone.
"""
from __future__ import annotations

import random
import time
from bisect import bisect_right
from typing import Callable

import numpy as np


def batch_cost(batch1_ms: float, batch64_images_per_s: float) -> tuple[float, float]:
    """(a, b) in seconds with a + b = the batch-1 latency and a + 64 b = 64 / the batch-64 throughput;
    a is clipped at 0 where a batch of 64 costs more than 64 batches of one."""
    t1, t64 = batch1_ms / 1000, 64 / batch64_images_per_s
    b = (t64 - t1) / 63
    a = t1 - b
    if a < 0:
        a, b = 0.0, t64 / 64
    return a, b


def sojourn(arrivals: np.ndarray, a: float, b: float, max_batch: int = 64) -> np.ndarray:
    """Seconds from each arrival (sorted times) to its answer, through the batching server above."""
    n = len(arrivals)
    done = np.empty(n)
    free, i = 0.0, 0
    while i < n:
        start = max(free, arrivals[i])
        j = int(np.searchsorted(arrivals, start, side="right"))  # every request there when it starts
        j = min(max(j, i + 1), i + max_batch)
        free = start + a + b * (j - i)
        done[i:j] = free
        i = j
    return done - arrivals


def simulate(rate: float, a: float, b: float, max_batch: int = 64, requests: int = 200_000,
             seed: int = 0) -> dict:
    """p50 and p99 (ms) of the time in system for Poisson arrivals at `rate` a second."""
    rng = np.random.default_rng(seed)
    s = sojourn(np.cumsum(rng.exponential(1 / rate, requests)), a, b, max_batch)[requests // 10:]  # warm
    p50, p99 = np.percentile(s, [50, 99]) * 1000
    return {"p50_ms": float(p50), "p99_ms": float(p99), "ratio": float(p99 / p50)}


def due_times(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which bench/loadgen.py `poisson(qps=rate, seed=seed)` sends its requests."""
    rng, t, out = random.Random(seed), 0.0, []
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def replay(run_batch: Callable[[range], object], due: list[float], max_batch: int = 64) -> dict:
    """Run the arrivals `due` (sorted seconds from now) through `run_batch(range of request indices)` in
    real time, batching what has arrived whenever the previous call is done; p50 / p99 (ms) of the time
    from each arrival to the end of its batch's call, and the mean batch size."""
    latency, sizes, busy = [], [], 0.0
    start, i, n = time.perf_counter(), 0, len(due)
    while i < n:
        now = time.perf_counter() - start
        if due[i] > now:
            time.sleep(due[i] - now)
            now = time.perf_counter() - start
        j = min(max(bisect_right(due, now, lo=i), i + 1), i + max_batch)
        run_batch(range(i, j))
        done = time.perf_counter() - start
        busy += done - now
        latency += [done - due[k] for k in range(i, j)]
        sizes.append(j - i)
        i = j
    p50, p99 = np.percentile(latency, [50, 99]) * 1000
    return {"p50_ms": float(p50), "p99_ms": float(p99), "ratio": float(p99 / p50),
            "mean_batch": float(np.mean(sizes)), "requests": n,
            "busy": float(busy / (time.perf_counter() - start))}  # the share of the time the model ran


def main() -> int:
    """The perfect batching server's p50 / p99 at a rate, from a batch-1 latency and a batch-64 throughput
    (the model's in-process costs, or a server's measured c=1 p50 and c=64 req/s)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rate", type=float, required=True, help="Poisson arrivals, requests a second")
    ap.add_argument("--batch1-ms", type=float, required=True, help="latency of a batch of one, ms")
    ap.add_argument("--batch64", type=float, required=True, help="throughput at batch 64, images a second")
    ap.add_argument("--requests", type=int, default=200_000)
    args = ap.parse_args()
    if min(args.rate, args.batch1_ms, args.batch64) <= 0 or args.requests < 100:
        ap.error("--rate, --batch1-ms and --batch64 must be positive, --requests at least 100")
    a, b = batch_cost(args.batch1_ms, args.batch64)
    r = simulate(args.rate, a, b, requests=args.requests)
    print(f"a batch of k costs {1000 * a:.3f} + {1000 * b:.3f} k ms; at {args.rate:g} req/s "
          f"({100 * args.rate * b:.0f}% of the time busy at large batches): p50 {r['p50_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms ({r['ratio']:.1f}x)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
