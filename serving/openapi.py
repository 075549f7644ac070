"""The OpenAPI document served at /docs.json (and read by the docs UI at /docs), generated from the
request options below, the backends of the registry (lab.backends) and the answer types of
serving/schema.py: nothing in it is written twice.
"""
from __future__ import annotations

import functools
import json

from lab.backends import list_backends
from serving.schema import json_schemas

IMAGE = {"type": "string", "format": "binary"}
ERRORS = {"400": "a malformed request, image or option", "404": "unknown model, version or backend",
          "413": "body, image or batch over its limit", "415": "not an image of a supported format",
          "503": "overloaded (a full queue, too many requests in flight): retry after the Retry-After seconds"}


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


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(summary: str, body: dict, answer: str) -> dict:
    responses = {"200": {"description": "classified", "content": {"application/json": {"schema": _ref(answer)}}}}
    for status, text in ERRORS.items():
        responses[status] = {"description": text, "content": {"application/json": {"schema": _ref("ErrorAnswer")}}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": body},
                     "parameters": [{"name": k, "in": "query", "required": False, "schema": v}
                                    for k, v in options().items()],
                     "responses": responses}}


def _get(summary: str) -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}


@functools.lru_cache(maxsize=1)
def document() -> str:
    single = {"image/*": {"schema": IMAGE}, "application/octet-stream": {"schema": IMAGE},
              "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                 "properties": {"image": IMAGE, **options()}}}}
    batch = {"multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": IMAGE}, **options()}}}}
    return json.dumps({
        "openapi": "3.0.2",
        "info": {"title": "image_classifier", "version": "1",
                 "description": "Image classification with Torch, ONNX Runtime and OpenVINO backends side by side."},
        "paths": {
            "/classify": _operation("Classify one image: the raw bytes as the body, or a multipart file field "
                                    "'image'.", single, "Prediction"),
            "/classify_batch": _operation("Classify several images: multipart file fields 'images'; each gets "
                                          "its own entry.", batch, "BatchAnswer"),
            "/models/": _get("The served models: versions, backends, refused backends, rungs and cards."),
            "/readyz": _get("200 {ready, guards} when a model can be served; else 503 with the reason."),
            "/livez": _get("200 while the worker runs."),
            "/metrics": _get("Prometheus metrics: BentoML's and the lab_* ones."),
        },
        "components": {"schemas": json_schemas()},
    })
