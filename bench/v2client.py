"""Open Inference Protocol (KServe v2) requests and answers for bench/loadgen.py: load any v2 server.

    proto = V2(input="image", binary=True, labels=classes)         # BYTES image, binary tensors
    res = run(closed_loop(f"{url}/v2/models/{name}/infer", samples, 64, duration=10, protocol=proto))
    res.correct / res.checked                                       # top-1 under load

`V2.request(sample)` builds one inference request for one image, once per sample:
  input  `image`:  BYTES [1], the image file as it is on disk; binary (the JSON header, then the element
                   as a 4-byte little-endian length and the file, with `Inference-Header-Content-Length`)
                   or JSON (the file base64-encoded in `data`, as tritonclient and this service read it)
         `pixels`: UINT8 [1, H, W, C], the file decoded by lab/preprocess.py with the model's card (`spec`),
                   binary or JSON
  output `probabilities` (FP32 [1, K], binary when the request is) and its top-1 read against `labels`
         (index -> class name); or `output="classification"`: the classification extension's top 1,
         "score:index:label", read as it is (no labels needed)
  backend: the request parameter `backend` and an `X-Lab-Backend` header (this service reads either;
         other servers ignore both)

`V2.check` reads the answer (`read_answer`, `top1`; bench/locustfile.py reads its answers with them too),
binary (its own `Inference-Header-Content-Length`, then each output's
`binary_data_size` bytes) or JSON, and counts its top-1 against the sample's label; a 200 that cannot be
read counts as unreadable, and wrong when the sample is labelled. Only the standard library and NumPy here
(and lab/preprocess.py for `pixels`).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np

from bench.loadgen import Protocol, Result, Sample

INPUTS = ("image", "pixels")
OUTPUTS = ("probabilities", "classification")
ENCODINGS = ("binary", "json")


def _bytes_element(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def _header_length(head: bytes) -> int | None:
    at = head.find(b"\r\ninference-header-content-length:")
    if at < 0:
        return None
    stop = head.find(b"\r\n", at + 2)
    return int(head[at + 34:stop if stop > 0 else None])


def read_answer(body: bytes, json_size: int | None = None) -> dict:
    """A v2 answer -> {"outputs": {name: (datatype, shape, values)}, ...the rest of its JSON}: values a
    NumPy array (FP32 and the other numeric types) or a list of str (BYTES), from JSON or the binary tail.
    `json_size`: the answer's Inference-Header-Content-Length (None: all JSON). Raises ValueError."""
    size = len(body) if json_size is None else json_size
    if size > len(body):
        raise ValueError(f"Inference-Header-Content-Length {size} is past the {len(body)}-byte body")
    doc = json.loads(body[:size])
    tail, pos, outputs = memoryview(body)[size:], 0, {}
    for o in doc.get("outputs") or []:
        name, datatype, shape = o["name"], o["datatype"], list(o["shape"])
        n = (o.get("parameters") or {}).get("binary_data_size")
        if n is not None:
            raw = bytes(tail[pos:pos + n])
            if len(raw) != n:
                raise ValueError(f"output {name!r} declares {n} bytes past the end of the body")
            pos += n
            if datatype == "BYTES":
                values, k = [], 0
                while k < len(raw):
                    m = int.from_bytes(raw[k:k + 4], "little")
                    values.append(raw[k + 4:k + 4 + m].decode("utf-8", "replace"))
                    k += 4 + m
            else:
                values = np.frombuffer(raw, _NUMPY[datatype]).reshape(shape)
        else:
            data = o["data"]
            if datatype == "BYTES":
                values = [str(v) for v in np.asarray(data, dtype=object).ravel()]
            else:
                values = np.asarray(data, dtype=_NUMPY[datatype]).reshape(shape)
        outputs[name] = (datatype, shape, values)
    doc["outputs"] = outputs
    return doc


_NUMPY = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4", "UINT8": "<u1",
          "INT8": "<i1", "BOOL": "?", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4", "UINT64": "<u8"}


def top1(answer: dict, output: str, labels: list[str] | None) -> str:
    """The top-1 class name of the first image of a read answer (read_answer): the best of the
    probabilities named by `labels`, or the label of the first classification entry
    ("score:index:label"; "score:index" is named by `labels` when given, else by its index)."""
    outs = answer["outputs"]
    if not outs:
        raise ValueError("the answer has no outputs")
    datatype, _, values = outs.get(output) or outs.get("probabilities") or next(iter(outs.values()))
    if datatype == "BYTES":
        parts = values[0].split(":", 2)
        if len(parts) == 3:
            return parts[2]
        index = int(parts[1])
    else:
        a = np.asarray(values, dtype=np.float64)
        index = int(np.argmax(a[0] if a.ndim >= 2 else a))
    return labels[index] if labels is not None else str(index)


@dataclass
class V2(Protocol):
    """Open Inference Protocol inference requests for one image each, and their answers checked."""

    input: str = "image"              # image (BYTES) or pixels (UINT8, decoded here with `spec`)
    binary: bool = True               # the binary tensor data extension, else JSON tensors
    output: str = "probabilities"     # or classification (top 1, "score:index:label")
    labels: list[str] | None = None   # class names by index, to read probabilities
    backend: str | None = None        # this service's backend: request parameter + X-Lab-Backend
    spec: object = None               # lab.preprocess.Preprocessing, for pixels

    def __post_init__(self):
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, not {self.input!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {self.output!r}")
        if self.input == "pixels" and self.spec is None:
            raise ValueError("input 'pixels' needs the model's preprocessing (spec) to decode the images")
        if self.output == "probabilities" and self.labels is None:
            raise ValueError("output 'probabilities' needs the class names (labels); or ask for 'classification'")

    @property
    def encoding(self) -> str:
        return "binary" if self.binary else "json"

    def _tensor(self, sample: Sample) -> tuple[dict, bytes]:
        """The input's JSON (without data) and its raw bytes as the binary extension sends them."""
        if self.input == "image":
            return {"name": "image", "datatype": "BYTES", "shape": [1]}, sample.body
        from lab.preprocess import decode_uint8

        px = decode_uint8(sample.body, self.spec)
        return {"name": "pixels", "datatype": "UINT8", "shape": [1, *px.shape]}, px

    def request(self, sample: Sample) -> tuple[bytes, dict[str, str]]:
        tensor, data = self._tensor(sample)
        out = {"name": "probabilities", "parameters": {}}
        if self.output == "classification":
            out["parameters"]["classification"] = 1
        if self.binary:
            out["parameters"]["binary_data"] = True
        if not out["parameters"]:
            del out["parameters"]
        doc = {"inputs": [tensor], "outputs": [out]}
        if self.backend:
            doc["parameters"] = {"backend": self.backend}
        headers = {"X-Lab-Backend": self.backend} if self.backend else {}
        if self.binary:
            tail = _bytes_element(data) if self.input == "image" else np.ascontiguousarray(data).tobytes()
            tensor["parameters"] = {"binary_data_size": len(tail)}
            head = json.dumps(doc, separators=(",", ":")).encode()
            headers.update({"Content-Type": "application/octet-stream",
                            "Inference-Header-Content-Length": str(len(head))})
            return head + tail, headers
        if self.input == "image":
            tensor["data"] = [base64.b64encode(data).decode("ascii")]
        else:
            tensor["data"] = data.ravel().tolist()
        headers["Content-Type"] = "application/json"
        return json.dumps(doc, separators=(",", ":")).encode(), headers

    def check(self, head: bytes, body: bytes, sample: Sample, res: Result) -> None:
        try:
            label = top1(read_answer(body, _header_length(head)), "probabilities", self.labels)
        except (ValueError, KeyError, IndexError, TypeError):
            res.unreadable += 1
            if sample.label is not None:
                res.checked += 1
            return
        if sample.label is not None:
            res.checked += 1
            res.correct += label == sample.label


def model_metadata(url: str, model: str, timeout: float = 10.0) -> dict:
    """GET {url}/v2/models/{model}: the model's metadata (ValueError with the server's words if not 200)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/models/{model}", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"GET /v2/models/{model}: HTTP {e.code}: {e.read()[:300]!r}") from None
    except OSError as e:
        raise ValueError(f"GET {url}/v2/models/{model}: {e}") from None
