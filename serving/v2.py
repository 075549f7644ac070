"""The Open Inference Protocol (KServe v2 REST, as Triton and OpenVINO Model Server speak it).

    GET  /v2                                         server metadata: name, version, extensions
    GET  /v2/health/live, /v2/health/ready           liveness; readiness, the same as /readyz
    GET  /v2/models/{name}[/versions/{v}]            model metadata: platform, inputs, outputs
    GET  /v2/models/{name}[/versions/{v}]/ready      200 while the model can answer
    GET  /v2/models/{name}[/versions/{v}]/config     Triton's model configuration (max_batch_size, dims)
    POST /v2/models/{name}[/versions/{v}]/infer      inference

One model name per stored model (its versions are the store's versions), as the store and /classify
name them; a request chooses the backend with `"parameters": {"backend": "onnx_int8"}`, `?backend=`
or an `X-Lab-Backend` header (perf_analyzer can set neither request parameters nor a query over
HTTP), and gets the model's default backend when it names none, exactly as /classify does.

A request sends exactly one of the model's three inputs, each read through the model's card:
  image       BYTES [N] or [N, 1]    encoded image files, decoded as /classify decodes them
  pixels      UINT8 [N, H, W, C]     pixels at the model's size, normalised by the card
  normalized  FP32  [N, C, H, W]     the model's input itself, as the card's preprocessing makes it ([N, H, W, C]
                                    for a model whose card says layout NHWC)
and gets `probabilities` (FP32 [N, K], softmax of the logits as /classify computes it) unless it asks
for outputs by name: `probabilities`, `logits`, either with `"parameters": {"classification": k}`
(BYTES [N, k], "score:index:label", best first). Tensors travel as JSON (`data`; BYTES elements
base64 in JSON) or in the binary tensor data extension: the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by each input's `binary_data_size` bytes (BYTES
elements each prefixed by its 4-byte little-endian length); outputs come back binary when asked
(`binary_data` on an output, `binary_data_output` on the request). No Content-Type is required.

The front door (serving/middleware.py) routes here: the same read limits, in-flight limits, byte
budget, LAB_TIMEOUT, batching queue and metrics as /classify. This module parses a request into model
inputs (`parse`), describes the models (`describe`) and writes the answers (`answer`); every error is a
RequestError, answered 4xx `{"error": "..."}`. Every size is checked before anything is allocated for
it: the body within LAB_MAX_BODY_BYTES and the request budget, the parsed JSON header reserved from its
bound (`json_cost`), at most LAB_MAX_BATCH_IMAGES images of the model's exact size.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import anyio
import numpy as np

from serving import catalog as C
from serving.budget import Reservation
from serving.http_io import Overloaded, _preprocess, header, read_body

SERVER_NAME = "image_classifier"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
INPUTS = ("image", "pixels", "normalized")
OUTPUTS = ("probabilities", "logits")
DATATYPES = {"image": "BYTES", "pixels": "UINT8", "normalized": "FP32"}
TRITON_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}
BACKEND_HEADER = b"x-lab-backend"


# ---------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    endpoint: str                  # server, live, ready, model, model_ready, config, infer
    model: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        """The route's template, for metrics (never the client's path)."""
        return {"server": "/v2", "live": "/v2/health/live", "ready": "/v2/health/ready",
                "model": "/v2/models/{name}", "model_ready": "/v2/models/{name}/ready",
                "config": "/v2/models/{name}/config", "infer": "/v2/models/{name}/infer"}[self.endpoint]


def route(path: str) -> Route | None:
    """A /v2 path -> its Route; None for a path the protocol does not have."""
    parts = path.rstrip("/").split("/")[1:]  # "/v2/models/m/infer" -> ["v2", "models", "m", "infer"]
    if not parts or parts[0] != "v2":
        return None
    rest = parts[1:]
    if not rest:
        return Route("server")
    if rest in (["health", "live"], ["health", "ready"]):
        return Route(rest[1])
    if len(rest) < 2 or rest[0] != "models" or not rest[1]:
        return None
    name, rest, version = rest[1], rest[2:], None
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version, rest = rest[1], rest[2:]
    if not rest:
        return Route("model", name, version)
    if len(rest) == 1 and rest[0] in ("ready", "config", "infer"):
        return Route({"ready": "model_ready"}.get(rest[0], rest[0]), name, version)
    return None


# ---------------------------------------------------------------- the GET endpoints


async def describe(r: Route) -> dict:
    """The answer of a GET endpoint (200). Raises RequestError (503 while not ready)."""
    if r.endpoint == "server":
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("model-lab")
        except PackageNotFoundError:
            v = "unknown"
        return {"name": SERVER_NAME, "version": v, "extensions": EXTENSIONS}
    if r.endpoint == "live":
        return {"live": True}
    cat = _catalog()
    if r.endpoint == "ready":
        ok, why = cat.servable()
        if not ok:
            raise C.RequestError(503, f"not ready: {why}")
        return {"ready": True}
    model = await _model(cat, r)
    if r.endpoint == "model_ready":
        return {"name": model.name, "version": _version(model), "ready": True}
    if r.endpoint == "config":
        return config(cat, model)
    return metadata(cat, model)


def _catalog() -> C.Catalog:
    if C.CURRENT is None:
        raise C.RequestError(503, "the service is still starting")
    return C.CURRENT


async def _model(cat: C.Catalog, r: Route) -> C.ServedModel:
    """The model a route names (404 for an unknown name or version), an older version loaded off the
    event loop the first time, as /classify does."""
    model = cat.loaded(r.model, r.version)
    if model is None:
        model = await anyio.to_thread.run_sync(cat.load_version, r.model, r.version)
    return model


def _version(model: C.ServedModel) -> str:
    return model.tag.split(":", 1)[1]


def _platform(backend: str) -> str:
    for prefix, platform in (("onnx", "onnxruntime_onnx"), ("openvino", "openvino"), ("torch", "pytorch")):
        if backend.startswith(prefix):
            return platform
    return backend


def _dims(model: C.ServedModel) -> dict[str, list[int]]:
    """Each input's and output's shape without the batch dimension."""
    spec = model.spec
    h, w = spec.size
    k = len(model.classes)
    return {"image": [1], "pixels": [h, w, spec.channels], "normalized": list(spec.input_shape),
            "probabilities": [k], "logits": [k]}


def metadata(cat: C.Catalog, model: C.ServedModel) -> dict:
    dims = _dims(model)
    default = model.default_backend(cat.settings.default_backend)
    versions = sorted(cat.index.get(model.name, {}).items(), key=lambda kv: -kv[1][1])  # newest first
    return {"name": model.name, "versions": [v for v, _ in versions] or [_version(model)],
            "platform": _platform(default),
            "inputs": [{"name": n, "datatype": DATATYPES[n], "shape": [-1, *dims[n]]} for n in INPUTS],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, *dims[n]]} for n in OUTPUTS],
            "parameters": {"version": _version(model), "backends": sorted(model.backends),
                           "default_backend": default, "labels": list(model.classes)}}


def config(cat: C.Catalog, model: C.ServedModel) -> dict:
    """Triton's model configuration, as JSON (what perf_analyzer reads first): every input optional,
    since a request sends exactly one of them."""
    dims = _dims(model)
    default = model.default_backend(cat.settings.default_backend)
    formats = {"image": "FORMAT_NONE", "pixels": "FORMAT_NHWC", "normalized": f"FORMAT_{model.spec.layout}"}
    return {"name": model.name, "platform": _platform(default), "backend": default,
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": cat.settings.max_batch_images,
            "input": [{"name": n, "data_type": TRITON_TYPES[DATATYPES[n]], "format": formats[n], "dims": dims[n],
                       "optional": True} for n in INPUTS],
            "output": [{"name": n, "data_type": "TYPE_FP32", "dims": dims[n], "label_filename": ""}
                       for n in OUTPUTS],
            "dynamic_batching": {"max_queue_delay_microseconds": cat.settings.batch_wait_ms * 1000},
            "parameters": {"default_backend": {"string_value": default},
                           "backends": {"string_value": ",".join(sorted(model.backends))}}}


# ---------------------------------------------------------------- an inference request


@dataclass
class Output:
    name: str                      # probabilities or logits
    binary: bool                   # in the binary tail, not in the JSON
    classification: int = 0        # k > 0: the top k as "score:index:label" (BYTES)


@dataclass
class Request:
    model: C.ServedModel
    backend: str
    images: list[tuple[np.ndarray, float]] | None   # each image's model input and its preprocessing ms
    outputs: list[Output] = field(default_factory=list)
    id: str | None = None


def json_cost(text: bytes) -> int:
    """An upper bound of the memory json.loads builds from `text`, counted before parsing it: at most
    64 bytes per list or object, 128 per value or key (a float is 24, a short str about 50, a dict slot
    and json's key memo less than the rest), plus 10 bytes per character (a string's text, UCS-4 at
    worst, and its copy while it is decoded). Measured (tracemalloc) on the worst inputs found, 0.8 to
    1.5 MB each: [{},...] 23 MB (bound 61), {"k000001":0,...} 16 (30), ["ab",...] 19 (44), one string
    with an emoji 8.0 (10)."""
    containers = text.count(b"[") + text.count(b"{")
    values = text.count(b",") + text.count(b":") + 1
    return 64 * containers + 128 * values + 10 * len(text)


async def parse(r: Route, scope, receive, held: Reservation) -> Request:
    """A POST .../infer request -> its model, backend, model inputs and requested outputs. Raises
    RequestError (4xx), Overloaded (503) or ClientDisconnect; every byte is reserved in `held` first."""
    cat = _catalog()
    s = cat.settings
    encoding = (header(scope, b"content-encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise C.RequestError(415, f"Content-Encoding {encoding!r} is not supported: send the request uncompressed")
    json_size = _header_length(scope)
    body = await read_body(receive, scope, s, held, copies=2)
    if json_size is None:
        json_size = len(body)
    if json_size > len(body):
        raise C.RequestError(400, f"Inference-Header-Content-Length is {json_size}, past the end of the "
                                  f"{len(body)}-byte body")
    head = body[:json_size]
    cost = json_cost(head)
    if cost > held.budget.capacity:
        raise C.RequestError(413, f"a JSON header of {json_size} bytes may take {cost >> 20} MiB to parse; this "
                                  f"worker holds at most {held.budget.capacity >> 20} MiB of requests")
    if not held.grow_to(held.held + cost):
        raise Overloaded("this worker holds as many request bytes as its memory budget allows")
    doc = _load(head)
    del head
    params = _object(doc.get("parameters", {}), "the request's parameters")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise C.RequestError(400, "the request's id must be a string")
    model = await _model(cat, r)
    backend = _backend(cat, model, params, scope)
    name, n, data, size = _input(doc, model, s.max_batch_images)
    outputs = _outputs(doc.get("outputs"), params, len(model.classes))
    tail = memoryview(body)[json_size:]
    if size is None and len(tail):
        raise C.RequestError(400, f"the body holds {len(tail)} bytes after its JSON header that no input claims "
                                  f"(binary_data_size)")
    if size is not None and size != len(tail):
        where = "past the end of the body" if size > len(tail) else f"and {len(tail) - size} bytes follow it"
        raise C.RequestError(400, f"input {name!r} declares binary_data_size {size}, {where} (the body holds "
                                  f"{len(tail)} bytes after its JSON header)")
    del doc
    if name == "image":
        files = _strings(data, n) if size is None else _bytes_elements(tail, n)
        del tail, body
        images = []
        for i in range(n):
            x, ms = await _preprocess(files[i], model, f"image {i}", s)
            files[i] = b""  # done with its bytes
            images.append((x, ms))
    else:
        dims = _dims(model)[name]
        x = _numbers(data, name, [n, *dims]) if size is None else _binary(tail, name, [n, *dims])
        del tail, body
        images = [(x[i], 0.0) for i in range(n)]
    # the body, its copy and the parsed header are gone: hold what the model inputs hold, no less
    held.shrink_to(max(sum(x.nbytes for x, _ in images), 1))
    return Request(model=model, backend=backend, images=images, outputs=outputs, id=request_id)


def _header_length(scope) -> int | None:
    value = header(scope, b"inference-header-content-length")
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        raise C.RequestError(400, f"malformed Inference-Header-Content-Length {value[:40]!r}") from None
    if n < 0:
        raise C.RequestError(400, f"Inference-Header-Content-Length is negative ({n})")
    return n


def _load(head: bytes) -> dict:
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise C.RequestError(400, f"the request's JSON header is not JSON: {e}") from None
    except (RecursionError, ValueError) as e:  # nested too deep, an integer of too many digits
        raise C.RequestError(400, f"the request's JSON header cannot be read: {type(e).__name__}: {e}") from None
    return _object(doc, "the request's JSON header")


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise C.RequestError(400, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _backend(cat: C.Catalog, model: C.ServedModel, params: dict, scope) -> str:
    """The backend the request names (request parameter, ?backend= or X-Lab-Backend; the same name
    twice is fine, two names are not; an empty one names none, as in /classify), else the model's
    default, exactly as /classify chooses it."""
    named = {"the parameter backend": params.get("backend"),
             "?backend=": dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get("backend"),
             "the X-Lab-Backend header": header(scope, BACKEND_HEADER)}
    given = {k: v for k, v in named.items() if v is not None and v != ""}
    for where, value in given.items():
        if not isinstance(value, str) or not value:
            raise C.RequestError(400, f"{where} must be a backend's name, got {value!r}")
    if len(set(given.values())) > 1:
        raise C.RequestError(400, "the backend is named twice, differently: " + ", ".join(
            f"{k} {v!r}" for k, v in given.items()))
    backend = next(iter(given.values())) if given else model.default_backend(cat.settings.default_backend)
    cat.backend(model, backend)  # 400 for an unknown backend, 404 for a refused one
    return backend


def _input(doc: dict, model: C.ServedModel, max_images: int) -> tuple[str, int, object, int | None]:
    """The one input: (name, images N, its JSON data or None, its binary_data_size or None), its
    name, datatype and shape checked against the model before anything is read from it."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise C.RequestError(400, f"send exactly one input, one of {', '.join(INPUTS)}; got "
                                  f"{len(inputs) if isinstance(inputs, list) else type(inputs).__name__}")
    tensor = _object(inputs[0], "an input")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in INPUTS:
        raise C.RequestError(400, f"unknown input {name!r}; model {model.name} has inputs {', '.join(INPUTS)}")
    if datatype != DATATYPES[name]:
        raise C.RequestError(400, f"input {name!r} is {DATATYPES[name]}, not {datatype!r}")
    if not isinstance(shape, list) or not shape or not all(type(d) is int for d in shape):
        raise C.RequestError(400, f"the shape of input {name!r} must be a list of integers, got {shape!r}"[:200])
    if any(d < 0 for d in shape):
        raise C.RequestError(400, f"the shape of input {name!r} has a negative dimension: {shape}"[:200])
    dims = _dims(model)[name]
    fits = (len(shape) in (1, 2) and shape[1:] in ([], [1])) if name == "image" else shape[1:] == dims
    if not fits:
        want = "[N] or [N, 1]" if name == "image" else str([-1, *dims]).replace("-1", "N")
        raise C.RequestError(400, f"input {name!r} of model {model.name} has shape {want}, not {shape}"[:200])
    n = shape[0]
    if n == 0:
        raise C.RequestError(400, f"input {name!r} holds no image (shape {shape})")
    if n > max_images:
        raise C.RequestError(413, f"input {name!r} holds {n} images; the limit is {max_images}")
    params = _object(tensor.get("parameters", {}), f"the parameters of input {name!r}")
    if any(k.startswith("shared_memory") for k in params):
        raise C.RequestError(400, "shared memory is not supported by this service: send the data in the request")
    size = params.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise C.RequestError(400, f"binary_data_size of input {name!r} must be a non-negative integer, "
                                  f"got {size!r}"[:200])
    has_data = "data" in tensor
    if has_data == (size is not None):
        raise C.RequestError(400, f"input {name!r} needs its tensor either in 'data' or as binary_data_size "
                                  f"bytes after the JSON header, {'not both' if has_data else 'and has neither'}")
    return name, n, tensor.get("data"), size


def _outputs(requested, params: dict, classes: int) -> list[Output]:
    """The outputs asked for (default: probabilities), each JSON or binary, plain or classification."""
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise C.RequestError(400, f"binary_data_output must be true or false, got {binary_all!r}"[:200])
    if requested is None or requested == []:
        return [Output("probabilities", binary_all)]
    if not isinstance(requested, list) or len(requested) > len(OUTPUTS):
        raise C.RequestError(400, f"outputs must be a list of at most {len(OUTPUTS)} of {', '.join(OUTPUTS)}")
    out, seen = [], set()
    for o in requested:
        o = _object(o, "an output")
        name = o.get("name")
        if name not in OUTPUTS:
            raise C.RequestError(400, f"unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}"[:200])
        if name in seen:
            raise C.RequestError(400, f"output {name!r} is asked for twice")
        seen.add(name)
        p = _object(o.get("parameters", {}), f"the parameters of output {name!r}")
        if any(k.startswith("shared_memory") for k in p):
            raise C.RequestError(400, "shared memory is not supported by this service")
        binary, k = p.get("binary_data", binary_all), p.get("classification", 0)
        if not isinstance(binary, bool):
            raise C.RequestError(400, f"binary_data of output {name!r} must be true or false")
        if type(k) is not int or not 0 <= k <= classes:
            raise C.RequestError(400, f"classification of output {name!r} must be an integer in 0..{classes}, "
                                      f"got {k!r}"[:200])
        out.append(Output(name, binary, k))
    return out


# ---------------------------------------------------------------- tensors


def _flat(data, depth: int, what: str) -> list:
    """A JSON tensor's elements in row-major order: a flat list, or lists nested at most `depth` deep."""
    if not isinstance(data, list):
        raise C.RequestError(400, f"the data of {what} must be a list, got {type(data).__name__}")
    out = []
    for x in data:
        if isinstance(x, list):
            if depth <= 1:
                raise C.RequestError(400, f"the data of {what} is nested deeper than its shape")
            out.extend(_flat(x, depth - 1, what))
        else:
            out.append(x)
    return out


def _strings(data, n: int) -> list[bytes]:
    """BYTES in JSON: each element an image file, base64-encoded."""
    items = _flat(data, 2, "input 'image'")
    if len(items) != n:
        raise C.RequestError(400, f"input 'image' has {len(items)} elements; its shape holds {n}")
    files = []
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise C.RequestError(400, f"element {i} of input 'image' must be a base64 string (an image file)")
        try:
            files.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise C.RequestError(400, f"element {i} of input 'image' is not base64 (in JSON, BYTES elements are "
                                      f"base64-encoded image files)") from None
    return files


def _bytes_elements(buf: memoryview, n: int) -> list[bytes]:
    """BYTES in binary: each element a 4-byte little-endian length, then that many bytes."""
    files, pos = [], 0
    while pos < len(buf):
        if len(files) == n:
            raise C.RequestError(400, f"input 'image' holds more than the {n} elements of its shape")
        if pos + 4 > len(buf):
            raise C.RequestError(400, f"element {len(files)} of input 'image' is cut inside its 4-byte length")
        size = int.from_bytes(buf[pos:pos + 4], "little")
        pos += 4
        if size > len(buf) - pos:
            raise C.RequestError(400, f"element {len(files)} of input 'image' declares {size} bytes, past the end "
                                      f"of its binary data ({len(buf) - pos} left)")
        files.append(bytes(buf[pos:pos + size]))
        pos += size
    if len(files) != n:
        raise C.RequestError(400, f"input 'image' has {len(files)} elements; its shape holds {n}")
    return files


def _numbers(data, name: str, shape: list[int]) -> np.ndarray:
    """UINT8 or FP32 in JSON -> the array, every value checked (numbers, in range, finite)."""
    count = math.prod(shape)
    items = _flat(data, len(shape), f"input {name!r}")
    if len(items) != count:
        raise C.RequestError(400, f"input {name!r} has {len(items)} values; its shape {shape} holds {count}")
    if not all(type(v) in (int, float) for v in items):  # bool, str, null, objects are not numbers
        raise C.RequestError(400, f"the data of input {name!r} must be numbers")
    try:
        a = np.array(items, dtype=np.float64)
    except (OverflowError, ValueError):
        raise C.RequestError(400, f"the data of input {name!r} holds a number out of range") from None
    return _checked(a.reshape(shape), name)


def _binary(buf: memoryview, name: str, shape: list[int]) -> np.ndarray:
    dtype = np.dtype("<u1" if name == "pixels" else "<f4")
    want = math.prod(shape) * dtype.itemsize
    if len(buf) != want:
        raise C.RequestError(400, f"input {name!r} of shape {shape} is {want} bytes of {DATATYPES[name]}; its "
                                  f"binary_data_size is {len(buf)}")
    return _checked(np.frombuffer(buf, dtype).reshape(shape).copy(), name)


def _checked(a: np.ndarray, name: str) -> np.ndarray:
    """pixels: integers 0..255 as uint8; normalized: finite float32."""
    if name == "pixels":
        if a.dtype != np.uint8:
            if not (np.all(a == np.floor(a)) and a.min() >= 0 and a.max() <= 255):
                raise C.RequestError(400, "the data of input 'pixels' must be integers in 0..255")
            a = a.astype(np.uint8)
        return a
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise C.RequestError(400, "the data of input 'normalized' must be finite numbers")
    return a


# ---------------------------------------------------------------- the answer


def answer(request: Request, results: list) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The response body and its headers, from each image's batching.Scores: JSON, or the JSON header
    and the binary outputs after it (with Inference-Header-Content-Length) when any output is binary."""
    model = request.model
    tensors = {"probabilities": np.stack([r.probabilities for r in results]).astype(np.float32),
               "logits": np.stack([r.logits for r in results]).astype(np.float32)}
    outputs, blobs = [], []
    for o in request.outputs:
        values = tensors[o.name]
        if o.classification:
            top = np.argsort(-values, axis=1, kind="stable")[:, :o.classification]  # ties: the lowest index first
            strings = [f"{np.format_float_positional(row[c], trim='-')}:{c}:{model.classes[c]}"
                       for row, order in zip(values, top) for c in order]
            out = {"name": o.name, "datatype": "BYTES", "shape": [len(values), o.classification]}
            if o.binary:
                blob = b"".join(len(e).to_bytes(4, "little") + e for e in (s.encode() for s in strings))
            else:
                out["data"] = strings
        else:
            out = {"name": o.name, "datatype": "FP32", "shape": list(values.shape)}
            if o.binary:
                blob = values.astype("<f4").tobytes()
            else:
                out["data"] = values.ravel().tolist()
        if o.binary:
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        outputs.append(out)
    doc = {"model_name": model.name, "model_version": _version(model), "outputs": outputs,
           "parameters": {"backend": request.backend}}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc).encode()
    if not blobs:
        return head, [(b"content-type", b"application/json")]
    return head + b"".join(blobs), [(b"content-type", b"application/octet-stream"),
                                    (b"inference-header-content-length", str(len(head)).encode())]
