"""The answers of the HTTP API: their types, the one function that writes them, and their JSON schema.

POST /classify answers a `Prediction`; POST /classify_batch a `BatchAnswer` (one `BatchEntry` per image,
in order); every error an `ErrorAnswer`. `render` turns any of them into the response bytes, and
`json_schemas` describes them for the OpenAPI document (serving/openapi.py), both from the same
dataclasses through pydantic's TypeAdapter: a field added here is in the answers and in /docs.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import TypeAdapter


@dataclass
class Label:
    label: str
    index: int
    probability: float


@dataclass
class Prediction:
    """One image's answer."""
    model: str                     # name:version
    backend: str
    predictions: list[Label]       # the top_k classes, most probable first
    inference_ms: float            # the backend call for the whole batch this image rode in
    batch_size: int                # images in that batch
    preprocess_ms: float           # decoding and resizing this image
    queue_ms: float                # waiting in the batching queue
    filename: str | None = None    # the multipart file's name, when it had one


@dataclass
class Failure:
    """Why one image got no answer: an HTTP status and a message naming the problem."""
    status: int
    error: str


@dataclass
class BatchEntry:
    """One image of a batch: its predictions, or its error and status."""
    filename: str
    predictions: list[Label] | None = None
    batch_size: int | None = None
    error: str | None = None
    status: int | None = None


@dataclass
class BatchAnswer:
    model: str
    backend: str
    inference_ms: float            # the slowest backend call among the images' batches
    errors: int                    # images that could not be classified
    results: list[BatchEntry] = field(default_factory=list)


@dataclass
class ErrorAnswer:
    error: str
    results: list[BatchEntry] | None = None  # a batch whose every image failed: each one's error


ANSWERS = (Prediction, BatchAnswer, ErrorAnswer)
_ADAPTERS = {t: TypeAdapter(t) for t in ANSWERS}


def render(answer: Prediction | BatchAnswer | ErrorAnswer) -> bytes:
    """The JSON body of an answer (fields that are None are left out)."""
    return _ADAPTERS[type(answer)].dump_json(answer, exclude_none=True)


def entry(result: Prediction | Failure, filename: str) -> BatchEntry:
    if isinstance(result, Failure):
        return BatchEntry(filename=filename, error=result.error, status=result.status)
    return BatchEntry(filename=filename, predictions=result.predictions, batch_size=result.batch_size)


def batch_answer(results: list[Prediction | Failure], filenames: list[str]) -> tuple[int, BatchAnswer | ErrorAnswer]:
    """A batch's answer: 200 when any image was classified; else the first image's status and error."""
    entries = [entry(r, f) for r, f in zip(results, filenames)]
    ok = [r for r in results if isinstance(r, Prediction)]
    if not ok:
        first = results[0]
        return first.status, ErrorAnswer(error=first.error, results=entries)
    return 200, BatchAnswer(model=ok[0].model, backend=ok[0].backend,
                            inference_ms=max(r.inference_ms for r in ok), errors=len(results) - len(ok),
                            results=entries)


def json_schemas() -> dict[str, dict]:
    """Every answer type and the types inside them: {name: JSON schema}, refs as #/components/schemas/."""
    schemas: dict[str, dict] = {}
    for t in ANSWERS:
        schema = _ADAPTERS[t].json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[t.__name__] = schema
    return schemas
