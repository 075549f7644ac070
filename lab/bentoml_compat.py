"""The places where this project needs more than BentoML's public API; each behind a version check.

BentoML's public API covers almost everything here: models are created with `bentoml.models.create`,
found with `bentoml.models.get/list` by tag, and served by `bentoml serve` with the service's
lifecycle. It cannot do these things we need:

1. **All-or-nothing publishing.** `bentoml.models.create` copies the finished model into the store file by
   file (`shutil.copytree`), so a kill half-way leaves a half-model that `bentoml models list` shows.
   We let it create the model in a private staging store beside the real one (its `_model_store`
   argument, undocumented), then move the finished folder into the store with one `os.rename`.
2. **Guarded HTTP connections.** `bentoml serve` runs uvicorn with httptools and passes it only
   `timeout_keep_alive` and `timeout_graceful_shutdown` (_bentoml_impl/worker/service.py): no limit on
   the size or count of headers (one 128 MiB header was accepted), no timeout for a request's headers
   (a connection that sends half a header line is kept for ever), no cap on connections, and plain-text
   400s for malformed requests. uvicorn's own `limit_concurrency` and `h11_max_incomplete_event_size`
   cannot be passed through BentoML. We subclass uvicorn's httptools protocol (guard_http) and install
   it as uvicorn's "auto" HTTP protocol before the worker builds its uvicorn.Config.
3. **A request timer that outlives its request.** BentoML's TimeoutMiddleware (on every request; its
   `traffic.timeout` must be positive) schedules `loop.call_later(timeout, ...)` and never cancels it:
   each request leaves a timer, a future and a context alive for LAB_TIMEOUT (60 s) after it is
   answered. At 555 requests a second that is 33,000 of each; they reach the collector's oldest
   generation, whose collections then stalled every request for 30-100 ms every few seconds (measured
   here: open-loop p99 9.8x p50). cancel_request_timers installs the same middleware with the timer
   cancelled when the request is done (before the service's app is built).
4. **A front door in front of BentoML's per-request middlewares.** `add_asgi_middleware` puts a
   service's middleware inside BentoML's own: its HTTP metrics, OpenTelemetry, and the timeout
   middleware, which starts a task for every request. On the classify routes, which the front door
   answers itself, they cost about a fifth of a request's time with no model (docs/benchmarks.md).
   outermost() moves the named middleware to the front of the list BentoML's app is built from, so it
   sees each request first; everything it passes on goes through BentoML's middlewares as before. The
   front door then times and bounds its own routes (serving/middleware.py).

Each is checked against the pinned versions (TESTED, TESTED_UVICORN) and tests/test_bentoml_compat.py
fails on another version so that someone looks. The HTTP guard is a security guard: where it cannot
install itself (an untested uvicorn, no httptools) the service refuses to start, with one line naming
the versions, unless LAB_ALLOW_UNGUARDED=1 says to serve without it (logged, and shown by /readyz and
the lab_guard_active metric). The others step aside with one warning: publishing falls back to the
public, non-atomic `bentoml.models.create` (the service's sha256 check still protects it), request
timers stay alive as BentoML leaves them, and the front door stays inside BentoML's middlewares.

BentoML's adaptive-batching dispatcher is not used: the service batches in its own queue
(serving/batching.py), which measured faster (docs/serving.md, "Notes on BentoML").
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import bentoml

log = logging.getLogger("lab.bentoml_compat")
TESTED = ("1.4.40",)
TESTED_UVICORN = ("0.54.0",)
ALLOW_UNGUARDED = "LAB_ALLOW_UNGUARDED"
# guard -> "active: ..." or "OFF: why" for every guard installed (or allowed off) in this process
GUARDS: dict[str, str] = {}


class GuardUnavailable(SystemExit):
    """A security guard cannot install itself and LAB_ALLOW_UNGUARDED is not set: the service must not
    start. A SystemExit so that `bentoml serve` ends with this one line, not a traceback."""


def tested_version() -> bool:
    return bentoml.__version__ in TESTED


def _warn_untested(what: str) -> None:
    log.warning("bentoml %s is not a version this project tested (%s): %s", bentoml.__version__,
                ", ".join(TESTED), what)


# ---------------------------------------------------------------- 1. staged publishing


@contextmanager
def create_staged(name: str, labels: dict, metadata: dict, staging: Path):
    """`bentoml.models.create` into a private store under `staging`; yields the model being written.

    After the block, the finished model folder is `staging/store/<name>/<version>` (see staged_path).
    On an untested BentoML version the model goes straight into the real store (not atomic)."""
    if not tested_version():
        _warn_untested("publishing is not atomic")
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            yield model
        return
    from bentoml._internal.models.model import ModelStore

    with bentoml.models.create(name, labels=labels, metadata=metadata,
                               _model_store=ModelStore(staging / "store")) as model:
        yield model


def staged_path(staging: Path, tag) -> Path | None:
    """Where create_staged left the finished model, or None if it went straight into the store."""
    path = staging / "store" / tag.name / tag.version
    return path if path.is_dir() else None


def point_latest(name_dir: Path, version: str) -> None:
    """BentoML's `latest` pointer of a model name (a one-line file), replaced atomically."""
    tmp = name_dir / f".latest.{os.getpid()}"
    tmp.write_text(version)
    os.replace(tmp, name_dir / "latest")


# ---------------------------------------------------------------- 2. guarded HTTP connections


def guard_http(*, header_timeout: float, max_header_bytes: int, max_headers: int, max_connections: int,
               max_connections_per_client: int) -> type | None:
    """Install a guarded httptools protocol as uvicorn's "auto" HTTP protocol (what BentoML's workers
    use). Returns the installed class, or None where it stepped aside (untested versions, no httptools).

    A connection that has not sent a whole request line and headers within `header_timeout` seconds of
    opening (or of the first byte of its next request) is answered 408 and closed; an idle new
    connection is closed. Headers past `max_header_bytes` or `max_headers` fields: 431. Past
    `max_connections` open connections in this worker, or `max_connections_per_client` from one
    address (0: no limit), a new connection gets 503 and is closed. Every error the protocol itself
    writes (these, and uvicorn's 400 for a malformed request) is JSON: {"error": ...}."""
    import uvicorn
    from uvicorn.protocols.http import auto

    why = None
    HttpToolsProtocol = STATUS_LINE = None
    if not tested_version():  # the guard relies on how BentoML's worker builds uvicorn's Config
        why = f"bentoml {bentoml.__version__} is not a version this project tested ({', '.join(TESTED)})"
    elif uvicorn.__version__ not in TESTED_UVICORN:
        why = f"uvicorn {uvicorn.__version__} is not a version this project tested ({', '.join(TESTED_UVICORN)})"
    else:
        try:
            from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
        except ImportError:
            why = "httptools is not installed (uvicorn would use h11, without header timeouts or connection caps)"
    base = getattr(auto, "_lab_original_protocol", auto.AutoHTTPProtocol)
    if why is None and base is not HttpToolsProtocol:
        why = f"uvicorn's auto protocol is {base.__name__}, not httptools"
    if why is not None:
        return _unguarded("http", why)
    GUARDS["http"] = (f"active: headers within {header_timeout:g} s and {max_header_bytes} bytes, at most "
                      f"{max_headers} fields; {max_connections} connections, {max_connections_per_client or 'any'} "
                      f"per client address")
    open_by_client: dict[str, int] = {}  # one event loop per worker process: no lock needed

    class GuardedHttpToolsProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._lab_host = self.client[0] if self.client else ""
            self._lab_counted = False
            self._lab_timer = None
            self._lab_reject = None
            self._lab_in_head, self._lab_head_bytes, self._lab_fields, self._lab_field_bytes = True, 0, 0, 0
            n = open_by_client.get(self._lab_host, 0)
            if max_connections and len(self.connections) > max_connections:
                return self._lab_refuse(503, f"too many open connections to this worker (limit {max_connections})")
            if max_connections_per_client and n >= max_connections_per_client:
                return self._lab_refuse(503, f"too many open connections from your address "
                                             f"(limit {max_connections_per_client})")
            open_by_client[self._lab_host] = n + 1
            self._lab_counted = True
            self._lab_arm()

        def connection_lost(self, exc) -> None:
            if self._lab_counted:
                self._lab_counted = False
                left = open_by_client.get(self._lab_host, 1) - 1
                if left > 0:
                    open_by_client[self._lab_host] = left
                else:
                    open_by_client.pop(self._lab_host, None)
            self._lab_disarm()
            super().connection_lost(exc)

        # -- the head of each request: time and size
        def _lab_arm(self) -> None:
            if self._lab_timer is None:
                self._lab_timer = self.loop.call_later(header_timeout, self._lab_head_timeout)

        def _lab_disarm(self) -> None:
            if self._lab_timer is not None:
                self._lab_timer.cancel()
                self._lab_timer = None

        def _lab_head_timeout(self) -> None:
            self._lab_timer = None
            if not self._lab_in_head or self.transport.is_closing():
                return
            if self._lab_head_bytes == 0:
                self.transport.close()  # opened and never used
            else:
                self._lab_refuse(408, f"the request line and headers did not arrive within {header_timeout:g} s")

        def data_received(self, data: bytes) -> None:
            if self._lab_in_head:
                self._lab_arm()
                self._lab_head_bytes += len(data)
            super().data_received(data)
            if self._lab_in_head and self._lab_head_bytes > max_header_bytes and not self.transport.is_closing():
                self._lab_refuse(431, f"the request line and headers exceed {max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._lab_in_head, self._lab_fields, self._lab_field_bytes = True, 0, 0
            self._lab_arm()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._lab_fields += 1
            self._lab_field_bytes += len(name) + len(value)
            if self._lab_fields > max_headers:
                self._lab_reject = (431, f"more than {max_headers} header fields")
                raise ValueError(self._lab_reject[1])
            if self._lab_field_bytes > max_header_bytes:
                self._lab_reject = (431, f"the headers exceed {max_header_bytes} bytes")
                raise ValueError(self._lab_reject[1])
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._lab_in_head, self._lab_head_bytes = False, 0
            self._lab_disarm()
            super().on_headers_complete()

        # -- errors the protocol writes itself, as JSON
        def send_400_response(self, msg: str) -> None:
            status, text = self._lab_reject or (400, f"malformed HTTP request: {msg}")
            self._lab_reject = None
            self._lab_refuse(status, text)

        def _lab_refuse(self, status: int, message: str) -> None:
            self._lab_disarm()
            self._lab_in_head = False
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()  # a response is under way on this connection: just cut it
                return
            body = json.dumps({"error": message}).encode()
            head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
            if status == 503:
                head.append(b"retry-after: 1\r\n")
            self.transport.write(b"".join(head) + b"\r\n" + body)
            self.transport.close()

    auto._lab_original_protocol = base
    auto.AutoHTTPProtocol = GuardedHttpToolsProtocol
    return GuardedHttpToolsProtocol


def _unguarded(guard: str, why: str) -> None:
    """Refuse to go on without `guard` (GuardUnavailable), unless LAB_ALLOW_UNGUARDED=1 allows it."""
    if os.environ.get(ALLOW_UNGUARDED, "").strip() != "1":
        raise GuardUnavailable(
            f"error: the {guard} guard cannot install itself: {why}; the service will not start unguarded. "
            f"Install the locked environment (make setup), or set {ALLOW_UNGUARDED}=1 to serve without it")
    GUARDS[guard] = f"OFF ({ALLOW_UNGUARDED}=1): {why}"
    log.warning("serving WITHOUT the %s guard (%s=1): %s", guard, ALLOW_UNGUARDED, why)
    return None


# ---------------------------------------------------------------- 3. request timers


def cancel_request_timers() -> type | None:
    """Make BentoML's TimeoutMiddleware cancel its timer when the request is done (it answers 504 past
    the timeout, as before). Returns the installed class, or None on an untested BentoML."""
    if not tested_version():
        _warn_untested("each request's timeout timer stays alive for the whole timeout")
        return None
    import asyncio

    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    base = getattr(traffic, "_lab_original_timeout", traffic.TimeoutMiddleware)

    class CancellingTimeoutMiddleware(base):
        async def __call__(self, scope, receive, send) -> None:  # BentoML 1.4.40's, plus timer.cancel()
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

            async def _send(message) -> None:
                if not waiter.done():
                    waiter.set_result(None)
                await send(message)

            fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
            try:
                await waiter
            except asyncio.TimeoutError:
                if fut.cancel():
                    await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                       status_code=504)(scope, receive, send)
            else:
                await fut
            finally:
                timer.cancel()

    traffic._lab_original_timeout = base
    traffic.TimeoutMiddleware = CancellingTimeoutMiddleware
    return CancellingTimeoutMiddleware


# ---------------------------------------------------------------- 4. the front door first


def outermost(cls: type) -> bool:
    """Make the middleware `cls` (added with the service's add_asgi_middleware) the first a request meets,
    before BentoML's metrics, tracing and timeout middlewares (inside Starlette's error handler, which
    stays outermost). Returns whether it is in place; False on an untested BentoML, where `cls` stays
    where add_asgi_middleware put it."""
    if not tested_version():
        _warn_untested("the front door stays inside BentoML's per-request middlewares")
        return False
    from _bentoml_impl.server.app import ServiceAppFactory

    stock = getattr(ServiceAppFactory, "_lab_original_middlewares", ServiceAppFactory.middlewares)
    first = set(getattr(ServiceAppFactory, "_lab_first", ())) | {cls}

    def middlewares(self) -> list:
        stack = stock.fget(self)
        return [m for m in stack if m.cls in first] + [m for m in stack if m.cls not in first]

    ServiceAppFactory._lab_original_middlewares = stock
    ServiceAppFactory._lab_first = tuple(first)
    ServiceAppFactory.middlewares = property(middlewares)
    return True
