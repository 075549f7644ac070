"""Service settings, from environment variables (read once, when the service module is imported).

  LAB_WORKERS          worker processes (default 1)
  LAB_THREADS          intra-op threads per worker for onnxruntime and torch (default: cores / workers)
  LAB_MAX_BATCH_SIZE   adaptive batching: largest batch (default 64; 1 turns batching off)
  LAB_MAX_LATENCY_MS   adaptive batching: longest a request may wait in the queue (default 5000)
  LAB_BATCH_WAIT_MS    adaptive batching: most a free model waits for more requests (default 0)
  LAB_MAX_INFLIGHT     requests in flight per worker before answering 503 + Retry-After (default 512)
  LAB_TIMEOUT          seconds before a request is answered 504 (default 60)
  LAB_MAX_BODY_BYTES   largest request body (default 10 MiB)
  LAB_MAX_PIXELS       largest image, width x height (default 40,000,000)
  LAB_MAX_BATCH_IMAGES most images in one /classify_batch request (default 64)

Bounded memory and time per request (docs/serving.md, "Worst-case memory of a worker"):
  LAB_MAX_INFLIGHT_BYTES  bytes all in-flight requests of a worker may hold: bodies (counted twice,
                          three times for multipart: their parsed copies) and model inputs; past it,
                          503 + Retry-After (default 256 MiB)
  LAB_MAX_DECODE_BYTES    working memory of the images being decoded at once in a worker, each one
                          estimated from its header before it is decoded; an image that alone needs
                          more is refused with 413 (default 768 MiB)
  LAB_HEADER_TIMEOUT      seconds for a request's line and headers to arrive (default 10)
  LAB_READ_TIMEOUT        seconds the body may stall between two reads (default 5)
  LAB_BODY_TIMEOUT        seconds for the whole body to arrive (default 30)
  LAB_MAX_HEADER_BYTES    request line + headers (default 32 KiB); past it, 431
  LAB_MAX_HEADERS         header fields per request (default 100); past it, 431
  LAB_MAX_CONNECTIONS     open connections per worker (default 1024); past it, new ones are closed
  LAB_MAX_CONNECTIONS_PER_CLIENT  open connections per client address (default 256; 0: no limit,
                          for a service behind a proxy that all clients come through)
  LAB_MAX_INFLIGHT_PER_CLIENT     requests in flight per client address (default max_inflight / 4;
                          0: no limit)

Operations:
  LAB_ALLOW_UNGUARDED     1: serve even where the HTTP guard cannot install itself (an untested uvicorn
                          or BentoML); by default the service then refuses to start (lab/bentoml_compat.py)
  LAB_RELOAD_SECONDS      how often each worker looks for models published since it started
                          (default 10; 0: never; POST /models/reload from localhost looks at once)
  LAB_LOG_FORMAT          text (default) or json: one JSON object per log line
  LAB_DEFAULT_MODEL    model name served when a request names none (default cifar10-airbench)
  LAB_MODELS           comma-separated model names to serve (default: every model with a lab card)
  LAB_BACKENDS         comma-separated backends to build (default: every backend of the registry,
                       lab.backends, that is served by default: onnx, onnx_int8, torch, torch_bf16)
  LAB_PLUGINS          comma-separated modules to import first (e.g. more backends)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lab.backends import default_backends, list_backends
from lab.hardware import cores


def _number(name: str, default, minimum, kind=int):
    """The environment variable `name` as a `kind` (int or float) >= minimum; `default` when unset."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value < minimum:
        raise SystemExit(f"{name}={value} must be >= {minimum}")
    return value


def _int(name: str, default: int, minimum: int = 1) -> int:
    return _number(name, default, minimum, int)


def _float(name: str, default: float, minimum: float = 0.1) -> float:
    return _number(name, default, minimum, float)


def _list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name, "")
    return tuple(s.strip() for s in raw.split(",") if s.strip()) or default


@dataclass(frozen=True)
class Settings:
    workers: int = 1
    threads: int = 1
    max_batch_size: int = 64
    max_latency_ms: int = 5000
    batch_wait_ms: int = 0
    max_inflight: int = 512
    timeout: int = 60
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_images: int = 64
    max_inflight_bytes: int = 256 << 20
    max_decode_bytes: int = 768 << 20
    header_timeout: float = 10.0
    read_timeout: float = 5.0
    body_timeout: float = 30.0
    max_header_bytes: int = 32 << 10
    max_headers: int = 100
    max_connections: int = 1024
    max_connections_per_client: int = 256
    max_inflight_per_client: int = 128
    reload_seconds: float = 10.0
    log_format: str = "text"
    default_model: str = "cifar10-airbench"
    models: tuple[str, ...] = ()
    backends: tuple[str, ...] = field(default_factory=lambda: tuple(default_backends()))

    @classmethod
    def from_env(cls) -> "Settings":
        workers = _int("LAB_WORKERS", 1)
        backends = _list("LAB_BACKENDS", tuple(default_backends()))
        unknown = [b for b in backends if b not in list_backends()]
        if unknown:
            raise SystemExit(f"LAB_BACKENDS: unknown backend(s) {unknown}; valid: {', '.join(list_backends())}")
        max_inflight = _int("LAB_MAX_INFLIGHT", 512)
        log_format = os.environ.get("LAB_LOG_FORMAT", "text").strip().lower() or "text"
        if log_format not in ("text", "json"):
            raise SystemExit(f"LAB_LOG_FORMAT={log_format!r}: valid values are text, json")
        return cls(
            workers=workers,
            threads=_int("LAB_THREADS", max(1, cores() // workers)),
            max_batch_size=_int("LAB_MAX_BATCH_SIZE", 64),
            max_latency_ms=_int("LAB_MAX_LATENCY_MS", 5000),
            batch_wait_ms=_int("LAB_BATCH_WAIT_MS", 0, minimum=0),
            max_inflight=max_inflight,
            timeout=_int("LAB_TIMEOUT", 60),
            max_body_bytes=_int("LAB_MAX_BODY_BYTES", 10 * 1024 * 1024),
            max_pixels=_int("LAB_MAX_PIXELS", 40_000_000),
            max_batch_images=_int("LAB_MAX_BATCH_IMAGES", 64),
            max_inflight_bytes=_int("LAB_MAX_INFLIGHT_BYTES", 256 << 20),
            max_decode_bytes=_int("LAB_MAX_DECODE_BYTES", 768 << 20),
            header_timeout=_float("LAB_HEADER_TIMEOUT", 10.0),
            read_timeout=_float("LAB_READ_TIMEOUT", 5.0),
            body_timeout=_float("LAB_BODY_TIMEOUT", 30.0),
            max_header_bytes=_int("LAB_MAX_HEADER_BYTES", 32 << 10, minimum=1024),
            max_headers=_int("LAB_MAX_HEADERS", 100, minimum=8),
            max_connections=_int("LAB_MAX_CONNECTIONS", 1024),
            max_connections_per_client=_int("LAB_MAX_CONNECTIONS_PER_CLIENT", 256, minimum=0),
            max_inflight_per_client=_int("LAB_MAX_INFLIGHT_PER_CLIENT", max(1, max_inflight // 4), minimum=0),
            reload_seconds=_float("LAB_RELOAD_SECONDS", 10.0, minimum=0.0),
            log_format=log_format,
            default_model=os.environ.get("LAB_DEFAULT_MODEL", "cifar10-airbench"),
            models=_list("LAB_MODELS", ()),
            backends=backends,
        )
