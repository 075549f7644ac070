"""The HTTP contract: request parsing into batchable items, and responses with proper status codes.

We parse requests ourselves (instead of BentoML's typed PIL/Path parameters) so every bad input gets a
4xx JSON error naming the problem, size limits apply before decoding, and nothing in a request ever
becomes a file path or a URL to fetch.

POST /classify        one image: the raw body (Content-Type image/* or application/octet-stream), or
                      multipart/form-data with one file in the field "image"
POST /classify_batch  multipart/form-data with one or more files in the field "images"
Options, as query parameters (or multipart text fields): backend (onnx | onnx_int8 | torch |
torch_bf16), model (name, or name:version), version, top_k.

Parsing happens in serving.middleware.FrontDoor, before BentoML: a request that fails is answered
there and never waits in the batching queue; one that succeeds reaches the batchable API as items.
"""
from __future__ import annotations

import time
import typing as t
from dataclasses import dataclass

import anyio
import bentoml
import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving import catalog as C
from serving.preprocess import ImageError, pixel_count, preprocess_bytes

INLINE_DECODE_PIXELS = 256 * 256  # smaller images decode on the event loop (cheaper than a thread hop)
RAW_TYPES = ("image/", "application/octet-stream")
ROUTES = {"/classify": "single", "/classify_batch": "batch"}
SCOPE_KEY = "lab.items"

_decode_slots: anyio.CapacityLimiter | None = None


def _decode_limiter() -> anyio.CapacityLimiter:
    """At most one big decode per core at a time: bounds the memory that large images can take."""
    global _decode_slots
    if _decode_slots is None:
        from serving.backends import default_threads

        _decode_slots = anyio.CapacityLimiter(default_threads())
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


async def _read_body(request: Request, limit: int) -> bytes:
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
    body = b"".join(chunks)
    request._body = body  # starlette re-reads this for request.form()
    return body


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


async def _form(request: Request, max_files: int):
    try:
        return await request.form(max_files=max_files, max_fields=16, max_part_size=64 * 1024)
    except Exception as e:  # starlette / python-multipart parse errors
        raise C.RequestError(400, f"malformed multipart body: {e}") from None


def _safe_name(upload: UploadFile, i: int) -> str:
    """The client's filename, for echoing back only: never used as a path."""
    name = (upload.filename or f"image{i}").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:120] or f"image{i}"


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse(request: Request, kind: str) -> list[Item]:
    """A request -> items ready for inference. Raises RequestError naming what is wrong."""
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
    body = await _read_body(request, s.max_body_bytes)
    if ctype != "multipart/form-data":  # one raw image
        model, backend, top_k = await _resolve(cat, _options(request))
        x, ms = await _preprocess(body, model, None, s.max_pixels)
        return [Item(x=x, model=model, backend=backend, top_k=top_k, preprocess_ms=ms,
                     ready_at=time.perf_counter())]
    field = "image" if kind == "single" else "images"
    limit = 1 if kind == "single" else s.max_batch_images
    form = await _form(request, max_files=4 * limit + 4)
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
        x, ms = await _preprocess(await f.read(), model, where, s.max_pixels)
        items.append(Item(x=x, model=model, backend=backend, top_k=top_k, filename=name, preprocess_ms=ms,
                          ready_at=time.perf_counter()))
    return items


async def items_for(request: Request, kind: str) -> list[Item]:
    """The items FrontDoor parsed for this request (or, without it, parsed here; errors as items)."""
    items = request.scope.get(SCOPE_KEY)
    if items is not None:
        return items
    try:
        return await parse(request, kind)
    except C.RequestError as e:
        return [Item(error=(e.status, e.message))]


def error_response(status: int, message: str) -> Response:
    resp = JSONResponse({"error": message}, status_code=status)
    if status == 503:
        resp.headers["Retry-After"] = "1"
    return resp


# ---------------------------------------------------------------- BentoML input/output specs


_OPTION_SCHEMA = {
    "backend": {"type": "string", "enum": ["onnx", "onnx_int8", "torch", "torch_bf16"], "default": "onnx"},
    "model": {"type": "string", "description": "model name, or name:version (default: the default model)"},
    "top_k": {"type": "integer", "minimum": 1, "default": 3},
}


class _Items(bentoml.IODescriptor):
    items: t.List[t.Any]
    form_schema: t.ClassVar[dict] = {}
    kind: t.ClassVar[str] = ""

    @classmethod
    def mime_type(cls) -> str:
        return "multipart/form-data"

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict:
        return {"type": "object", "title": cls.__name__, "properties": {**cls.form_schema, **_OPTION_SCHEMA}}

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> "_Items":
        return cls.model_construct(items=await items_for(request, cls.kind))


class SingleImageInput(_Items):
    kind: t.ClassVar[str] = "single"
    form_schema: t.ClassVar[dict] = {"image": {
        "type": "string", "format": "binary",
        "description": "the image file (or send the raw bytes as the body, Content-Type image/*)"}}


class BatchInput(_Items):
    kind: t.ClassVar[str] = "batch"
    form_schema: t.ClassVar[dict] = {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}


class SingleResult(bentoml.IODescriptor):
    @classmethod
    async def to_http_response(cls, obj, serde) -> Response:
        result = obj[0]
        if result["status"] != 200:
            return error_response(result["status"], result["body"]["error"])
        return JSONResponse(result["body"])


class BatchResult(bentoml.IODescriptor):
    @classmethod
    async def to_http_response(cls, obj, serde) -> Response:
        errors = [r for r in obj if r["status"] != 200]
        if errors:
            return error_response(errors[0]["status"], errors[0]["body"]["error"])
        first = obj[0]["body"]
        return JSONResponse({
            "model": first["model"], "backend": first["backend"],
            "inference_ms": max(r["body"]["inference_ms"] for r in obj),
            "results": [{k: r["body"][k] for k in ("filename", "predictions", "batch_size")} for r in obj]})
