"""Service settings: each one written once below, with its environment variable, default and meaning.

Read once from the environment when the service module is imported (Settings.from_env); a bad value
stops the service with one line. `python -m serving.config` prints them all as a Markdown table (the
table in docs/operations.md is that output). The bounds on memory and time per request are explained
in docs/serving.md, "Worst-case memory of a worker".
"""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field, fields

from lab.backends import default_backends, list_backends
from lab.hardware import cores

MiB = 1 << 20


def setting(env: str, default, doc: str, minimum=1, group: str = "service", choices: tuple = ()):
    """A setting: its environment variable, its default (None: derived from others, see __post_init__),
    the smallest value it takes, what it means."""
    return field(default=default, metadata=dict(env=env, doc=doc, minimum=minimum, group=group, choices=choices))


@dataclass(frozen=True)
class Settings:
    # ---- workers and batching
    workers: int = setting("LAB_WORKERS", 1, "worker processes")
    threads: int | None = setting("LAB_THREADS", None, "intra-op threads per worker for onnxruntime, torch and "
                                                       "OpenVINO (default: cores / workers)")
    max_batch_size: int = setting("LAB_MAX_BATCH_SIZE", 64, "adaptive batching: largest batch (1 turns batching off)")
    max_latency_ms: int = setting("LAB_MAX_LATENCY_MS", 5000, "adaptive batching: longest an image may wait in "
                                  "the queue, ms; past it, 503 without running it")
    batch_wait_ms: int = setting("LAB_BATCH_WAIT_MS", 0, "adaptive batching: most a free model waits for more "
                                                         "images to fill a batch, ms", minimum=0)
    inline_max_ms: float = setting("LAB_INLINE_MAX_MS", 20.0, "a request alone in the worker runs its batch on "
                                   "the event loop, no thread hand-off, when its backend's last batch of one took "
                                   "at most this long, ms (0: always on the inference thread)", minimum=0.0)
    max_queue: int = setting("LAB_MAX_QUEUE", 512, "images waiting per (model, backend) queue; past it, "
                                                   "503 + Retry-After")
    max_queue_bytes: int = setting("LAB_MAX_QUEUE_BYTES", 64 * MiB, "bytes of images waiting in all the queues "
                                   "of a worker; past it, 503 + Retry-After")
    # ---- bounded memory and time per request
    max_inflight: int = setting("LAB_MAX_INFLIGHT", 512, "requests in flight per worker before answering "
                                                         "503 + Retry-After", group="limits")
    max_inflight_per_client: int | None = setting(
        "LAB_MAX_INFLIGHT_PER_CLIENT", None, "requests in flight per client address while the worker holds at "
        "least max_inflight / 2 (default max_inflight / 4; 0: no limit)", minimum=0, group="limits")
    trusted_proxies: tuple[str, ...] = setting(
        "LAB_TRUSTED_PROXIES", (), "comma-separated proxy addresses whose X-Forwarded-For names the client for "
        "the per-client request limit (connection limits always count the peer address)", group="limits")
    timeout: int = setting("LAB_TIMEOUT", 60, "seconds before a request is answered 504", group="limits")
    max_body_bytes: int = setting("LAB_MAX_BODY_BYTES", 10 * MiB, "largest request body, bytes", group="limits")
    max_pixels: int = setting("LAB_MAX_PIXELS", 40_000_000, "largest image, width x height", group="limits")
    max_batch_images: int = setting("LAB_MAX_BATCH_IMAGES", 64, "most images in one /classify_batch request",
                                    group="limits")
    max_inflight_bytes: int = setting(
        "LAB_MAX_INFLIGHT_BYTES", 256 * MiB, "bytes all in-flight requests of a worker may hold: bodies (counted "
        "twice, three times for multipart: their parsed copies) and model inputs; past it, 503 + Retry-After",
        group="limits")
    max_decode_bytes: int = setting(
        "LAB_MAX_DECODE_BYTES", 768 * MiB, "working memory of the images being decoded at once in a worker, each "
        "estimated from its header before it is decoded; an image that alone needs more is refused with 413",
        group="limits")
    header_timeout: float = setting("LAB_HEADER_TIMEOUT", 10.0, "seconds for a request's line and headers to "
                                                                "arrive", minimum=0.1, group="limits")
    read_timeout: float = setting("LAB_READ_TIMEOUT", 5.0, "seconds the body may stall between two reads",
                                  minimum=0.1, group="limits")
    body_timeout: float = setting("LAB_BODY_TIMEOUT", 30.0, "seconds for the whole body to arrive", minimum=0.1,
                                  group="limits")
    max_header_bytes: int = setting("LAB_MAX_HEADER_BYTES", 32 << 10, "request line + headers, bytes; past it, 431",
                                    minimum=1024, group="limits")
    max_headers: int = setting("LAB_MAX_HEADERS", 100, "header fields per request; past it, 431", minimum=8,
                               group="limits")
    max_connections: int = setting("LAB_MAX_CONNECTIONS", 1024, "open connections per worker; past it, new ones "
                                                                "are closed", group="limits")
    max_connections_per_client: int = setting(
        "LAB_MAX_CONNECTIONS_PER_CLIENT", 256, "open connections per client address (0: no limit, for a service "
        "behind a proxy that all clients come through)", minimum=0, group="limits")
    # ---- operations
    reload_seconds: float = setting("LAB_RELOAD_SECONDS", 10.0, "how often each worker looks for models published "
                                    "since it started (0: never; POST /models/reload from localhost looks at once)",
                                    minimum=0.0, group="operations")
    log_format: str = setting("LAB_LOG_FORMAT", "text", "text, or json: one JSON object per log line",
                              group="operations", choices=("text", "json"))
    default_backend: str = setting("LAB_DEFAULT_BACKEND", "", "backend a request naming none is answered by "
                                   "(default: the fastest rung proven and timed at load on this machine within "
                                   "the card's accuracy bound, else the card's best rung, else onnx)",
                                   group="operations")
    default_model: str = setting("LAB_DEFAULT_MODEL", "cifar10-airbench", "model served when a request names none",
                                 group="operations")
    models: tuple[str, ...] = setting("LAB_MODELS", (), "comma-separated model names to serve (default: every "
                                                        "model with a lab card)", group="operations")
    backends: tuple[str, ...] | None = setting(
        "LAB_BACKENDS", None, "comma-separated backends to build, exactly these (default: every backend of the "
        "registry, lab.backends, that is served by default, and each model's default rung chosen at load)",
        group="operations")

    @property
    def backends_chosen(self) -> bool:
        """Whether LAB_BACKENDS (or the caller) named the backends: then exactly those are built."""
        return self._backends_chosen

    def __post_init__(self) -> None:  # the defaults derived from other settings
        object.__setattr__(self, "_backends_chosen", self.backends is not None)
        derived = {"threads": lambda: max(1, cores() // self.workers),
                   "max_inflight_per_client": lambda: max(1, self.max_inflight // 4),
                   "backends": lambda: tuple(default_backends())}
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value())

    @classmethod
    def from_env(cls, environ=os.environ) -> "Settings":
        """The settings whose variables are set in `environ`; SystemExit with one line for a bad value."""
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"], "").strip()
            if raw:
                values[f.name] = _parse(f, raw)
        unknown = [b for b in (*values.get("backends", ()), values.get("default_backend")) if b and b not in list_backends()]
        if unknown:
            raise SystemExit(f"LAB_BACKENDS / LAB_DEFAULT_BACKEND: unknown backend(s) {unknown}; "
                             f"valid: {', '.join(list_backends())}")
        return cls(**values)


def _parse(f, raw: str):
    env, minimum, choices = f.metadata["env"], f.metadata["minimum"], f.metadata["choices"]
    if f.type.startswith("tuple"):  # a comma-separated list
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if f.type.startswith("str"):
        value = raw.lower() if choices else raw
        if choices and value not in choices:
            raise SystemExit(f"{env}={raw!r}: valid values are {', '.join(choices)}")
        return value
    kind = float if f.type.startswith("float") else int
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{env}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value < minimum:
        raise SystemExit(f"{env}={value} must be >= {minimum}")
    return value


def table() -> str:
    """Every setting as a Markdown table, by group: what docs/operations.md shows."""
    rows = ["| group | variable | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        m = f.metadata
        default = "derived" if f.default is None else ("none" if f.default == () else f"`{f.default}`")
        rows.append(f"| {m['group']} | `{m['env']}` | {default} | {m['doc']} |")
    return "\n".join(rows)


DOCS_MARKERS = ("<!-- settings table: python -m serving.config --docs -->", "<!-- end of the settings table -->")


def write_docs(path) -> None:
    """Replace the table between DOCS_MARKERS in `path` (docs/operations.md) with table()."""
    text = Path(path).read_text()
    head, rest = text.split(DOCS_MARKERS[0], 1)
    tail = rest.split(DOCS_MARKERS[1], 1)[1]
    Path(path).write_text(f"{head}{DOCS_MARKERS[0]}\n{table()}\n{DOCS_MARKERS[1]}{tail}")


if __name__ == "__main__":
    import sys

    if "--docs" in sys.argv:
        write_docs(Path(__file__).resolve().parent.parent / "docs" / "operations.md")
    else:
        print(table())
