"""The OpenAPI description of the HTTP contract (serving/http_io.py), laid over BentoML's /docs.json.

BentoML describes the typed API it sees, `{"tickets": [...]}`: the internal form the front door sends
it. People and tools reading /docs.json need the form they send: an image upload with the options,
one `backend` of the registry (lab.backends) among them.
"""
from __future__ import annotations

import copy

from lab.backends import list_backends

ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
PREDICTION = {"type": "object", "properties": {
    "label": {"type": "string"}, "index": {"type": "integer"}, "probability": {"type": "number"}}}
ANSWER = {"type": "object", "properties": {
    "model": {"type": "string", "description": "name:version"},
    "backend": {"type": "string"},
    "predictions": {"type": "array", "items": PREDICTION},
    "inference_ms": {"type": "number", "description": "the backend call for the whole batch this image rode in"},
    "batch_size": {"type": "integer"}, "preprocess_ms": {"type": "number"}, "queue_ms": {"type": "number"},
    "filename": {"type": "string"}}}
BATCH_ANSWER = {"type": "object", "properties": {
    "model": {"type": "string"}, "backend": {"type": "string"}, "inference_ms": {"type": "number"},
    "errors": {"type": "integer", "description": "images that could not be classified"},
    "results": {"type": "array", "items": {"type": "object", "description":
                "per image, in order: filename, predictions and batch_size, or error and status"}}}}


def options() -> dict:
    return {
        "backend": {"type": "string", "enum": list_backends(),
                    "description": "the inference backend (GET /models/ lists each model's, its measured rungs "
                                   "and its default_backend: the card's best rung unless LAB_DEFAULT_BACKEND "
                                   "says otherwise)"},
        "model": {"type": "string", "description": "model name, or name:version (default: the default model)"},
        "version": {"type": "string", "description": "a version of the named model"},
        "top_k": {"type": "integer", "minimum": 1, "default": 3},
    }


def _parameters() -> list[dict]:
    return [{"name": k, "in": "query", "required": False, "schema": v} for k, v in options().items()]


def _responses(answer: dict) -> dict:
    def err(text):
        return {"description": text, "content": {"application/json": {"schema": ERROR}}}
    return {"200": {"description": "classified", "content": {"application/json": {"schema": answer}}},
            "400": err("a malformed request, image or option"), "404": err("unknown model, version or backend"),
            "413": err("body, image or batch over its limit"), "415": err("not an image of a supported format"),
            "503": err("overloaded: retry after the Retry-After header's seconds")}


def describe_http_contract(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    paths = spec.get("paths", {})
    image = {"type": "string", "format": "binary"}
    if "/classify" in paths and "post" in paths["/classify"]:
        op = paths["/classify"]["post"]
        op["requestBody"] = {"required": True, "content": {
            "image/*": {"schema": image},
            "application/octet-stream": {"schema": image},
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                               "properties": {"image": image, **options()}}}}}
        op["parameters"], op["responses"] = _parameters(), _responses(ANSWER)
        op["description"] = "Classify one image: the raw bytes as the body, or a multipart file field 'image'."
    if "/classify_batch" in paths and "post" in paths["/classify_batch"]:
        op = paths["/classify_batch"]["post"]
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": image}, **options()}}}}}
        op["parameters"], op["responses"] = _parameters(), _responses(BATCH_ANSWER)
        op["description"] = "Classify several images: multipart file fields 'images'; each gets its own entry."
    return spec
