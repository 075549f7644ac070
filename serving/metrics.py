"""The service's own Prometheus metrics, next to BentoML's on GET /metrics.

BentoML serves prometheus_client's registry in multiprocess mode (one file per worker under
PROMETHEUS_MULTIPROC_DIR, which each worker sets while it starts); metrics made with prometheus_client
after that show up on /metrics. BentoML's `bentoml.metrics` module, a deferred alias for
prometheus_client, is deprecated in favour of prometheus_client itself, which is what we use, created
on first use (from the service's __init__, after the worker has set its directory).

  lab_requests_total{model,backend,status}   images answered, by HTTP status (200 or the image's error)
  lab_request_seconds{route,status}          seconds from a classify request's first byte to its answer
                                             (histogram; the front door answers these routes before
                                             BentoML's middlewares see them)
  lab_errors_total{backend,kind}             requests refused or failed, by kind (bad_request,
                                             unsupported, too_large, timeout, overloaded, memory,
                                             per_client, shed, inference, not_found, ...)
  lab_batch_size{backend}                    images per inference call (histogram)
  lab_inference_seconds{backend}             seconds per inference call (histogram)
  lab_backend_refused{model,backend}         1 for each backend a served model refused at load
  lab_models_served                          servable models in this worker
  lab_guard_active{guard}                    1 for each security guard installed, 0 for one allowed off
                                             (LAB_ALLOW_UNGUARDED=1)
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_metrics: "Metrics | None" = None
KINDS = {400: "bad_request", 404: "not_found", 408: "timeout", 413: "too_large", 415: "unsupported",
         431: "headers_too_large", 500: "inference", 503: "overloaded", 504: "timeout"}


class Metrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("lab_requests", "Images answered, by model, backend and HTTP status",
                                ["model", "backend", "status"])
        self.request_seconds = Histogram("lab_request_seconds", "Seconds per classify request, by route and status",
                                         ["route", "status"], buckets=(.001, .0025, .005, .01, .025, .05, .1,
                                                                       .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.errors = Counter("lab_errors", "Requests refused or failed, by backend and kind", ["backend", "kind"])
        self.batch_size = Histogram("lab_batch_size", "Images per inference call, by backend", ["backend"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.inference_seconds = Histogram("lab_inference_seconds", "Seconds per inference call, by backend",
                                           ["backend"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                                                 1, 2.5, 5, 10))
        self.backend_refused = Gauge("lab_backend_refused", "1 for each backend a served model refused at load",
                                     ["model", "backend"], multiprocess_mode="max")
        self.guard_active = Gauge("lab_guard_active", "1 for each security guard installed, 0 for one off",
                                  ["guard"], multiprocess_mode="min")
        self.models_served = Gauge("lab_models_served", "Servable models in this worker", [],
                                   multiprocess_mode="max")


def metrics() -> Metrics | None:
    """The metrics (made on first call); None where prometheus_client cannot be used."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                try:
                    _metrics = Metrics()
                except Exception:  # no prometheus_client, or registered twice in one process (tests)
                    return None
    return _metrics


def publish_guards(guards: dict[str, str]) -> None:
    m = metrics()
    if m is not None:
        for guard, state in guards.items():
            m.guard_active.labels(guard).set(1 if state.startswith("active") else 0)


def backend_label(name: str | None) -> str:
    """A registry backend name, or 'other': label values never come straight from a request."""
    from lab.backends import list_backends

    return name if name in list_backends() else ("" if not name else "other")


def count_error(status: int, backend: str | None = None, kind: str | None = None) -> None:
    m = metrics()
    if m is not None:
        m.errors.labels(backend_label(backend), kind or KINDS.get(status, str(status))).inc()


_request_timers: dict[tuple[str, int], object] = {}  # (route, status) -> its child of lab_request_seconds


def observe_request(route: str, status: int, seconds: float) -> None:
    """One classify request's time (route: a path of the front door's own, never the client's)."""
    timer = _request_timers.get((route, status))
    if timer is None:
        m = metrics()
        if m is None:
            return
        timer = _request_timers[(route, status)] = m.request_seconds.labels(route, str(status))
    timer.observe(seconds)


def observe_batch(backend: str, images: int, seconds: float) -> None:
    m = metrics()
    if m is not None:
        m.batch_size.labels(backend).observe(images)
        m.inference_seconds.labels(backend).observe(seconds)
