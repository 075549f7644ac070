"""The BentoML service: `bentoml serve` (from the project root; see bentofile.yaml).

One small class: models are loaded from BentoML's model store by tag in __init__; two typed batchable
APIs run inference for many concurrent requests at once (adaptive batching), on the backend each
request asks for. The HTTP contract (image uploads in, JSON answers out) is kept by the front door in
front of them (serving/middleware.py, serving/http_io.py); serving/config.py lists the settings.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import typing as t

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from lab import bentoml_compat  # noqa: E402
from serving import catalog as C  # noqa: E402
from serving.config import Settings  # noqa: E402
from serving.http_io import TICKETS  # noqa: E402
from serving.metrics import publish_guards  # noqa: E402
from serving.middleware import FrontDoor  # noqa: E402
from serving.tryit import TryIt  # noqa: E402

SETTINGS = Settings.from_env()
bentoml_compat.cap_learned_batch_wait(SETTINGS.batch_wait_ms)
bentoml_compat.guard_http(header_timeout=SETTINGS.header_timeout, max_header_bytes=SETTINGS.max_header_bytes,
                          max_headers=SETTINGS.max_headers, max_connections=SETTINGS.max_connections,
                          max_connections_per_client=SETTINGS.max_connections_per_client)
bentoml_compat.quiet_shed_requests()
if SETTINGS.log_format == "json":
    from serving.logs import use_json_logs

    use_json_logs()
if logging.getLogger("lab").level == logging.NOTSET:  # BentoML's set-up leaves the root at WARNING
    logging.getLogger("lab").setLevel(logging.INFO)
for _guard, _state in bentoml_compat.GUARDS.items():
    logging.getLogger("lab.service").info("%s guard: %s", _guard, _state)
# LAB_MAX_BATCH_SIZE=1 turns adaptive batching off (BentoML's batchable APIs need a batch size > 1)
BATCHING = dict(batchable=SETTINGS.max_batch_size > 1, max_batch_size=max(2, SETTINGS.max_batch_size),
                max_latency_ms=SETTINGS.max_latency_ms)
Answers = t.List[t.Dict[str, t.Any]]


async def _list_models(request):
    if C.CURRENT is None:
        return JSONResponse({"error": "the service is still starting"}, status_code=503)
    return JSONResponse(C.CURRENT.describe())


async def _reload(request):
    """Look for newly published models now (localhost only; each worker also looks every
    LAB_RELOAD_SECONDS). Answers what changed in the worker that took the request."""
    import anyio

    host = request.client.host if request.client else ""
    if not (host.startswith("127.") or host == "::1"):
        return JSONResponse({"error": "POST /models/reload is answered on localhost only"}, status_code=403)
    if C.CURRENT is None:
        return JSONResponse({"error": "the service is still starting"}, status_code=503)
    changes = await anyio.to_thread.run_sync(lambda: C.CURRENT.rescan(force=True))
    return JSONResponse(changes)


info_app = Starlette(routes=[Route("/", _list_models, methods=["GET"]), Route("/reload", _reload, methods=["POST"])])


@bentoml.asgi_app(info_app, path="/models")
@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    threads=1,  # inference runs on one thread per worker; onnxruntime/torch use SETTINGS.threads inside it
    traffic={"timeout": SETTINGS.timeout},
    logging={"access": {"enabled": False}},  # the front door logs each request once, with its X-Request-ID
    http={"host": "127.0.0.1", "port": 3000},
)
class ImageClassifier:
    """Image classification with Torch and ONNX Runtime backends side by side."""

    def __init__(self) -> None:
        self.catalog = C.Catalog.from_store(SETTINGS)
        C.CURRENT = self.catalog
        C.publish_metrics(self.catalog)
        publish_guards(bentoml_compat.GUARDS)
        self._stop = threading.Event()
        if SETTINGS.reload_seconds > 0:  # models published while the service runs (serving/catalog.py)
            threading.Thread(target=C.watch, args=(self.catalog, SETTINGS.reload_seconds, self._stop),
                             name="lab-store-watch", daemon=True).start()
        # Everything loaded so far lives as long as the worker: move it out of the garbage collector's
        # sight. Otherwise each full collection walks it all, stalling every request in flight
        # (measured here: p99 at 16 clients 170-190 ms with, 90-115 ms without those pauses).
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        """BentoML's readiness hook (/readyz): ready while some model can be served."""
        return self.catalog.servable()[0]

    @bentoml.on_shutdown
    def _stop_watching(self) -> None:
        self._stop.set()

    @bentoml.api(route="/classify", **BATCHING)
    def classify(self, tickets: t.List[str]) -> Answers:
        """Classify one image: the raw body (Content-Type image/*) or a multipart file field 'image'.
        Query parameters: backend, model, top_k."""
        return self.catalog.infer(TICKETS.take(tickets))

    @bentoml.api(route="/classify_batch", **BATCHING)
    def classify_batch(self, tickets: t.List[str]) -> Answers:
        """Classify several images: multipart file fields 'images'. Query parameters as /classify."""
        return self.catalog.infer(TICKETS.take(tickets))


ImageClassifier.add_asgi_middleware(FrontDoor, settings=SETTINGS)
ImageClassifier.add_asgi_middleware(TryIt)  # GET /: the try-it page (serving/static/); /docs: BentoML's UI
