"""FrontDoor: the ASGI layer in front of BentoML's app, one per worker (added with BentoML's public
`add_asgi_middleware`).

- Every response carries an `X-Request-ID` (the client's, when it sent a sane one; else a new one),
  and each request is one line of the `lab.access` log with it (JSON with LAB_LOG_FORMAT=json).
- Every error answers JSON `{"error": ...}`: BentoML's and Starlette's plain-text ones (404 on an
  unknown path, 405, ...) are rewritten; any 503 gets Retry-After.
- Readiness: GET /readyz answers 503 with the reason while no model can be served (empty store, every
  backend refused, bad cards); models published later make it ready (serving/catalog.py reloads).
  Ready, it answers 200 {"ready": true, "guards": {...}}: the security guards and their state.
- Overload, bounded: past `max_inflight` requests in the worker, or `max_inflight_per_client` from one
  address, or the worker's budget of in-flight request bytes (serving/http_io.py), a request is
  answered 503 + Retry-After at once instead of queueing.
- Parsing: POST /classify and /classify_batch are read (within the read timeouts), validated and
  preprocessed here (serving.http_io.parse). A bad request is answered with its 4xx JSON error right
  away and never waits in the batching queue. A good one goes on to BentoML's typed batchable API as a
  JSON body of ticket ids; its JSON answer comes back here and becomes the response of the HTTP contract.
- OpenAPI: /docs.json describes the real request bodies of /classify and /classify_batch (image upload,
  the backends of the registry), not the internal ticket form (serving/openapi.py).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import time

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from lab import bentoml_compat
from serving import catalog as C
from serving.budget import Reservation
from serving.catalog import RequestError
from serving.config import Settings
from serving.http_io import (ROUTES, TICKETS, Overloaded, _replay, batch_response, error_response, header,
                             item_error, limits, parse, single_response)
from serving.metrics import count_error

SKIP = ("/metrics", "/livez", "/readyz", "/healthz", "/models")
QUIET = ("/metrics", "/livez", "/readyz", "/healthz")  # logged at DEBUG only
access_log = logging.getLogger("lab.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
QUEUE_FRACTION = 0.8  # of max_latency_ms: past it, a parsed request is answered 503 rather than queued


def request_id(scope) -> str:
    """The client's X-Request-ID when it is a sane one, else a fresh id."""
    value = header(scope, b"x-request-id")
    return value if value is not None and _REQUEST_ID.match(value) else secrets.token_hex(8)


class FrontDoor:
    def __init__(self, app, settings: Settings, retry_after: int = 1):
        self.app, self.settings, self.retry_after = app, settings, retry_after
        self.max_inflight = settings.max_inflight
        self.inflight = 0
        self.by_client: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        out = _Outgoing(send, rid, self.retry_after, jsonify=not scope["path"].startswith("/metrics"))
        try:
            await self._route(scope, receive, out)
        finally:
            self._log(scope, rid, out.status, (time.perf_counter() - t0) * 1000)

    async def _route(self, scope, receive, send):
        path, method = scope["path"], scope["method"]
        if path == "/readyz" and method in ("GET", "HEAD"):
            cat = C.CURRENT
            ok, why = (False, "the service is still starting") if cat is None else cat.servable()
            if not ok:
                return await error_response(503, f"not ready: {why}")(scope, receive, send)
            return await JSONResponse({"ready": True, "guards": bentoml_compat.GUARDS})(scope, receive, send)
        if path.startswith(SKIP):
            return await self.app(scope, receive, send)
        if path == "/docs.json" and method == "GET":
            return await self._openapi(scope, receive, send)
        kind = ROUTES.get(path) if method == "POST" else None
        if kind is None:
            return await self.app(scope, receive, send)
        client = scope["client"][0] if scope.get("client") else ""
        per_client = self.settings.max_inflight_per_client
        if self.inflight >= self.max_inflight:
            count_error(503, kind="overloaded")
            return await error_response(503, f"overloaded: {self.inflight} requests in flight in this worker; "
                                             f"retry after {self.retry_after} s", close=True)(scope, receive, send)
        if per_client and self.by_client.get(client, 0) >= per_client:
            count_error(503, kind="per_client")
            return await error_response(503, f"overloaded: {per_client} requests in flight from your address; "
                                             f"retry after {self.retry_after} s", close=True)(scope, receive, send)
        self.inflight += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        held = Reservation(limits(self.settings).request_bytes)
        try:
            await self._classify(kind, scope, receive, send, held)
        finally:
            held.release()
            self.inflight -= 1
            left = self.by_client.get(client, 1) - 1
            if left > 0:
                self.by_client[client] = left
            else:
                self.by_client.pop(client, None)

    async def _classify(self, kind: str, scope, receive, send, held: Reservation) -> None:
        try:
            items = await parse(scope, receive, kind, held)
        except RequestError as e:
            count_error(e.status, _query_backend(scope))
            return await error_response(e.status, e.message, close=e.status in (408, 413))(scope, receive, send)
        except Overloaded as e:
            count_error(503, _query_backend(scope), kind="memory" if "budget" in str(e) else "overloaded")
            return await error_response(503, f"overloaded: {e}; retry after {self.retry_after} s",
                                        close=True)(scope, receive, send)
        except ClientDisconnect:
            # Nobody to answer, but answer anyway (uvicorn drops it): BentoML's TimeoutMiddleware, around
            # this one, waits for a first message or LAB_TIMEOUT; a request that sends none would hold
            # its task that long, and a graceful shutdown with it. 499: nginx's "client closed request".
            return await error_response(499, "the client closed the connection before the whole request "
                                             "was read", close=True)(scope, receive, send)
        good = [it for it in items if it.error is None]
        if good:  # shed here, at once, what BentoML's batcher would shed after a wait (max_latency_ms)
            backlog = TICKETS.oldest_wait() + C.CURRENT.queue_seconds(len(TICKETS) + len(good), good[0].backend)
            if backlog > QUEUE_FRACTION * self.settings.max_latency_ms / 1000:
                count_error(503, good[0].backend, kind="queue_full")
                return await error_response(503, f"overloaded: the batching queue holds about {backlog:.1f} s of "
                                                 f"work; retry after {self.retry_after} s")(scope, receive, send)
        ids = TICKETS.issue(good)
        try:
            answers = await self._infer(scope, receive, ids) if ids else []
        finally:
            TICKETS.drop(ids)  # whatever the API did not take (a timeout, a failure)
        if isinstance(answers, tuple):  # BentoML answered with an error status of its own
            status, message = answers
            count_error(status, good[0].backend if good else None, kind="shed" if status == 503 else None)
            return await error_response(status, message)(scope, receive, send)
        it = iter(answers)
        results = [next(it) if item.error is None else item_error(item) for item in items]
        _count_results(items, results)
        response = single_response(results[0]) if kind == "single" else batch_response(results, items)
        await response(scope, receive, send)

    async def _infer(self, scope, receive, ids: list[str]):
        """Call BentoML's batchable API with the tickets; its list of results, or (status, message)."""
        body = json.dumps({"tickets": ids}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        inner = dict(scope, headers=headers)
        status, chunks = 500, []

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner, _replay(body, receive), capture)
        raw = b"".join(chunks)
        if status != 200:
            if status == 503:  # BentoML's dispatcher shed it: the batching queue is over its latency
                return 503, f"overloaded: the batching queue is full; retry after {self.retry_after} s"
            try:
                message = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace") or "inference failed"
            return status, str(message)
        return json.loads(raw)

    async def _openapi(self, scope, receive, send):
        from serving.openapi import describe_http_contract

        status, chunks, start = 200, [], None

        async def capture(message):
            nonlocal status, start
            if message["type"] == "http.response.start":
                status, start = message["status"], message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        raw = b"".join(chunks)
        if status == 200:
            raw = json.dumps(describe_http_contract(json.loads(raw))).encode()
        headers = [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    def _log(self, scope, rid: str, status: int, ms: float) -> None:
        path = scope["path"]
        level = logging.DEBUG if path.startswith(QUIET) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        client = scope["client"][0] if scope.get("client") else "-"
        access_log.log(level, '%s %s "%s %s" %d %.1f ms', rid, client, scope["method"], path, status, ms,
                       extra={"x_request_id": rid, "client": client, "method": scope["method"], "path": path,
                              "status": status, "ms": round(ms, 2)})


def _query_backend(scope) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("backend")
    return values[0] if values else "onnx"


def _count_results(items, results) -> None:
    from serving.metrics import metrics

    m = metrics()
    if m is None:
        return
    for item, r in zip(items, results):
        model = item.model.name if item.model is not None else ""
        backend = item.backend or ""
        m.requests.labels(model, backend, str(r["status"])).inc()
        if r["status"] != 200:
            count_error(r["status"], backend)


class _Outgoing:
    """The response channel of one request: adds X-Request-ID (and Retry-After to 503s), and turns a
    non-JSON error response (Starlette's plain-text 404/405, BentoML's) into {"error": "..."}."""

    def __init__(self, send, rid: str, retry_after: int, jsonify: bool):
        self.send, self.rid, self.retry_after, self.jsonify = send, rid.encode(), retry_after, jsonify
        self.status = 0
        self._held: dict | None = None  # the start of an error response being rewritten
        self._body: list[bytes] = []

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", self.rid))
            if self.status == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                headers.append((b"retry-after", str(self.retry_after).encode()))
            message = dict(message, headers=headers)
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            if self.jsonify and self.status >= 400 and not ctype.startswith(b"application/json"):
                self._held = message
                return
        elif kind == "http.response.body" and self._held is not None:
            self._body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            text = b"".join(self._body).decode("utf-8", "replace").strip()
            body = json.dumps({"error": text or _phrase(self.status)}).encode()
            headers = [(k, v) for k, v in self._held["headers"]
                       if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await self.send(dict(self._held, headers=headers))
            self._held = None
            message = {"type": "http.response.body", "body": body, "more_body": False}
        await self.send(message)


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
