"""What a perfect server would do with the open-loop benchmark's traffic: the floor for its tail.

    from bench.ideal_queue import batch_cost, simulate
    a, b = batch_cost(batch1_ms=7.35, batch64_images_per_s=157)   # seconds: a batch of k costs a + b*k
    simulate(rate=120, a=a, b=b)    # {"p50_ms": ..., "p99_ms": ..., "ratio": p99 / p50}

The server has no overhead at all: requests arrive as a Poisson stream, wait in one FIFO queue, and
whenever the server is free it takes everything waiting (up to `max_batch`) as one batch that costs
a + b*k seconds, the straight line through the model's measured in-process batch-1 latency and
batch-64 throughput. The time from arrival to answer is what the open loop measures (bench/loadgen.py
`poisson`, from each request's due time). Queueing alone gives this a long tail: at 80 % load an M/D/1
queue (no batching) has a p99 of several times its median, so a measured tail is judged against this
floor, not against a fixed multiple of the median.
"""
from __future__ import annotations

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
