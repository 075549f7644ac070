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


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SystemExit(f"{name}={value} must be >= {minimum}")
    return value


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
        return cls(
            workers=workers,
            threads=_int("LAB_THREADS", max(1, cores() // workers)),
            max_batch_size=_int("LAB_MAX_BATCH_SIZE", 64),
            max_latency_ms=_int("LAB_MAX_LATENCY_MS", 5000),
            batch_wait_ms=_int("LAB_BATCH_WAIT_MS", 0, minimum=0),
            max_inflight=_int("LAB_MAX_INFLIGHT", 512),
            timeout=_int("LAB_TIMEOUT", 60),
            max_body_bytes=_int("LAB_MAX_BODY_BYTES", 10 * 1024 * 1024),
            max_pixels=_int("LAB_MAX_PIXELS", 40_000_000),
            max_batch_images=_int("LAB_MAX_BATCH_IMAGES", 64),
            default_model=os.environ.get("LAB_DEFAULT_MODEL", "cifar10-airbench"),
            models=_list("LAB_MODELS", ()),
            backends=backends,
        )
