"""A load generator on raw sockets: closed loop (N clients back to back) or open loop (Poisson arrivals).

HTTP/1.1 keep-alive written by hand over asyncio (uvloop where installed): each request is bytes built
once, each answer is read by its Content-Length (or its chunks, where a server sends it chunked). One
core drives tens of thousands of requests a second this way (aiohttp managed about 3,000 here), so a
fast service is not hidden by a slow client;
`Result.client_cpu` says how busy the client's core was, and a figure measured with it near 1.0 is
the client's, not the server's.

Open loop (`poisson`): requests are due at exponential intervals whatever the answers' speed, and each
one's latency counts from when it was due, not from when a connection was free to send it: a stalled
server is charged for the requests it held up (the coordinated-omission correction of wrk2). Goodput
counts the 200s answered within a latency bound. Every answer can be checked against the true label of
the image sent, so accuracy under load is measured with the speed.

What a request holds and how its answer is read is a `Protocol`: `Classify` (the default) posts the
image file to /classify and reads its JSON; `bench/v2client.py`'s `V2` builds Open Inference Protocol
(KServe v2) requests and reads their answers, so both loops run against any v2 server.
"""
from __future__ import annotations

import asyncio
import json
import random
import resource
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


STAGES = ("preprocess_ms", "queue_ms", "inference_ms")  # what the service says a single answer's time went on


@dataclass
class Sample:
    body: bytes
    content_type: str
    label: str | None = None  # the true class name, when known


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)   # seconds, of successful requests
    statuses: dict[int, int] = field(default_factory=dict)  # status (0 = connection error) -> count
    refusals: list[float] = field(default_factory=list)     # seconds, of 503 answers
    correct: int = 0
    checked: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    retry_after_seen: int = 0
    client_cpu: float = 0.0       # the client's CPU seconds per second of the run (1.0: one core saturated)
    bound_s: float | None = None  # the latency bound of goodput
    stages: dict[str, list[float]] = field(default_factory=dict)  # the service's own timings, ms (STAGES)
    unreadable: int = 0           # 200s whose answer could not be read (each also counted wrong when labelled)

    def extend(self, other: "Result") -> None:
        """Add another run's answers to this one (runs made one after the other)."""
        self.latencies += other.latencies
        self.refusals += other.refusals
        self.batch_sizes += other.batch_sizes
        for k, v in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v
        self.correct += other.correct
        self.checked += other.checked
        self.retry_after_seen += other.retry_after_seen
        self.unreadable += other.unreadable
        self.seconds += other.seconds
        for k, v in other.stages.items():
            self.stages.setdefault(k, []).extend(v)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200)

    def pct(self, q: float, xs: list[float] | None = None) -> float:
        xs = sorted(self.latencies if xs is None else xs)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    def summary(self) -> dict:
        good = sum(1 for x in self.latencies if self.bound_s is None or x <= self.bound_s)
        return {"requests": self.ok + self.errors, "ok": self.ok, "errors": self.errors,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "throughput_rps": self.ok / self.seconds if self.seconds else 0.0,
                "goodput_rps": good / self.seconds if self.seconds else 0.0,
                "bound_ms": None if self.bound_s is None else 1000 * self.bound_s,
                "p50_ms": 1000 * self.pct(50), "p90_ms": 1000 * self.pct(90), "p99_ms": 1000 * self.pct(99),
                "p999_ms": 1000 * self.pct(99.9),
                "mean_ms": 1000 * statistics.fmean(self.latencies) if self.latencies else float("nan"),
                "refusal_p99_ms": 1000 * self.pct(99, self.refusals) if self.refusals else None,
                "accuracy": self.correct / self.checked if self.checked else None,
                "checked": self.checked, "correct": self.correct, "unreadable": self.unreadable,
                "mean_batch_size": statistics.fmean(self.batch_sizes) if self.batch_sizes else None,
                "retry_after_seen": self.retry_after_seen, "seconds": self.seconds,
                "client_cpu": self.client_cpu,
                "stages_p50_ms": {k: statistics.median(v) for k, v in self.stages.items() if v}}


class _Connection(asyncio.Protocol):
    """One keep-alive connection: send a request's bytes, get (status, head, body, closed) back."""

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        if b"\r\ntransfer-encoding: chunked" in head:
            got = _chunked(self.buf, end + 4)
            if got is None:
                return
            body, stop = got
        else:
            length = _content_length(head)
            if len(self.buf) < end + 4 + length:
                return
            body, stop = bytes(self.buf[end + 4:end + 4 + length]), end + 4 + length
        del self.buf[:stop]
        self.waiter.set_result((int(head[9:12]), head, body, b"\r\nconnection: close" in head))

    def connection_lost(self, exc):
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((0, b"", b"", True))

    async def exchange(self, payload: bytes, timeout: float) -> tuple[int, bytes, bytes, bool]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        except asyncio.TimeoutError:
            self.transport.close()
            return 0, b"", b"", True


def _chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at buf[pos] (as uvicorn sends an answer without Content-Length): (the body,
    where the answer ends), or None while it is incomplete. Trailers are not expected (none are sent)."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            if len(buf) < eol + 4:
                return None
            return b"".join(parts), eol + 4
        if len(buf) < eol + 2 + size + 2:
            return None
        parts.append(bytes(buf[eol + 2:eol + 2 + size]))
        pos = eol + 2 + size + 2


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = head.find(b"\r\n", at + 2)
    return int(head[at + 17:stop if stop > 0 else None])


class Protocol:
    """What a request for a sample holds and how its answer is read. Subclasses give `request` (the body
    and its headers, built once per sample) and `check` (records a 200's answer in a Result)."""

    def request(self, sample: Sample) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def check(self, head: bytes, body: bytes, sample: Sample, res: Result) -> None:
        """Read a 200's answer (head: the response's header block, lower-cased; body: its bytes); count it
        in res.checked / res.correct when the sample's label is known."""
        raise NotImplementedError


class Classify(Protocol):
    """POST /classify: the image file as the body with its Content-Type; the answer's JSON top-1 label,
    its batch size and the service's stage times."""

    def request(self, sample: Sample) -> tuple[bytes, dict[str, str]]:
        return sample.body, {"Content-Type": sample.content_type}

    def check(self, head: bytes, body: bytes, sample: Sample, res: Result) -> None:
        _check(body, sample, res)


class _Target:
    """Where requests go and their bytes, built once per sample."""

    def __init__(self, url: str, samples: list[Sample], protocol: Protocol | None = None):
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.protocol = protocol or Classify()
        self.payloads = []
        for s in samples:
            body, headers = self.protocol.request(s)
            lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            self.payloads.append(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\n{lines}"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.samples = samples

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def send(self, conn: _Connection | None, i: int, res: Result, timeout: float, t0: float | None = None
                   ) -> _Connection | None:
        """Request i on `conn` (a new connection when None or closed); records the answer in `res`,
        its latency from t0 (default: now). Returns the connection, or None if it closed."""
        t0 = time.perf_counter() if t0 is None else t0
        try:
            if conn is None or conn.closed:
                conn = await self.connect()
            status, head, body, closed = await conn.exchange(self.payloads[i % len(self.payloads)], timeout)
        except OSError:
            status, head, body, closed = 0, b"", b"", True
        dt = time.perf_counter() - t0
        res.statuses[status] = res.statuses.get(status, 0) + 1
        if status == 503:
            res.refusals.append(dt)
            res.retry_after_seen += b"\r\nretry-after:" in head
        if status == 200:
            res.latencies.append(dt)
            self.protocol.check(head, body, self.samples[i % len(self.samples)], res)
        if closed and conn is not None:
            if conn.transport is not None:
                conn.transport.close()
            return None
        return conn


def _check(payload: bytes, sample: Sample, res: Result) -> None:
    try:
        body = json.loads(payload)
    except ValueError:
        return
    if "batch_size" in body:
        res.batch_sizes.append(body["batch_size"])
    for k in STAGES:
        if k in body:
            res.stages.setdefault(k, []).append(body[k])
    if sample.label is not None and body.get("predictions"):
        res.checked += 1
        res.correct += body["predictions"][0]["label"] == sample.label


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def closed_loop(url: str, samples: list[Sample], concurrency: int, *, requests: int | None = None,
                      duration: float | None = None, timeout: float = 60.0, warmup: int = 0,
                      protocol: Protocol | None = None) -> Result:
    """`concurrency` clients, each on its own connection, sending its next request when the last one
    is answered; for `duration` seconds or `requests` requests in all. `protocol`: Classify() when None."""
    target, res = _Target(url, samples, protocol), Result()
    scratch, conns = Result(), [None] * concurrency
    for i in range(warmup):
        conns[i % concurrency] = await target.send(conns[i % concurrency], i, scratch, timeout)
    counter = iter(range(10**12))
    cpu0, start = _cpu(), time.perf_counter()
    deadline = start + duration if duration else None

    async def client(cid: int) -> None:
        conn = conns[cid]
        while True:
            i = next(counter)
            if (requests is not None and i >= requests) or (deadline is not None and time.perf_counter() >= deadline):
                break
            conn = await target.send(conn, i, res, timeout)  # request i sends sample i mod n: each as often
        if conn is not None:
            conn.transport.close()

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    res.seconds = time.perf_counter() - start
    res.client_cpu = (_cpu() - cpu0) / res.seconds
    return res


async def poisson(url: str, samples: list[Sample], qps: float, duration: float, *, timeout: float = 30.0,
                  max_inflight: int = 1024, seed: int = 0, bound_s: float | None = None,
                  protocol: Protocol | None = None) -> Result:
    """Open loop: requests due at exponential intervals (rate `qps`) for `duration` seconds, on up to
    `max_inflight` connections; latency counts from each request's due time. A request that finds
    every connection busy waits for one, and that wait is in its latency."""
    target, res = _Target(url, samples, protocol), Result(bound_s=bound_s)
    rng = random.Random(seed)
    idle: asyncio.LifoQueue = asyncio.LifoQueue()
    opened, tasks = 0, set()

    async def one(i: int, due: float, conn) -> None:
        conn = await target.send(conn, i, res, timeout, t0=due)
        idle.put_nowait(conn)

    cpu0, start = _cpu(), time.perf_counter()
    due, i = start, 0
    while due - start < duration:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        if idle.empty() and opened < max_inflight:
            opened += 1
            conn = None  # connected by send, inside the request's time
        else:
            conn = await idle.get()
        t = asyncio.create_task(one(i, due, conn))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1
        due += rng.expovariate(qps)
    if tasks:
        await asyncio.gather(*tasks)
    res.seconds = time.perf_counter() - start
    res.client_cpu = (_cpu() - cpu0) / res.seconds
    while not idle.empty():
        conn = idle.get_nowait()
        if conn is not None:
            conn.transport.close()
    return res


def run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
