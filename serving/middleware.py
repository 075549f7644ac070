"""FrontDoor: the ASGI layer in front of BentoML's app, one per worker (added with BentoML's public
`add_asgi_middleware`).

- Overload: past `max_inflight` concurrent requests a worker answers 503 at once, with Retry-After,
  instead of queueing without bound; any other 503 gets Retry-After too.
- Parsing: POST /classify and /classify_batch are read, validated and preprocessed here
  (serving.http_io.parse). A bad request is answered with its 4xx JSON error right away and never
  waits in the batching queue. A good one goes on to BentoML's typed batchable API as a JSON body of
  ticket ids; its JSON answer comes back here and becomes the response of the HTTP contract.
- OpenAPI: /docs.json describes the real request bodies of /classify and /classify_batch (image upload,
  the backends of the registry), not the internal ticket form (serving/openapi.py).
"""
from __future__ import annotations

import json

from starlette.requests import ClientDisconnect, Request

from serving.catalog import RequestError
from serving.http_io import (ROUTES, TICKETS, _replay, batch_response, error_response, item_error, parse,
                             single_response)

SKIP = ("/metrics", "/livez", "/readyz", "/healthz", "/models")


class FrontDoor:
    def __init__(self, app, max_inflight: int, retry_after: int = 1):
        self.app, self.max_inflight, self.retry_after = app, max_inflight, retry_after
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(SKIP):
            return await self.app(scope, receive, send)
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            return await self._openapi(scope, receive, send)
        kind = ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
        if kind is None:
            return await self.app(scope, receive, self._with_retry_after(send))
        if self.inflight >= self.max_inflight:
            return await error_response(503, f"overloaded: {self.inflight} requests in flight in this worker; "
                                             f"retry after {self.retry_after} s")(scope, receive, send)
        self.inflight += 1
        try:
            await self._classify(kind, scope, receive, send)
        finally:
            self.inflight -= 1

    async def _classify(self, kind: str, scope, receive, send) -> None:
        try:
            items = await parse(Request(scope, receive), kind)
        except RequestError as e:
            return await error_response(e.status, e.message)(scope, receive, send)
        except ClientDisconnect:
            return  # nobody to answer
        good = [it for it in items if it.error is None]
        ids = TICKETS.issue(good)
        try:
            answers = await self._infer(scope, receive, ids) if ids else []
        finally:
            TICKETS.drop(ids)  # whatever the API did not take (a timeout, a failure)
        if isinstance(answers, tuple):  # BentoML answered with an error status of its own
            return await error_response(*answers)(scope, receive, send)
        it = iter(answers)
        results = [next(it) if item.error is None else item_error(item) for item in items]
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

    def _with_retry_after(self, send):
        async def wrapped(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(self.retry_after).encode()))
                message = dict(message, headers=headers)
            await send(message)
        return wrapped
