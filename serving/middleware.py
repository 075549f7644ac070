"""FrontDoor: the ASGI layer in front of BentoML's app, one per worker.

- Overload: past `max_inflight` concurrent requests a worker answers 503 at once, with Retry-After,
  instead of queueing without bound; any other 503 (a request that waited longer than the batching
  queue allows) gets Retry-After too.
- Parsing: POST /classify and /classify_batch are read, validated and preprocessed here
  (serving.http_io.parse). A bad request is answered with its 4xx JSON error right away and never
  waits in the batching queue; a good one continues to BentoML with its items in the ASGI scope.
"""
from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from serving.catalog import RequestError
from serving.http_io import ROUTES, SCOPE_KEY, error_response, parse

SKIP = ("/metrics", "/livez", "/readyz", "/healthz", "/docs", "/models")


class FrontDoor:
    def __init__(self, app, max_inflight: int, retry_after: int = 1):
        self.app, self.max_inflight, self.retry_after = app, max_inflight, retry_after
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(SKIP):
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:
            return await self._reply(scope, receive, send, 503, f"overloaded: {self.inflight} requests in flight "
                                                               f"in this worker; retry after {self.retry_after} s")
        self.inflight += 1
        try:
            kind = ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
            if kind is not None:
                try:
                    scope[SCOPE_KEY] = await parse(Request(scope, receive), kind)
                except RequestError as e:
                    return await self._reply(scope, receive, send, e.status, e.message)
                except ClientDisconnect:
                    return  # nobody to answer
                receive = _body_consumed(receive)
            await self.app(scope, receive, self._with_retry_after(send))
        finally:
            self.inflight -= 1

    async def _reply(self, scope, receive, send, status: int, message: str) -> None:
        await error_response(status, message)(scope, receive, send)

    def _with_retry_after(self, send):
        async def wrapped(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(self.retry_after).encode()))
                message = dict(message, headers=headers)
            await send(message)
        return wrapped


def _body_consumed(receive):
    """The body was read here: downstream gets an empty body, then the client's later messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return replay

