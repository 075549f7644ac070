"""Load patterns against a running service: a concurrency sweep and MLPerf-style scenarios.

After MLPerf Inference's LoadGen:
  single-stream  one query at a time, the next sent when the last is answered; reports p90 latency
  server         queries arrive as a Poisson process at a target QPS; reports p99 latency, whether it
                 met the bound, and (by search) the highest QPS whose p99 meets it with no errors
  offline        all queries available at once (sent as /classify_batch requests of 64 images);
                 reports throughput
Every scenario reports the accuracy of the answers it got, checked against the images' true labels.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from bench.loadgen import Result, Sample, closed_loop, poisson, run

LEVELS = (1, 2, 4, 8, 16, 32, 64)


def sweep(url: str, samples: list[Sample], backend: str, levels=LEVELS, duration: float = 5.0,
          log=print) -> list[dict]:
    out = []
    for c in levels:
        r = run(closed_loop(f"{url}/classify?backend={backend}", samples, c, duration=duration, warmup=min(c, 8)))
        s = dict(r.summary(), concurrency=c)
        out.append(s)
        log(f"  {backend:<10} c={c:<3} {s['throughput_rps']:7.1f} req/s  p50 {s['p50_ms']:7.1f}  p90 {s['p90_ms']:7.1f}"
            f"  p99 {s['p99_ms']:7.1f} ms  errors {s['errors']}  accuracy {_pct(s['accuracy'])}")
    return out


def single_stream(url: str, samples: list[Sample], backend: str, queries: int = 300) -> dict:
    r = run(closed_loop(f"{url}/classify?backend={backend}", samples, 1, requests=queries, warmup=10))
    return dict(r.summary(), scenario="single-stream", settings={"queries": queries},
                metric="p90 latency, ms", value=r.summary()["p90_ms"])


def server(url: str, samples: list[Sample], backend: str, bound_ms: float, start_qps: float,
           duration: float = 8.0, steps: int = 5, log=print) -> dict:
    """Search the highest Poisson arrival rate whose p99 latency stays within `bound_ms` with no errors."""
    target = f"{url}/classify?backend={backend}"

    def trial(qps: float) -> dict:
        r = run(poisson(target, samples, qps, duration))
        s = dict(r.summary(), qps=qps)
        s["met"] = s["errors"] == 0 and s["ok"] > 0 and s["p99_ms"] <= bound_ms
        log(f"  {backend:<10} server @ {qps:6.1f} QPS: p99 {s['p99_ms']:7.1f} ms, achieved {s['throughput_rps']:.1f} "
            f"req/s, errors {s['errors']} -> {'meets' if s['met'] else 'misses'} {bound_ms:.0f} ms")
        return s

    trials = [trial(start_qps)]
    lo, hi = (start_qps, None) if trials[-1]["met"] else (0.0, start_qps)
    for _ in range(steps - 1):
        qps = lo * 2 if hi is None else (lo + hi) / 2
        if qps <= 0.5:
            qps = (hi or start_qps) / 4
        trials.append(trial(qps))
        if trials[-1]["met"]:
            lo = max(lo, qps)
        else:
            hi = qps if hi is None else min(hi, qps)
    best = max((t for t in trials if t["met"]), key=lambda t: t["qps"], default=None)
    return {"scenario": "server", "settings": {"p99_bound_ms": bound_ms, "trial_seconds": duration,
                                               "arrivals": "Poisson"},
            "metric": "max QPS with p99 within the bound", "value": best["qps"] if best else 0.0,
            "p99_ms_at_best": best["p99_ms"] if best else None,
            "accuracy": best["accuracy"] if best else None, "trials": trials}


async def _offline(url: str, samples: list[Sample], backend: str, batch: int, concurrency: int) -> Result:
    res = Result()
    chunks = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    queue = list(range(len(chunks)))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()

        async def client():
            while queue:
                chunk = chunks[queue.pop()]
                form = aiohttp.FormData()
                for i, s in enumerate(chunk):
                    form.add_field("images", s.body, filename=f"{i}", content_type=s.content_type)
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/classify_batch?backend={backend}", data=form,
                                            timeout=aiohttp.ClientTimeout(total=300)) as r:
                        status, body = r.status, await r.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    status, body = 0, b""
                res.statuses[status] = res.statuses.get(status, 0) + len(chunk)
                if status != 200:
                    continue
                dt = time.perf_counter() - t0
                results = json.loads(body)["results"]
                for s, r_ in zip(chunk, results):
                    res.latencies.append(dt)
                    if s.label is not None:
                        res.checked += 1
                        res.correct += r_["predictions"][0]["label"] == s.label

        await asyncio.gather(*(client() for _ in range(concurrency)))
        res.seconds = time.perf_counter() - start
    return res


def offline(url: str, samples: list[Sample], backend: str, batch: int = 64, concurrency: int = 2) -> dict:
    r = run(_offline(url, samples, backend, batch, concurrency))
    s = r.summary()
    return dict(s, scenario="offline", settings={"images": len(samples), "batch": batch, "concurrency": concurrency},
                metric="images/s", value=s["throughput_rps"])


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def plot_sweep(sweeps: dict[str, list[dict]], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (backend, rows) in enumerate(sweeps.items()):
        color = f"C{i}"
        x = [r["throughput_rps"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{backend} p50")
        ax.plot(x, [r["p99_ms"] for r in rows], "s--", color=color, alpha=0.6, label=f"{backend} p99")
        for r in rows:
            ax.annotate(f"c={r['concurrency']}", (r["throughput_rps"], r["p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    ax.set(xlabel="throughput, requests/s", ylabel="latency, ms", yscale="log",
           title=title or "latency vs throughput (concurrency 1..64)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
