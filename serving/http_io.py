"""The HTTP contract: requests read, validated and parsed into items (decoded images) for the
batching queue.

POST /classify        one image: the raw body (Content-Type image/* or application/octet-stream), or
                      multipart/form-data with one file in the field "image"
POST /classify_batch  multipart/form-data with one or more files in the field "images"; each image gets
                      its own entry (an answer, or an error naming what is wrong with that image)
Options, as query parameters (or multipart text fields): backend (a name of the registry, lab.backends),
model (name, or name:version), version, top_k.

The front door (serving/middleware.py) parses and preprocesses a request here before anything else:
every bad input gets its 4xx JSON error at once and never waits in the batching queue, size limits
apply before decoding, and nothing in a request ever becomes a file path or a URL to fetch. A parsed
request is a list of `Item`s, each a uint8 image at the model's size (or the error of that image),
which go to the batching queue (serving/batching.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import numpy as np
from starlette.requests import ClientDisconnect

from lab.preprocess import ImageError, decode_estimate, decode_opened, open_header
from serving import catalog as C
from serving.budget import BudgetExceeded, ByteBudget, Reservation
from serving.config import Settings

RAW_TYPES = ("image/", "application/octet-stream")
ROUTES = {"/classify": "single", "/classify_batch": "batch"}
BODY_COPIES = {"raw": 2, "multipart": 3}  # bytes a body costs while read and parsed, per byte received
DECODE_WAIT_S = 10.0  # longest an image waits for a decode slot or decode memory before 503
MAX_FIELDS, MAX_FIELD_BYTES = 16, 64 * 1024  # multipart text fields (backend, model, version, top_k)
# Decoded on the event loop, not in a thread: files up to this size whose header says at most this many
# pixels (a 32x32 JPEG decodes in about 100 us here; a hand-off to a thread and back alone costs 110-120 us,
# both printed by bench/serve_latency.py).
INLINE_MAX_FILE_BYTES, INLINE_MAX_PIXELS = 64 * 1024, 64 * 64


class Overloaded(Exception):
    """No room for this request now: 503 with Retry-After."""


class Limits:
    """This worker's budgets: request bytes (bodies, their copies, model inputs) and decode memory."""

    def __init__(self, settings: Settings):
        from lab.hardware import cores

        self.request_bytes = ByteBudget(settings.max_inflight_bytes, "in-flight request bytes")
        self.decode_bytes = ByteBudget(settings.max_decode_bytes, "decode memory")
        self.decode_slots = anyio.CapacityLimiter(cores())  # decodes at once: one per core


_limits: Limits | None = None


def limits(settings: Settings) -> Limits:
    global _limits
    if _limits is None:
        _limits = Limits(settings)
    return _limits


@dataclass(slots=True)
class Item:
    x: np.ndarray | None = None          # uint8 (H, W, C) at the model's size
    model: C.ServedModel | None = None
    backend: str = ""
    top_k: int = 3
    filename: str | None = None
    error: tuple[int, str] | None = None
    preprocess_ms: float = 0.0


# ---------------------------------------------------------------- reading


def header(scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def read_body(receive, scope, s: Settings, held: Reservation, copies: int) -> bytes:
    """The whole body, within s.max_body_bytes, s.read_timeout of silence and s.body_timeout in all.
    Every byte is reserved in the worker's request budget (times `copies`) before it is kept."""
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            size = int(declared)
            if size < 0:
                raise ValueError
        except ValueError:
            raise C.RequestError(400, "malformed Content-Length header") from None
        if size > s.max_body_bytes:
            raise C.RequestError(413, f"request body is {size} bytes; the limit is {s.max_body_bytes}")
        if not held.grow_to(copies * size):
            raise Overloaded("this worker holds as many request bytes as its memory budget allows")
    chunks, size = [], 0
    deadline = anyio.current_time() + s.body_timeout
    while True:
        wait = min(s.read_timeout, deadline - anyio.current_time())
        message = None
        if wait > 0:
            with anyio.move_on_after(wait):
                message = await receive()
        if message is None:
            raise C.RequestError(408, f"the request body stalled: nothing for {s.read_timeout:g} s, or not all of "
                                      f"it within {s.body_timeout:g} s")
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > s.max_body_bytes:
                raise C.RequestError(413, f"request body exceeds the limit of {s.max_body_bytes} bytes")
            if not held.grow_to(copies * size):
                raise Overloaded("this worker holds as many request bytes as its memory budget allows")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str, max_files: int) -> tuple[dict[str, str], list[tuple]]:
    """multipart/form-data -> (text fields, [(field, filename, bytes), ...]); for a worker thread.

    python-multipart's streaming parser (what Starlette uses) over the body in memory, with our limits:
    at most `max_files` file parts and MAX_FIELDS text fields of MAX_FIELD_BYTES, part headers bounded
    by the parser, nothing spooled to disk. Raises RequestError."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise C.RequestError(400, "malformed multipart body: the Content-Type has no boundary")
    fields: dict[str, str] = {}
    files: list[tuple] = []
    part: dict = {}
    view = memoryview(body)

    def on_part_begin():
        part.clear()
        part.update(headers={}, name=b"", value=b"", data=[], size=0, open=True)

    def on_header_field(data, start, end):
        part["name"] += bytes(data[start:end])

    def on_header_value(data, start, end):
        part["value"] += bytes(data[start:end])

    def on_header_end():
        part["headers"][part["name"].lower()] = part["value"]
        part["name"] = part["value"] = b""

    def on_headers_finished():
        _, opts = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["field"] = opts.get(b"name", b"").decode("utf-8", "replace")
        part["file"] = b"filename" in opts
        part["filename"] = opts.get(b"filename", b"").decode("utf-8", "replace") if part["file"] else None
        if part["file"] and len(files) >= max_files:
            raise C.RequestError(413, f"the request holds more than {max_files} files")
        if not part["file"] and len(fields) >= MAX_FIELDS:
            raise C.RequestError(400, f"the request holds more than {MAX_FIELDS} text fields")

    def on_part_data(data, start, end):
        part["size"] += end - start
        if not part["file"] and part["size"] > MAX_FIELD_BYTES:
            raise C.RequestError(413, f"a text field is over {MAX_FIELD_BYTES} bytes")
        part["data"].append(view[start:end] if data is body else bytes(data[start:end]))

    def on_part_end():
        blob = b"".join(part["data"])
        if part["file"]:
            files.append((part["field"], part["filename"], blob))
        else:
            fields.setdefault(part["field"], blob.decode("utf-8", "replace"))
        part["open"] = False

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
                     on_header_end=on_header_end, on_headers_finished=on_headers_finished, on_part_data=on_part_data,
                     on_part_end=on_part_end)
    try:
        parser = MultipartParser(boundary, callbacks, max_size=len(body) + 1)
        parser.write(body)
        parser.finalize()
    except C.RequestError:
        raise
    except MultipartParseError as e:
        raise C.RequestError(400, f"malformed multipart body: {e}") from None
    except Exception as e:
        raise C.RequestError(400, f"malformed multipart body: {type(e).__name__}: {e}") from None
    if part.get("open"):
        raise C.RequestError(400, "malformed multipart body: it ends inside a part (truncated?)")
    return fields, files


def _options(scope, form: dict[str, str] | None = None) -> dict[str, str]:
    from urllib.parse import parse_qsl

    opts = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    for k in ("backend", "model", "version", "top_k"):
        if form is not None and k in form:
            opts.setdefault(k, form[k])
    return opts


async def _resolve(cat: C.Catalog, opts: dict[str, str]) -> tuple[C.ServedModel, str, int]:
    name, version = opts.get("model") or None, opts.get("version") or None
    model = cat.loaded(name, version)
    if model is None:  # an older version, loaded once off the event loop
        model = await anyio.to_thread.run_sync(cat.load_version, name, version)
    backend = opts.get("backend") or model.default_backend(cat.settings.default_backend)
    cat.backend(model, backend)  # raises for unknown or refused backends
    try:
        top_k = int(opts.get("top_k", 3))
    except ValueError:
        raise C.RequestError(400, f"top_k must be an integer, got {opts.get('top_k')!r}") from None
    if not 1 <= top_k <= len(model.classes):
        raise C.RequestError(400, f"top_k must be in 1..{len(model.classes)}, got {top_k}")
    return model, backend, top_k


def _need(info, spec, budget: ByteBudget) -> int:
    """Decode memory an image needs (from its header); 413 when it alone is more than the budget."""
    need = decode_estimate(info, spec)
    if need > budget.capacity:
        raise ImageError(f"a {info.width}x{info.height} {info.format} image ({info.mode}) needs about "
                         f"{need >> 20} MiB to decode; this worker decodes at most {budget.capacity >> 20} MiB "
                         f"at once", status=413)
    return need


def _decode(data: bytes, spec, s: Settings, budget: ByteBudget) -> np.ndarray:
    """Header, memory estimate, reservation (waiting for room), decode to uint8 at the model's size:
    in a worker thread, never on the event loop."""
    img, info = open_header(data, s.max_pixels)
    need = _need(info, spec, budget)
    try:
        budget.take(need, DECODE_WAIT_S)
    except BudgetExceeded:
        raise Overloaded(f"no decode memory free within {DECODE_WAIT_S:g} s") from None
    return _decode_reserved(img, spec, budget, need)


def _decode_reserved(img, spec, budget: ByteBudget, need: int) -> np.ndarray:
    """Decode an image whose `need` bytes are reserved in `budget`; gives them back after."""
    try:
        return decode_opened(img, spec)
    finally:
        budget.give(need)


def _decode_inline(data: bytes, spec, s: Settings, budget: ByteBudget) -> np.ndarray | None:
    """Decode on the event loop when the file and the image are small (a thumbnail decodes in less
    time than a hand-off to a thread and back), with room in the budget now; None: use a thread."""
    if len(data) > INLINE_MAX_FILE_BYTES:
        return None
    img, info = open_header(data, s.max_pixels)
    if info.width * info.height > INLINE_MAX_PIXELS:
        return None
    need = _need(info, spec, budget)
    if not budget.try_take(need):
        return None
    return _decode_reserved(img, spec, budget, need)


async def _preprocess(data: bytes, model: C.ServedModel, where: str | None, s: Settings
                      ) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    lim = limits(s)
    try:
        x = _decode_inline(data, model.spec, s, lim.decode_bytes)
        if x is None:
            with anyio.move_on_after(DECODE_WAIT_S) as waited:
                await lim.decode_slots.acquire()
            if waited.cancelled_caught:
                raise Overloaded(f"no decode slot free within {DECODE_WAIT_S:g} s")
            try:
                x = await anyio.to_thread.run_sync(_decode, data, model.spec, s, lim.decode_bytes)
            finally:
                lim.decode_slots.release()
    except ImageError as e:
        raise C.RequestError(e.status, f"{where}: {e}" if where else str(e)) from None
    return x, (time.perf_counter() - t0) * 1000


def _safe_name(name: str | None, i: int) -> str:
    """The client's filename, for echoing back only: never used as a path."""
    name = (name or f"image{i}").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:120] or f"image{i}"


def content_type(scope) -> str:
    return (header(scope, b"content-type") or "").split(";")[0].strip().lower()


async def parse(scope, receive, kind: str, held: Reservation) -> list[Item]:
    """A request -> items ready for inference. Raises RequestError for what is wrong with the request,
    Overloaded when the worker has no room for it; in a batch, an image that cannot be read becomes an
    item with its own error. Everything the request holds is reserved in `held` first."""
    cat = C.CURRENT
    if cat is None:
        raise Overloaded("the service is still starting")
    s = cat.settings
    ctype = content_type(scope)
    if kind == "batch" and ctype != "multipart/form-data":
        raise C.RequestError(415, "a batch is multipart/form-data with one or more files in the field 'images'")
    if kind == "single" and ctype != "multipart/form-data" and not (ctype.startswith(RAW_TYPES) or ctype == ""):
        raise C.RequestError(415, f"unsupported Content-Type {ctype!r}: send the image bytes with an image/* "
                                  f"type, or multipart/form-data with a file field 'image'")
    multipart = ctype == "multipart/form-data"
    body = await read_body(receive, scope, s, held, BODY_COPIES["multipart" if multipart else "raw"])
    if not multipart:  # one raw image
        model, backend, top_k = await _resolve(cat, _options(scope))
        x, ms = await _preprocess(body, model, None, s)
        del body
        held.shrink_to(x.nbytes)
        return [Item(x=x, model=model, backend=backend, top_k=top_k, preprocess_ms=ms)]
    field = "image" if kind == "single" else "images"
    limit = 1 if kind == "single" else s.max_batch_images
    form, parts = await anyio.to_thread.run_sync(parse_multipart, body, header(scope, b"content-type") or "",
                                                 limit + 4)
    del body
    files = [(name, blob) for f, name, blob in parts if f == field]
    del parts
    if not files or (kind == "single" and len(files) != 1):
        raise C.RequestError(400, f"the request needs {'exactly one file' if kind == 'single' else 'files'} "
                                  f"in the multipart field {field!r}")
    if len(files) > limit:
        raise C.RequestError(413, f"the batch holds {len(files)} images; the limit is {limit}")
    model, backend, top_k = await _resolve(cat, _options(scope, form))
    items = []
    for i, (fname, blob) in enumerate(files):
        name = _safe_name(fname, i)
        where = f"image {i} ({name})" if kind == "batch" else None
        try:
            x, ms = await _preprocess(blob, model, where, s)
        except C.RequestError as e:
            if kind == "single":
                raise
            items.append(Item(filename=name, error=(e.status, e.message)))
            continue
        files[i] = (fname, b"")  # done with its bytes
        items.append(Item(x=x, model=model, backend=backend, top_k=top_k, filename=name, preprocess_ms=ms))
    del files
    # the body and its copies are gone: hold what the items hold (their model inputs), no less
    held.shrink_to(max(sum(it.x.nbytes for it in items if it.x is not None), 1))
    return items
