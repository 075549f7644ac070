"""FrontDoor: the ASGI layer in front of BentoML's app, one per worker (added with BentoML's public
`add_asgi_middleware`, and moved in front of BentoML's own per-request middlewares by
lab.bentoml_compat.outermost: what it answers itself never passes through them).

- Every response carries an `X-Request-ID` (the client's, when it sent a sane one; else a new one),
  and each request is one line of the `lab.access` log with it (JSON with LAB_LOG_FORMAT=json).
- Every error answers JSON `{"error": ...}`: BentoML's and Starlette's plain-text ones (404 on an
  unknown path, 405, ...) are rewritten; any 503 gets Retry-After.
- Readiness: GET /readyz answers 503 with the reason while no model can be served (empty store, every
  backend refused, bad cards); models published later make it ready (serving/catalog.py reloads).
  Ready, it answers 200 {"ready": true, "guards": {...}}: the security guards and their state.
- Overload, bounded: past `max_inflight` requests in the worker, or the worker's budget of in-flight
  request bytes (serving/http_io.py), a request is answered 503 + Retry-After at once instead of
  queueing. Past `max_inflight_per_client` from one address too, but only while the worker is at least
  half full: one client may use the room nobody else wants, and cannot take the last half of it.
- Classifying, one way through: POST /classify and /classify_batch are read (within the read
  timeouts), validated and preprocessed (serving/http_io.py), their images put in the batching queue of
  their (model, backend) (serving/batching.py; a full queue answers 503 + Retry-After), and the answers,
  typed, rendered as JSON by serving/schema.py. A bad request gets its 4xx JSON error right away and
  never waits in the queue. A classify request is answered within LAB_TIMEOUT (504 past it) and
  timed in lab_request_seconds. BentoML's app behind this door serves the rest: /models/, /metrics,
  /livez, the docs UI.
- The Open Inference Protocol (KServe v2 REST, serving/v2.py): its GET endpoints are answered here;
  POST /v2/models/{name}[/versions/{v}]/infer goes the way /classify goes, through the same limits,
  budget, timeout, queue and metrics: parsed into model inputs by serving/v2.py, queued, answered by
  serving/v2.py from each image's whole rows of logits and probabilities.
- Per-client limits key on the peer address, or, for a peer listed in LAB_TRUSTED_PROXIES, on the
  nearest address in its X-Forwarded-For that is not a trusted proxy.
- OpenAPI: /docs.json is generated from the answer types and the registry (serving/openapi.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import random
import time

from starlette.requests import ClientDisconnect

from lab import bentoml_compat
from serving import batching
from serving import catalog as C
from serving import v2
from serving.batching import ROWS, QueueFull
from serving.budget import Reservation
from serving.catalog import RequestError
from serving.config import Settings
from serving.http_io import ROUTES, Overloaded, header, limits, parse
from serving.metrics import count_error, observe_request
from serving.schema import ErrorAnswer, Failure, Prediction, batch_answer, render

SKIP = ("/metrics", "/livez", "/readyz", "/healthz", "/models")
QUIET = ("/metrics", "/livez", "/readyz", "/healthz", "/v2/health")  # logged at DEBUG only
access_log = logging.getLogger("lab.access")
_ids = random.Random()  # request ids name log lines, they guard nothing: no need for the OS's randomness
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(scope) -> str:
    """The client's X-Request-ID when it is a sane one, else a fresh id."""
    value = header(scope, b"x-request-id")
    return value if value is not None and _REQUEST_ID.match(value) else f"{_ids.getrandbits(64):016x}"


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
        path = scope["path"]
        protocol = path == "/v2" or path.startswith("/v2/")  # the Open Inference Protocol (serving/v2.py)
        route = v2.route(path) if protocol else None
        try:
            await self._route(scope, receive, out, protocol, route)
        finally:
            seconds = time.perf_counter() - t0
            self._log(scope, rid, out.status, seconds * 1000)
            # BentoML's middlewares, behind this one, time the other routes; a label is never the client's path
            label = path if path in ROUTES else route.label if route is not None else None
            if label is not None:
                observe_request(label, out.status, seconds)

    async def _route(self, scope, receive, send, protocol: bool = False, route: "v2.Route | None" = None):
        path, method = scope["path"], scope["method"]
        if path == "/readyz" and method in ("GET", "HEAD"):
            cat = C.CURRENT
            ok, why = (False, "the service is still starting") if cat is None else cat.servable()
            if not ok:
                return await respond(send, 503, f"not ready: {why}")
            return await respond_json(send, 200, json.dumps({"ready": True, "guards": bentoml_compat.GUARDS}))
        if path.startswith(SKIP):
            return await self.app(scope, receive, send)
        if path == "/docs.json" and method == "GET":
            from serving.openapi import document

            return await respond_json(send, 200, document())
        kind = ROUTES.get(path)
        if protocol:
            if route is None or route.endpoint != "infer":
                return await self._describe(route, scope, send)
            kind = "v2"
        if kind is None:
            return await self.app(scope, receive, send)
        if method != "POST":
            return await respond(send, 405, f"{method} is not allowed on {path}: use POST", allow=b"POST")
        client = client_address(scope, self.settings.trusted_proxies)
        per_client = self.settings.max_inflight_per_client
        if self.inflight >= self.max_inflight:
            count_error(503, kind="overloaded")
            return await respond(send, 503, f"overloaded: {self.inflight} requests in flight in this worker; "
                                            f"retry after {self.retry_after} s", close=True)
        if per_client and self.by_client.get(client, 0) >= per_client and 2 * self.inflight >= self.max_inflight:
            count_error(503, kind="per_client")
            return await respond(send, 503, f"overloaded: {per_client} requests in flight from your address; "
                                            f"retry after {self.retry_after} s", close=True)
        self.inflight += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        held = Reservation(limits(self.settings).request_bytes)
        try:
            # the whole request within LAB_TIMEOUT (one timer, no task of its own); an image still in
            # the queue then is dropped with its cancelled future, one being run is let finish
            async with asyncio.timeout(self.settings.timeout):
                if kind == "v2":
                    await self._infer_v2(route, scope, receive, send, held)
                else:
                    await self._classify(kind, scope, receive, send, held)
        except TimeoutError:
            count_error(504, _query_backend(scope))
            if not send.status:
                await respond(send, 504, f"not able to process the request in {self.settings.timeout} seconds",
                              close=True)
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
        except (RequestError, Overloaded, ClientDisconnect) as e:
            return await self._refuse(e, scope, send)
        good = [it for it in items if it.error is None]
        answers = []
        if good:
            try:
                futures = await self._submit(good[0].model, good[0].backend,
                                             [(it.x, it.top_k, it.preprocess_ms) for it in good])
            except QueueFull as e:
                return await self._refuse(e, scope, send, good[0].backend)
            for it in good:
                it.x = None  # the queue holds the image now
            answers = await _answers(futures)
        it = iter(answers)
        results = [next(it) if item.error is None else Failure(*item.error) for item in items]
        _count_results(items, results)
        if kind == "single":
            result = results[0]
            if isinstance(result, Failure):
                return await respond(send, result.status, result.error)
            result.filename = items[0].filename
            return await respond_json(send, 200, render(result))
        status, answer = batch_answer(results, [item.filename for item in items])
        await respond_json(send, status, render(answer))

    async def _infer_v2(self, route: "v2.Route", scope, receive, send, held: Reservation) -> None:
        """POST .../infer of the Open Inference Protocol: parsed into model inputs (serving/v2.py), queued
        with /classify's images, answered from each image's logits and probabilities."""
        try:
            request = await v2.parse(route, scope, receive, held)
        except (RequestError, Overloaded, ClientDisconnect) as e:
            return await self._refuse(e, scope, send)
        try:
            futures = await self._submit(request.model, request.backend,
                                         [(x, ROWS, ms) for x, ms in request.images])
        except QueueFull as e:
            return await self._refuse(e, scope, send, request.backend)
        request.images = None  # the queue holds them now
        results = await _answers(futures)
        failed = next((r for r in results if isinstance(r, Failure)), None)
        for r in results:
            _count(request.model.name, request.backend, r.status if isinstance(r, Failure) else 200)
        if failed is not None:  # an image shed past LAB_MAX_LATENCY_MS (503), a failed inference (500)
            return await respond(send, failed.status, failed.error)
        body, headers = v2.answer(request, results)
        await respond_bytes(send, 200, body, headers)

    async def _describe(self, route: "v2.Route | None", scope, send) -> None:
        """The GET endpoints of the Open Inference Protocol: metadata, health, readiness, config."""
        method = scope["method"]
        if route is None:
            return await respond(send, 404, f"{scope['path'][:200]} is not an endpoint of the Open Inference "
                                            f"Protocol (see GET /v2)")
        if method not in ("GET", "HEAD"):
            return await respond(send, 405, f"{method} is not allowed on {route.label}: use GET",
                                 allow=b"GET, HEAD")
        try:
            async with asyncio.timeout(self.settings.timeout):  # an older version loads the first time
                answer = await v2.describe(route)
        except RequestError as e:
            return await respond(send, e.status, e.message)
        except TimeoutError:
            return await respond(send, 504, f"not able to answer in {self.settings.timeout} seconds")
        await respond_json(send, 200, json.dumps(answer))

    async def _submit(self, model, backend: str, images: list[tuple]) -> list[asyncio.Future]:
        """Put a request's images in the batching queue of (model, backend): one future each. Raises
        QueueFull. A request alone in the worker may run its batch right here (serving/batching.py)."""
        batcher, alone = batching.CURRENT, False
        if self.inflight == 1 and batcher.inline_max_s > 0:
            # Two turns of the loop first: requests it has read meanwhile start (and count in
            # inflight), so only a request with none beside it runs on the loop (serving/batching.py).
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            alone = self.inflight == 1
        return batcher.submit(model, backend, images, alone=alone)

    async def _refuse(self, e: Exception, scope, send, backend: str | None = None) -> None:
        """The answer to a request that could not be parsed or queued, counted in lab_errors_total."""
        backend = backend or _query_backend(scope)
        if isinstance(e, RequestError):
            count_error(e.status, backend)
            return await respond(send, e.status, e.message, close=e.status in (408, 413))
        if isinstance(e, QueueFull):
            count_error(503, backend, kind="queue_full")
            return await respond(send, 503, f"overloaded: {e}; retry after {self.retry_after} s")
        if isinstance(e, Overloaded):
            count_error(503, backend, kind="memory" if "budget" in str(e) else "overloaded")
            return await respond(send, 503, f"overloaded: {e}; retry after {self.retry_after} s", close=True)
        # ClientDisconnect: nobody to answer, but the access log and the metrics get the request's end:
        # 499, nginx's "client closed request" (uvicorn drops what is sent on a closed connection).
        return await respond(send, 499, "the client closed the connection before the whole request was read",
                             close=True)

    def _log(self, scope, rid: str, status: int, ms: float) -> None:
        path = scope["path"]
        level = logging.DEBUG if path.startswith(QUIET) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        client = scope["client"][0] if scope.get("client") else "-"
        extra = ({"x_request_id": rid, "client": client, "method": scope["method"], "path": path,
                  "status": status, "ms": round(ms, 2)} if self.settings.log_format == "json" else None)
        access_log.log(level, '%s %s "%s %s" %d %.1f ms', rid, client, scope["method"], path, status, ms,
                       extra=extra)


def _query_backend(scope) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("backend")
    return values[0] if values else "onnx"


async def _answers(futures: list[asyncio.Future]) -> list:
    """Each image's answer from the batching queue (a Prediction, Scores or Failure), in order."""
    try:
        # one image: its own future (a gather costs a future and a turn of the loop more)
        return [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
    finally:
        for f in futures:
            f.cancel()  # the request has gone (a timeout): its images are not run


def _count_results(items, results) -> None:
    for item, r in zip(items, results):
        _count(item.model.name if item.model is not None else "", item.backend or "",
               200 if isinstance(r, Prediction) else r.status)


def _count(model: str, backend: str, status: int) -> None:
    """One image answered, in lab_requests_total."""
    from serving.metrics import metrics

    m = metrics()
    if m is None:
        return
    key = (model, backend, status)
    counter = _request_counters.get(key)
    if counter is None:
        counter = _request_counters[key] = m.requests.labels(key[0], key[1], str(key[2]))
    counter.inc()
    if status != 200:  # a 503 here is an image that waited past LAB_MAX_LATENCY_MS: shed
        count_error(status, backend, kind="shed" if status == 503 else None)


_request_counters: dict[tuple, object] = {}  # (model, backend, status) -> its child of lab_requests_total


def client_address(scope, trusted_proxies: tuple[str, ...]) -> str:
    """Who a request comes from, for per-client limits: the peer address; behind a trusted proxy, the
    nearest X-Forwarded-For address that is not itself a trusted proxy."""
    peer = scope["client"][0] if scope.get("client") else ""
    if peer not in trusted_proxies:
        return peer
    forwarded = header(scope, b"x-forwarded-for")
    for address in reversed([a.strip() for a in (forwarded or "").split(",") if a.strip()]):
        if address not in trusted_proxies:
            return address[:64]
    return peer


async def respond_json(send: "_Outgoing", status: int, body: bytes | str, close: bool = False,
                       allow: bytes = b"") -> None:
    """A whole JSON response of the front door's own, with its X-Request-ID (and Retry-After on a 503)."""
    body = body.encode() if isinstance(body, str) else body
    await respond_bytes(send, status, body, [(b"content-type", b"application/json")], close, allow)


async def respond_bytes(send: "_Outgoing", status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                        close: bool = False, allow: bytes = b"") -> None:
    """A whole response of the front door's own: `headers` (its content-type among them), and its
    length, X-Request-ID (and Retry-After on a 503)."""
    headers = [*headers, (b"content-length", str(len(body)).encode()), (b"x-request-id", send.rid)]
    if status == 503:
        headers.append((b"retry-after", str(send.retry_after).encode()))
    if allow:
        headers.append((b"allow", allow))
    if close:  # the rest of the request is not read: do not keep the connection for another one
        headers.append((b"connection", b"close"))
    send.status = status
    await send.send({"type": "http.response.start", "status": status, "headers": headers})
    await send.send({"type": "http.response.body", "body": body})


async def respond(send, status: int, message: str, close: bool = False, allow: bytes = b"") -> None:
    """An error answer: {"error": message}."""
    await respond_json(send, status, render(ErrorAnswer(error=message)), close, allow)


class _Outgoing:
    """The response channel of one request, for the responses of the app behind the front door: adds
    X-Request-ID (and Retry-After to 503s), and turns a non-JSON error response (Starlette's plain-text
    404/405, BentoML's) into {"error": "..."}. The front door's own responses (respond_json) go
    straight to `send`."""

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
