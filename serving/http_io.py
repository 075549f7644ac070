"""The HTTP contract: request parsing into batchable items, and responses with proper status codes.

We parse requests ourselves (instead of BentoML's typed PIL/Path parameters) so every bad input gets a
4xx JSON error naming the problem, size limits apply before decoding, and nothing in a request ever
becomes a file path or a URL to fetch.

POST /classify        one image: the raw body (Content-Type image/* or application/octet-stream), or
                      multipart/form-data with one file in the field "image"
POST /classify_batch  multipart/form-data with one or more files in the field "images"
Options, as query parameters (or multipart text fields): backend (onnx | onnx_int8 | torch |
torch_bf16), model (name, or name:version), version, top_k.

A request that fails parsing still becomes an item (carrying its error), so that it flows through the
same batchable API and its error leaves with its own status code.
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
from serving.preprocess import ImageError, preprocess_bytes

INLINE_DECODE_BYTES = 64 * 1024  # smaller images are decoded on the event loop (cheaper than a thread hop)
RAW_TYPES = ("image/", "application/octet-stream")


@dataclass
class Item:
    x: np.ndarray | None = None     # float32 (C, H, W)
    model: str = ""                 # tag
    backend: str = ""
    top_k: int = 3
    filename: str | None = None
    error: tuple[int, str] | None = None
    preprocess_ms: float = 0.0


def _error(status: int, message: str) -> Item:
    return Item(error=(status, message))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise C.RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
        except ValueError:
            raise C.RequestError(400, "malformed Content-Length header") from None
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
    opts = {k: v for k, v in request.query_params.items()}
    if form is not None:
        for k in ("backend", "model", "version", "top_k"):
            v = form.get(k)
            if isinstance(v, str):
                opts.setdefault(k, v)
    return opts


def _resolve(opts: dict[str, str]) -> tuple[C.ServedModel, str, int]:
    cat = C.CURRENT
    if cat is None:
        raise C.RequestError(503, "the service is still starting")
    model = cat.resolve(opts.get("model") or None, opts.get("version") or None)
    backend = opts.get("backend") or "onnx"
    cat.backend(model, backend)  # raises for unknown or refused backends
    try:
        top_k = int(opts.get("top_k", 3))
    except ValueError:
        raise C.RequestError(400, f"top_k must be an integer, got {opts.get('top_k')!r}") from None
    if not 1 <= top_k <= len(model.classes):
        raise C.RequestError(400, f"top_k must be in 1..{len(model.classes)}, got {top_k}")
    return model, backend, top_k


async def _preprocess(data: bytes, model: C.ServedModel, filename: str | None) -> tuple[np.ndarray, float]:
    settings = C.CURRENT.settings
    t0 = time.perf_counter()
    try:
        if len(data) <= INLINE_DECODE_BYTES:
            x = preprocess_bytes(data, model.spec, settings.max_pixels)
        else:  # big images decode off the event loop
            x = await anyio.to_thread.run_sync(preprocess_bytes, data, model.spec, settings.max_pixels)
    except ImageError as e:
        where = f"{filename}: " if filename else ""
        raise C.RequestError(e.status, f"{where}{e}") from None
    return x, (time.perf_counter() - t0) * 1000


async def _form(request: Request, max_files: int):
    try:
        return await request.form(max_files=max_files, max_fields=16, max_part_size=64 * 1024)
    except Exception as e:  # starlette/python-multipart parse errors
        raise C.RequestError(400, f"malformed multipart body: {e}") from None


def _safe_name(upload: UploadFile, i: int) -> str:
    """The client's filename, for echoing back only: never used as a path."""
    name = (upload.filename or f"image{i}").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:120] or f"image{i}"


async def parse_single(request: Request) -> list[Item]:
    settings = C.CURRENT.settings if C.CURRENT else None
    if settings is None:
        return [_error(503, "the service is still starting")]
    try:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request, settings.max_body_bytes)
        if ctype == "multipart/form-data":
            form = await _form(request, max_files=1)
            files = [v for v in form.getlist("image") if isinstance(v, UploadFile)]
            if len(files) != 1:
                raise C.RequestError(400, "multipart request needs exactly one file in the field 'image'")
            model, backend, top_k = _resolve(_options(request, form))
            data, filename = await files[0].read(), _safe_name(files[0], 0)
        elif ctype.startswith(RAW_TYPES) or ctype == "":
            model, backend, top_k = _resolve(_options(request))
            data, filename = body, None
        else:
            raise C.RequestError(415, f"unsupported Content-Type {ctype!r}: send the image bytes with an "
                                      f"image/* type, or multipart/form-data with a file field 'image'")
        x, ms = await _preprocess(data, model, filename)
        return [Item(x=x, model=model.tag, backend=backend, top_k=top_k, filename=filename, preprocess_ms=ms)]
    except C.RequestError as e:
        return [_error(e.status, e.message)]


async def parse_batch(request: Request) -> list[Item]:
    settings = C.CURRENT.settings if C.CURRENT else None
    if settings is None:
        return [_error(503, "the service is still starting")]
    try:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise C.RequestError(415, "a batch is multipart/form-data with one or more files in the field 'images'")
        await _read_body(request, settings.max_body_bytes)
        form = await _form(request, max_files=settings.max_batch_images + 1)
        files = [v for v in form.getlist("images") if isinstance(v, UploadFile)]
        if not files:
            raise C.RequestError(400, "the batch holds no files in the field 'images'")
        if len(files) > settings.max_batch_images:
            raise C.RequestError(413, f"the batch holds {len(files)} images; the limit is {settings.max_batch_images}")
        model, backend, top_k = _resolve(_options(request, form))
        items = []
        for i, f in enumerate(files):
            name = _safe_name(f, i)
            x, ms = await _preprocess(await f.read(), model, f"image {i} ({name})")
            items.append(Item(x=x, model=model.tag, backend=backend, top_k=top_k, filename=name,
                              preprocess_ms=ms))
        return items
    except C.RequestError as e:
        return [_error(e.status, e.message)]


# ---------------------------------------------------------------- BentoML input/output specs


class _Items(bentoml.IODescriptor):
    items: t.List[t.Any]

    @classmethod
    def mime_type(cls) -> str:
        return "multipart/form-data"

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict:
        return {"type": "object", "title": cls.__name__, "properties": cls._form_schema()}


_OPTION_SCHEMA = {
    "backend": {"type": "string", "enum": ["onnx", "onnx_int8", "torch", "torch_bf16"], "default": "onnx"},
    "model": {"type": "string", "description": "model name, or name:version (default: the default model)"},
    "top_k": {"type": "integer", "minimum": 1, "default": 3},
}


class SingleImageInput(_Items):
    @classmethod
    def _form_schema(cls) -> dict:
        return {"image": {"type": "string", "format": "binary",
                          "description": "the image file (or send the raw bytes as the body, "
                                         "Content-Type image/*)"}, **_OPTION_SCHEMA}

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> "SingleImageInput":
        return cls.model_construct(items=await parse_single(request))


class BatchInput(_Items):
    @classmethod
    def _form_schema(cls) -> dict:
        return {"images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                **_OPTION_SCHEMA}

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> "BatchInput":
        return cls.model_construct(items=await parse_batch(request))


def _json(body: dict, status: int) -> Response:
    resp = JSONResponse(body, status_code=status)
    if status == 503:
        resp.headers["Retry-After"] = "1"
    return resp


class SingleResult(bentoml.IODescriptor):
    @classmethod
    async def to_http_response(cls, obj, serde) -> Response:
        result = obj[0]
        return _json(result["body"], result["status"])


class BatchResult(bentoml.IODescriptor):
    @classmethod
    async def to_http_response(cls, obj, serde) -> Response:
        errors = [r for r in obj if r["status"] != 200]
        if errors:
            return _json(errors[0]["body"], errors[0]["status"])
        first = obj[0]["body"]
        body = {"model": first["model"], "backend": first["backend"],
                "inference_ms": max(r["body"]["inference_ms"] for r in obj),
                "results": [{k: r["body"][k] for k in ("filename", "predictions", "batch_size")} for r in obj]}
        return _json(body, 200)

