"""Overload protection: past `max_inflight` concurrent requests a worker answers 503 at once, with
Retry-After, instead of queueing without bound; any other 503 (e.g. a request that waited longer
than the batching queue allows) gets Retry-After too."""
from __future__ import annotations

import json

SKIP = ("/metrics", "/livez", "/readyz", "/healthz", "/docs", "/docs.json", "/models")


class OverloadMiddleware:
    def __init__(self, app, max_inflight: int, retry_after: int = 1):
        self.app, self.max_inflight, self.retry_after = app, max_inflight, retry_after
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(SKIP):
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:
            body = json.dumps({"error": f"overloaded: {self.inflight} requests in flight in this worker; "
                                        f"retry after {self.retry_after} s"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(self.retry_after).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(self.retry_after).encode()))
                message = dict(message, headers=headers)
            await send(message)

        self.inflight += 1
        try:
            await self.app(scope, receive, send_with_retry_after)
        finally:
            self.inflight -= 1
