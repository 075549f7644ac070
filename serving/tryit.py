"""The try-it page: GET / serves a page (serving/static/) that classifies images through the public HTTP
API, and BentoML's own Swagger UI moves to GET /docs.

Added to the service with BentoML's public `add_asgi_middleware` (serving/service.py), so it runs in the
same process and on the same port as the API. The page is plain HTML, CSS and JavaScript: no build step,
nothing fetched from another host. It calls only POST /classify, POST /classify_batch and GET /models/,
the way any client would, so it is also a live example of the API.

Every file served here is read once at import from serving/static/ into a fixed table; a request path is
only a key into that table and never becomes a file path.
"""
from __future__ import annotations

import mimetypes
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/tryit/"        # the page's assets: /tryit/tryit.js, /tryit/samples/cat.jpg, ...
DOCS = ("/docs", "/docs/")  # BentoML's Swagger UI (its index page, which the try-it page replaces at /)
# The page talks to this origin only; images the user picks are shown from blob: URLs.
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".json": "application/json", ".jpg": "image/jpeg",
         ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon"}


def _load(root: Path) -> dict[str, tuple[bytes, str]]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            ctype = TYPES.get(p.suffix) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
            files[PREFIX + p.relative_to(root).as_posix()] = (p.read_bytes(), ctype)
    if PREFIX + "index.html" in files:
        files["/"] = files[PREFIX + "index.html"]
    return files


FILES = _load(STATIC)


class TryIt:
    """ASGI middleware: GET/HEAD / and /tryit/* from FILES; /docs -> BentoML's index page; the rest passes."""

    def __init__(self, app, files: dict[str, tuple[bytes, str]] | None = None):
        self.app = app
        self.files = FILES if files is None else files

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in DOCS:
            # BentoML's Swagger UI; its assets are relative (./static_content/...), so they resolve from /docs
            return await self.app(dict(scope, path="/", raw_path=b"/"), receive, send)
        if path == "/" or path.startswith(PREFIX):
            return await self._file(path, scope["method"] == "HEAD", send)
        return await self.app(scope, receive, send)

    async def _file(self, path: str, head: bool, send) -> None:
        found = self.files.get(path)
        body, ctype, status = (found[0], found[1], 200) if found else (b'{"error": "not found"}', "application/json", 404)
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]
        if ctype.startswith("text/html"):
            headers.append((b"content-security-policy", CSP.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
