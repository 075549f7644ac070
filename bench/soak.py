"""Soak: N minutes at concurrency C against a real `bentoml serve`, every answer checked.

    python bench/soak.py --minutes 10 --concurrency 64                   # the long run
    python bench/soak.py --minutes 2 --concurrency 64 --model cifar10-airbench-smoke
    python bench/soak.py --minutes 10 --backends onnx,torch --corrupt 0.1 --workers 2

It starts its own service on 127.0.0.1 (bench/server.py) against the model store of $BENTOML_HOME and
sends real CIFAR-10 test JPEGs (bench/samples.py) from C clients back to back, for --minutes, spread
over the --backends. Every answer is checked: against the true label (accuracy under load) and against
the offline prediction of the same file through the card's preprocessing and the same backend in this
process (a "wrong answer" is any top-1 that differs from it). With --corrupt F, a fraction F of the
requests send a truncated copy, which must get a 4xx JSON error. Every --sample-seconds the worker
processes' RSS, open files and threads are sampled.

Prints a table per minute (requests, req/s, p50, p99, failures, wrong answers, RSS, open files) and the
figures of the closing note: requests, failures (any 5xx, connection error or unexpected status), wrong
answers, accuracy under load against offline accuracy on the same images, RSS growth after the warm-up
(first --warmup seconds) and open files. Writes soak.json and soak.png into --out. Exit status 1 on a
failure, a wrong answer, RSS growth over --max-growth percent, or more open files at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from bench.server import REPO

MiB = 1 << 20
TIE = {"torch_bf16": 0.05}  # logit margin under which a different top-1 is a near tie (else 1e-4)


def offline_predictions(model: str, backends: list[str], samples) -> tuple[str, dict[str, list], list[str]]:
    """The store tag, per backend the offline logits of every sample (None: not an image), and the
    model's classes."""
    from lab.backends import load_backend
    from lab.card import read_card
    from lab.preprocess import ImageError, preprocess_bytes
    from lab.store import get_model

    stored = get_model(model)
    card = read_card(stored.path)
    out = {}
    for b in backends:
        backend = load_backend(b, stored.path, card, threads=1)
        preds = []
        for s in samples:
            try:
                x = preprocess_bytes(s.body, card.preprocessing)[None]
            except ImageError:
                preds.append(None)
                continue
            preds.append(np.asarray(backend.predict(x)[0], np.float64))
        out[b] = preds
    return stored.tag, out, card.classes


class Tally:
    """Per-request records, bucketed by minute."""

    def __init__(self):
        self.rows: list[tuple] = []  # (t_end, seconds, kind, status, verdict)

    def add(self, *row) -> None:
        self.rows.append(row)


async def run_load(url: str, samples, expected: dict, backends: list[str], concurrency: int, seconds: float,
                   corrupt: float, tally: Tally, t0: float, timeout: float = 120) -> None:
    import random

    import aiohttp

    rng = random.Random(0)
    deadline = t0 + seconds
    counter = iter(range(10**12))

    async def client(session):
        while time.perf_counter() < deadline:
            i = next(counter)
            k = i % len(samples)  # request i sends sample i mod n: each as often
            backend = backends[i % len(backends)]
            s = samples[k]
            bad = corrupt > 0 and rng.random() < corrupt
            body = s.body[: max(3, len(s.body) // 3)] if bad else s.body
            t = time.perf_counter()
            try:
                async with session.post(f"{url}/classify", data=body, params={"backend": backend, "top_k": "1"},
                                        headers={"Content-Type": s.content_type},
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    payload = await r.read()
                    status = r.status
            except Exception as e:  # connection errors, timeouts
                status, payload = f"conn:{type(e).__name__}", b""
            dt = time.perf_counter() - t
            if bad:
                ok = isinstance(status, int) and 400 <= status < 500 and payload.startswith(b"{")
                tally.add(time.perf_counter() - t0, dt, "corrupt", status, "ok" if ok else "fail")
                continue
            if status != 200:
                tally.add(time.perf_counter() - t0, dt, "good", status, "fail")
                continue
            try:
                top = json.loads(payload)["predictions"][0]
            except (ValueError, KeyError, IndexError):
                tally.add(time.perf_counter() - t0, dt, "good", status, "fail")
                continue
            logits = expected[backend][k]
            # the same top-1 as offline, or a near tie there: batched kernels round a little differently
            # (bf16 most), which may flip classes whose offline logits are within TIE[backend]
            margin = logits.max() - logits[top["index"]]
            verdict = "right" if margin == 0 else ("tie" if margin <= TIE.get(backend, 1e-4) else "wrong")
            correct = (top["label"] == s.label) if s.label is not None else None
            tally.add(time.perf_counter() - t0, dt, "good", status, verdict, correct, k, backend)

    conn = aiohttp.TCPConnector(limit=concurrency, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))


def backend_list(text: str) -> list[str]:
    """'onnx, torch' -> ['onnx', 'torch']."""
    return [b.strip() for b in text.split(",") if b.strip()]


def sample(procs, t0: float) -> dict:
    """RSS, open files and threads of the worker processes, summed."""
    rss = fds = threads = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            threads += p.num_threads()
        except Exception:
            pass
    return {"t": round(time.perf_counter() - t0, 1), "rss_mib": round(rss / MiB, 1), "open_files": fds,
            "threads": threads}


def sampler(procs_fn, every: float, stop: threading.Event, t0: float, out: list) -> None:
    while True:
        out.append(sample(procs_fn(), t0))
        if stop.wait(every):
            return


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--model", default="cifar10-airbench", help="a model name (its latest version) or name:version")
    ap.add_argument("--backends", default="onnx", help="comma-separated; requests go round-robin over them")
    ap.add_argument("--images", type=int, default=1000, help="distinct CIFAR-10 test images to send")
    ap.add_argument("--corrupt", type=float, default=0.0, help="fraction of requests sent truncated (want 4xx)")
    ap.add_argument("--workers", type=int, default=1, help="LAB_WORKERS for the service")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before RSS growth is measured "
                                                                "(default: a fifth of the run, 10..120 s)")
    ap.add_argument("--sample-seconds", type=float, default=5)
    ap.add_argument("--max-growth", type=float, default=5.0, help="percent of RSS growth after the warm-up")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.concurrency <= 1024 or not 0 < args.minutes <= 24 * 60:
        raise SystemExit("error: --concurrency must be in 1..1024 and --minutes in (0, 1440]")
    from bench.hostile import workers
    from bench.samples import cifar_test_samples
    from bench.server import Server

    backends = backend_list(args.backends)
    out = args.out or REPO / "reports" / f"soak-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    # RSS climbs for a minute or two under load (ONNX Runtime's arenas and torch's caches meeting every
    # batch size, the allocator's high-water mark), then stays flat: growth is measured after that
    warmup = args.warmup if args.warmup is not None else min(120.0, max(10.0, seconds / 5))
    samples = cifar_test_samples(args.images, args.data_root)
    if samples[0].label is None:
        print("warning: no CIFAR-10 test JPEGs under the data root: random PNGs, answers checked against the "
              "offline prediction only", file=sys.stderr)
    print(f"offline predictions of {len(samples)} images on {', '.join(backends)} ...", flush=True)
    tag, expected, classes = offline_predictions(args.model, backends, samples)
    offline_correct = {b: [s.label is not None and p is not None and classes[int(np.argmax(p))] == s.label
                           for s, p in zip(samples, ps)] for b, ps in expected.items()}
    name = tag.split(":")[0]
    extra = {"LAB_DEFAULT_MODEL": name, "LAB_WORKERS": str(args.workers), **dict(e.split("=", 1) for e in args.env)}
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(REPO))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the service too when we are stopped
    print(f"starting bentoml serve ({tag}, {args.workers} worker(s)) ...", flush=True)
    server = Server(env, out / "serve.log", extra)
    try:
        return _soak(server, args, out, tag, samples, expected, offline_correct, backends, seconds, warmup, workers)
    finally:
        server.stop()


def _soak(server, args, out, tag, samples, expected, offline_correct, backends, seconds, warmup, workers_fn) -> int:
    import requests

    for s in samples[:20]:  # warm the batching queue and the sessions
        for b in backends:
            requests.post(f"{server.url}/classify", data=s.body, params={"backend": b},
                          headers={"Content-Type": s.content_type}, timeout=60)
    procs = workers_fn(server)
    print(f"worker pid(s) {[p.pid for p in procs]}; {args.concurrency} clients for {args.minutes:g} min "
          f"(warm-up {warmup:.0f} s), {100 * args.corrupt:.0f}% corrupt inputs", flush=True)
    tally, samples_out, stop = Tally(), [], threading.Event()
    t0 = time.perf_counter()
    at_rest = dict(sample(procs, t0), before=True)
    th = threading.Thread(target=sampler, args=(lambda: procs, args.sample_seconds, stop, t0, samples_out),
                          daemon=True)
    th.start()
    printer = threading.Thread(target=_print_minutes, args=(tally, samples_out, t0, seconds, stop), daemon=True)
    printer.start()
    asyncio.run(run_load(server.url, samples, expected, backends, args.concurrency, seconds, args.corrupt,
                         tally, t0))
    stop.set()
    th.join()
    printer.join()
    time.sleep(2)
    samples_out.append(dict(sample(procs, t0), after=True))  # once more, after the load
    return _report(server, args, out, tag, tally, samples_out, offline_correct, seconds, warmup, at_rest)


def _minute_rows(tally: Tally, samples_out: list, upto: float) -> list[dict]:
    rows = []
    n_min = int(upto // 60) + (1 if upto % 60 > 1 else 0)
    for m in range(n_min):
        lo, hi = 60 * m, min(60 * (m + 1), upto)
        rs = [r for r in tally.rows if lo <= r[0] < hi]
        good = [r for r in rs if r[2] == "good"]
        lat = [r[1] for r in good if r[4] in ("right", "tie", "wrong")]
        ss = [s for s in samples_out if lo <= s["t"] < hi + 0.01]
        rows.append({"minute": m + 1, "requests": len(rs), "rps": len(rs) / max(1e-9, hi - lo),
                     "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99),
                     "failures": sum(1 for r in rs if r[4] == "fail"), "wrong": sum(1 for r in good if r[4] == "wrong"),
                     "rss_mib": ss[-1]["rss_mib"] if ss else float("nan"),
                     "open_files": ss[-1]["open_files"] if ss else -1})
    return rows


HEADER = f"{'min':>4} {'requests':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'failures':>8} {'wrong':>6} " \
         f"{'RSS MiB':>8} {'files':>6}"


def _fmt(r: dict) -> str:
    return (f"{r['minute']:>4} {r['requests']:>9} {r['rps']:>7.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{r['failures']:>8} {r['wrong']:>6} {r['rss_mib']:>8.0f} {r['open_files']:>6}")


def _print_minutes(tally, samples_out, t0, seconds, stop) -> None:
    print(HEADER, flush=True)
    done = 0
    while True:
        finished = stop.wait(1.0)
        now = time.perf_counter() - t0
        while done < int(min(now, seconds) // 60):
            print(_fmt(_minute_rows(tally, samples_out, 60 * (done + 1))[done]), flush=True)
            done += 1
        if finished:
            rows = _minute_rows(tally, samples_out, seconds)
            for r in rows[done:]:
                print(_fmt(r) + ("  (partial minute)" if seconds % 60 else ""), flush=True)
            return


def _report(server, args, out, tag, tally, samples_out, offline_correct, seconds, warmup, at_rest) -> int:
    rows = tally.rows
    good = [r for r in rows if r[2] == "good"]
    answered = [r for r in good if r[4] in ("right", "tie", "wrong")]
    failures = [r for r in rows if r[4] == "fail"]
    statuses: dict = {}
    for r in rows:
        statuses[str(r[3])] = statuses.get(str(r[3]), 0) + 1
    wrong = sum(1 for r in answered if r[4] == "wrong")
    checked = [r for r in answered if r[5] is not None]
    acc_load = sum(r[5] for r in checked) / len(checked) if checked else None
    acc_offline = sum(offline_correct[r[7]][r[6]] for r in checked) / len(checked) if checked else None
    lat = [r[1] for r in answered]
    post = [s for s in samples_out if s["t"] >= warmup and not s.get("after")]
    rss_start = post[0]["rss_mib"] if post else float("nan")
    rss_end = post[-1]["rss_mib"] if post else float("nan")
    rss_max = max((s["rss_mib"] for s in post), default=float("nan"))
    growth = 100 * (rss_end - rss_start) / rss_start if post else float("nan")
    files_start, files_end = at_rest["open_files"], samples_out[-1]["open_files"]  # both at rest
    files_max = max((s["open_files"] for s in samples_out), default=-1)
    per_backend = {}
    for b in backend_list(args.backends):
        rs = [r for r in answered if r[7] == b]
        ch = [r for r in rs if r[5] is not None]
        per_backend[b] = {"answered": len(rs), "wrong": sum(1 for r in rs if r[4] == "wrong"),
                          "near_ties": sum(1 for r in rs if r[4] == "tie"),
                          "accuracy_under_load": sum(r[5] for r in ch) / len(ch) if ch else None,
                          "offline_accuracy_same_images": sum(offline_correct[b][r[6]] for r in ch) / len(ch) if ch else None}
    log = server.log()
    summary = {
        "model": tag, "minutes": args.minutes, "concurrency": args.concurrency, "backends": args.backends,
        "workers": args.workers, "corrupt_fraction": args.corrupt, "requests": len(rows), "per_backend": per_backend,
        "near_ties": sum(1 for r in answered if r[4] == "tie"),
        "answered_200": len(answered), "failures": len(failures), "statuses": statuses, "wrong_answers": wrong,
        "corrupt_sent": sum(1 for r in rows if r[2] == "corrupt"),
        "corrupt_answered_4xx": sum(1 for r in rows if r[2] == "corrupt" and r[4] == "ok"),
        "accuracy_under_load": acc_load, "offline_accuracy_same_images": acc_offline, "answers_checked": len(checked),
        "throughput_rps": len(rows) / seconds, "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
        "warmup_s": warmup, "rss_after_warmup_mib": rss_start, "rss_end_mib": rss_end, "rss_max_after_warmup_mib": rss_max,
        "rss_growth_pct": round(growth, 2), "rss_at_rest_before_mib": at_rest["rss_mib"],
        "rss_at_rest_after_mib": samples_out[-1]["rss_mib"], "open_files_before": files_start,
        "open_files_max_under_load": files_max, "open_files_after": files_end,
        "tracebacks_in_log": log.count("Traceback"),
        "per_minute": _minute_rows(tally, samples_out, seconds), "samples": samples_out,
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=1, default=float))
    _plot(summary, out / "soak.png")
    acc = (f"{100 * acc_load:.2f}% under load vs {100 * acc_offline:.2f}% offline on the same images"
           if acc_load is not None else "n/a (no labels)")
    print(f"\n{tag}: {args.minutes:g} min at c={args.concurrency} on {args.backends}: {len(rows)} requests "
          f"({summary['throughput_rps']:.1f}/s), {len(failures)} failures {statuses}, {wrong} wrong answers; "
          f"accuracy {acc}; p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms")
    for b, pb in per_backend.items():
        acc_b = (f"{100 * pb['accuracy_under_load']:.2f}% vs {100 * pb['offline_accuracy_same_images']:.2f}% offline"
                 if pb["accuracy_under_load"] is not None else "n/a")
        print(f"  {b:<11} {pb['answered']:>7} answers, {pb['wrong']} wrong, {pb['near_ties']} near ties "
              f"(a different top-1 within {TIE.get(b, 1e-4):g} of the offline top logit), accuracy {acc_b}")
    if args.corrupt:
        print(f"corrupt inputs: {summary['corrupt_answered_4xx']}/{summary['corrupt_sent']} answered 4xx JSON")
    print(f"worker RSS after the {warmup:.0f} s warm-up {rss_start:.0f} MiB, at the end {rss_end:.0f} MiB "
          f"(growth {growth:+.2f}%, max {rss_max:.0f} MiB; at rest {at_rest['rss_mib']:.0f} before, "
          f"{samples_out[-1]['rss_mib']:.0f} after); open files at rest {files_start} before, {files_end} after "
          f"(at most {files_max} under load); "
          f"tracebacks in the log: {summary['tracebacks_in_log']}")
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    bad = failures or wrong or growth > args.max_growth or files_end > files_start
    return 1 if bad else 0


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    s = [x for x in summary["samples"] if not x.get("after")]
    t = [x["t"] / 60 for x in s]
    axes[0].plot(t, [x["rss_mib"] for x in s], label="worker RSS (MiB)")
    axes[0].axvline(summary["warmup_s"] / 60, color="grey", ls=":", label="end of warm-up")
    axes[0].legend()
    ax2 = axes[0].twinx()
    ax2.plot(t, [x["open_files"] for x in s], color="tab:orange", alpha=0.6)
    ax2.set_ylabel("open files")
    m = summary["per_minute"]
    axes[1].plot([r["minute"] for r in m], [r["p50_ms"] for r in m], "o-", label="p50 ms")
    axes[1].plot([r["minute"] for r in m], [r["p99_ms"] for r in m], "o-", label="p99 ms")
    axes[1].legend()
    axes[2].bar([r["minute"] for r in m], [r["rps"] for r in m], label="requests/s")
    axes[2].set_xlabel("minute")
    axes[2].legend()
    fig.suptitle(f"soak: {summary['model']}, c={summary['concurrency']}, {summary['requests']} requests, "
                 f"{summary['failures']} failures, {summary['wrong_answers']} wrong")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
