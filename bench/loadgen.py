"""An aiohttp load generator: closed loop (N clients back to back) or open loop (Poisson arrivals).

aiohttp drives 64 connections from one core without becoming the bottleneck at the rates this service
reaches (httpx's async client tops out near 330 requests/s here). Every answer can be checked against
the true label of the image sent, so accuracy under load is measured with the speed.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Sample:
    body: bytes
    content_type: str
    label: str | None = None  # the true class name, when known


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)   # seconds, of successful requests
    statuses: dict[int, int] = field(default_factory=dict)  # status (0 = connection error) -> count
    correct: int = 0
    checked: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    retry_after_seen: int = 0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200)

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    def summary(self) -> dict:
        return {"requests": self.ok + self.errors, "ok": self.ok, "errors": self.errors,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "throughput_rps": self.ok / self.seconds if self.seconds else 0.0,
                "p50_ms": 1000 * self.pct(50), "p90_ms": 1000 * self.pct(90), "p99_ms": 1000 * self.pct(99),
                "mean_ms": 1000 * statistics.fmean(self.latencies) if self.latencies else float("nan"),
                "accuracy": self.correct / self.checked if self.checked else None,
                "checked": self.checked,
                "mean_batch_size": statistics.fmean(self.batch_sizes) if self.batch_sizes else None,
                "retry_after_seen": self.retry_after_seen, "seconds": self.seconds}


async def _send(session: aiohttp.ClientSession, url: str, s: Sample, res: Result, timeout: float) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=s.body, headers={"Content-Type": s.content_type},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            payload = await r.read()
            status = r.status
            if r.headers.get("Retry-After"):
                res.retry_after_seen += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        status, payload = 0, b""
    dt = time.perf_counter() - t0
    res.statuses[status] = res.statuses.get(status, 0) + 1
    if status != 200:
        return
    res.latencies.append(dt)
    try:
        body = json.loads(payload)
    except ValueError:
        return
    if "batch_size" in body:
        res.batch_sizes.append(body["batch_size"])
    if s.label is not None and body.get("predictions"):
        res.checked += 1
        res.correct += body["predictions"][0]["label"] == s.label


def _connector(concurrency: int) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=concurrency, force_close=False, enable_cleanup_closed=True)


async def closed_loop(url: str, samples: list[Sample], concurrency: int, *, requests: int | None = None,
                      duration: float | None = None, timeout: float = 60.0, warmup: int = 0) -> Result:
    """`concurrency` clients, each sending its next request when the last one is answered."""
    res = Result()
    async with aiohttp.ClientSession(connector=_connector(concurrency)) as session:
        scratch = Result()
        for i in range(warmup):
            await _send(session, url, samples[i % len(samples)], scratch, timeout)
        counter = iter(range(10**12))
        deadline = time.perf_counter() + duration if duration else None
        start = time.perf_counter()

        async def client(cid: int) -> None:
            while True:
                i = next(counter)
                if requests is not None and i >= requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                await _send(session, url, samples[(i * 7919 + cid) % len(samples)], res, timeout)

        await asyncio.gather(*(client(c) for c in range(concurrency)))
        res.seconds = time.perf_counter() - start
    return res


async def poisson(url: str, samples: list[Sample], qps: float, duration: float, *, timeout: float = 30.0,
                  max_inflight: int = 1024, seed: int = 0) -> Result:
    """Open loop: requests arrive at exponential intervals (rate `qps`) whatever the answers' speed."""
    res = Result()
    rng = random.Random(seed)
    async with aiohttp.ClientSession(connector=_connector(max_inflight)) as session:
        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        next_at, i = start, 0
        while next_at - start < duration:
            now = time.perf_counter()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            if len(tasks) < max_inflight:
                t = asyncio.create_task(_send(session, url, samples[i % len(samples)], res, timeout))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            else:  # the service fell this far behind: count it as dropped
                res.statuses[-1] = res.statuses.get(-1, 0) + 1
            i += 1
            next_at += rng.expovariate(qps)
        if tasks:
            await asyncio.gather(*tasks)
        res.seconds = time.perf_counter() - start
    return res


def run(coro):
    return asyncio.run(coro)
