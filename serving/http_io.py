"""The HTTP contract: requests parsed into items, items handed to the batchable API by ticket, and
the answers turned into responses with proper status codes.

POST /classify        one image: the raw body (Content-Type image/* or application/octet-stream), or
                      multipart/form-data with one file in the field "image"
POST /classify_batch  multipart/form-data with one or more files in the field "images"; each image gets
                      its own entry (an answer, or an error naming what is wrong with that image)
Options, as query parameters (or multipart text fields): backend (a name of the registry, lab.backends),
model (name, or name:version), version, top_k.

The front door (serving/middleware.py) parses and preprocesses a request before BentoML sees it: every
bad input gets its 4xx JSON error at once and never waits in the batching queue, size limits apply
before decoding, and nothing in a request ever becomes a file path or a URL to fetch. A parsed request
becomes tickets: its items wait in this worker's `TICKETS` table, and BentoML's typed, batchable API
(`classify(tickets: list[str]) -> list[dict]`, serving/service.py) is called with their ids as JSON, so
BentoML batches many requests' tickets into one inference call through its public API.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import anyio
import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lab.preprocess import ImageError, pixel_count, preprocess_bytes
from serving import catalog as C

INLINE_DECODE_PIXELS = 256 * 256  # smaller images decode on the event loop (cheaper than a thread hop)
RAW_TYPES = ("image/", "application/octet-stream")
ROUTES = {"/classify": "single", "/classify_batch": "batch"}

_decode_slots: anyio.CapacityLimiter | None = None


def _decode_limiter() -> anyio.CapacityLimiter:
    """At most one big decode per core at a time: bounds the memory that large images can take."""
    global _decode_slots
    if _decode_slots is None:
        from lab.hardware import cores

        _decode_slots = anyio.CapacityLimiter(cores())
    return _decode_slots


@dataclass
class Item:
    x: np.ndarray | None = None          # float32 (C, H, W)
    model: C.ServedModel | None = None
    backend: str = ""
    top_k: int = 3
    filename: str | None = None
    error: tuple[int, str] | None = None
    preprocess_ms: float = 0.0
    ready_at: float = 0.0                # perf_counter() when it joined the batching queue


class Tickets:
    """Items parsed by the front door, waiting for the batchable API to take them (one table per worker)."""

    def __init__(self):
        self._items: dict[str, Item] = {}

    def issue(self, items: list[Item]) -> list[str]:
        ids = [secrets.token_hex(12) for _ in items]
        self._items.update(zip(ids, items))
        return ids

    def take(self, ids: list[str]) -> list[Item | None]:
        """The items of these tickets (None for a ticket whose request has gone)."""
        return [self._items.pop(i, None) for i in ids]

    def drop(self, ids: list[str]) -> None:
        for i in ids:
            self._items.pop(i, None)

    def __len__(self) -> int:
        return len(self._items)


TICKETS = Tickets()


# ---------------------------------------------------------------- parsing


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise C.RequestError(400, "malformed Content-Length header") from None
        if size > limit:
            raise C.RequestError(413, f"request body is {size} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise C.RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _options(request: Request, form=None) -> dict[str, str]:
    opts = dict(request.query_params.items())
    if form is not None:
        for k in ("backend", "model", "version", "top_k"):
            v = form.get(k)
            if isinstance(v, str):
                opts.setdefault(k, v)
    return opts


async def _resolve(cat: C.Catalog, opts: dict[str, str]) -> tuple[C.ServedModel, str, int]:
    name, version = opts.get("model") or None, opts.get("version") or None
    model = cat.loaded(name, version)
    if model is None:  # an older version, loaded once off the event loop
        model = await anyio.to_thread.run_sync(cat.load_version, name, version)
    backend = opts.get("backend") or "onnx"
    cat.backend(model, backend)  # raises for unknown or refused backends
    try:
        top_k = int(opts.get("top_k", 3))
    except ValueError:
        raise C.RequestError(400, f"top_k must be an integer, got {opts.get('top_k')!r}") from None
    if not 1 <= top_k <= len(model.classes):
        raise C.RequestError(400, f"top_k must be in 1..{len(model.classes)}, got {top_k}")
    return model, backend, top_k


async def _preprocess(data: bytes, model: C.ServedModel, where: str | None, max_pixels: int
                      ) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    try:
        pixels = pixel_count(data)
        if pixels is None or pixels <= INLINE_DECODE_PIXELS:  # small, or no header: fails fast
            x = preprocess_bytes(data, model.spec, max_pixels)
        else:
            x = await anyio.to_thread.run_sync(preprocess_bytes, data, model.spec, max_pixels,
                                               limiter=_decode_limiter())
    except ImageError as e:
        raise C.RequestError(e.status, f"{where}: {e}" if where else str(e)) from None
    return x, (time.perf_counter() - t0) * 1000


def _replay(body: bytes, receive):
    """A receive channel that yields `body` once, then the client's later messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _form(request: Request, body: bytes, max_files: int):
    replayed = Request(request.scope, _replay(body, request.receive))
    try:
        return await replayed.form(max_files=max_files, max_fields=16, max_part_size=64 * 1024)
    except Exception as e:  # starlette / python-multipart parse errors
        raise C.RequestError(400, f"malformed multipart body: {e}") from None


def _safe_name(upload: UploadFile, i: int) -> str:
    """The client's filename, for echoing back only: never used as a path."""
    name = (upload.filename or f"image{i}").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:120] or f"image{i}"


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse(request: Request, kind: str) -> list[Item]:
    """A request -> items ready for inference. Raises RequestError for what is wrong with the request;
    in a batch, an image that cannot be read becomes an item with its own error."""
    cat = C.CURRENT
    if cat is None:
        raise C.RequestError(503, "the service is still starting")
    s = cat.settings
    ctype = _content_type(request)
    if kind == "batch" and ctype != "multipart/form-data":
        raise C.RequestError(415, "a batch is multipart/form-data with one or more files in the field 'images'")
    if kind == "single" and ctype != "multipart/form-data" and not (ctype.startswith(RAW_TYPES) or ctype == ""):
        raise C.RequestError(415, f"unsupported Content-Type {ctype!r}: send the image bytes with an image/* "
                                  f"type, or multipart/form-data with a file field 'image'")
    body = await read_body(request, s.max_body_bytes)
    if ctype != "multipart/form-data":  # one raw image
        model, backend, top_k = await _resolve(cat, _options(request))
        x, ms = await _preprocess(body, model, None, s.max_pixels)
        return [Item(x=x, model=model, backend=backend, top_k=top_k, preprocess_ms=ms,
                     ready_at=time.perf_counter())]
    field = "image" if kind == "single" else "images"
    limit = 1 if kind == "single" else s.max_batch_images
    form = await _form(request, body, max_files=4 * limit + 4)
    files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
    if not files or (kind == "single" and len(files) != 1):
        raise C.RequestError(400, f"the request needs {'exactly one file' if kind == 'single' else 'files'} "
                                  f"in the multipart field {field!r}")
    if len(files) > limit:
        raise C.RequestError(413, f"the batch holds {len(files)} images; the limit is {limit}")
    model, backend, top_k = await _resolve(cat, _options(request, form))
    items = []
    for i, f in enumerate(files):
        name = _safe_name(f, i)
        where = f"image {i} ({name})" if kind == "batch" else None
        try:
            x, ms = await _preprocess(await f.read(), model, where, s.max_pixels)
        except C.RequestError as e:
            if kind == "single":
                raise
            items.append(Item(filename=name, error=(e.status, e.message)))
            continue
        items.append(Item(x=x, model=model, backend=backend, top_k=top_k, filename=name, preprocess_ms=ms,
                          ready_at=time.perf_counter()))
    return items


# ---------------------------------------------------------------- responses


def error_response(status: int, message: str) -> Response:
    resp = JSONResponse({"error": message}, status_code=status)
    if status == 503:
        resp.headers["Retry-After"] = "1"
    return resp


def item_error(item: Item) -> dict:
    return {"status": item.error[0], "body": {"error": item.error[1]}}


def single_response(result: dict) -> Response:
    if result["status"] != 200:
        return error_response(result["status"], result["body"]["error"])
    return JSONResponse(result["body"])


def batch_response(results: list[dict], items: list[Item]) -> Response:
    """One entry per image, in order. 200 when any image was classified; else the first image's error."""
    ok = [r for r in results if r["status"] == 200]
    if not ok:
        first = results[0]
        resp = error_response(first["status"], first["body"]["error"])
        resp.body = json.dumps({"error": first["body"]["error"], "results": [
            {"filename": it.filename, "error": r["body"]["error"], "status": r["status"]}
            for r, it in zip(results, items)]}).encode()
        resp.headers["content-length"] = str(len(resp.body))
        return resp
    first = ok[0]["body"]
    entries = []
    for r, it in zip(results, items):
        if r["status"] == 200:
            entries.append({k: r["body"][k] for k in ("filename", "predictions", "batch_size")})
        else:
            entries.append({"filename": it.filename, "error": r["body"]["error"], "status": r["status"]})
    return JSONResponse({"model": first["model"], "backend": first["backend"],
                         "inference_ms": max(r["body"]["inference_ms"] for r in ok),
                         "errors": len(results) - len(ok), "results": entries})
