"""The BentoML service: `bentoml serve` (from the project root; see bentofile.yaml).

One small class: in each worker it loads the models from BentoML's model store by tag, starts the
batching queue (serving/batching.py), says when it is ready, and stops it all on shutdown. A request
travels one way through the front door (serving/middleware.py): parsed and preprocessed
(serving/http_io.py), queued with the other requests for its model and backend, run as a batch,
answered in the types of serving/schema.py. BentoML serves /models/, /metrics, /livez and the docs UI
behind that door; serving/config.py lists the settings.
"""
from __future__ import annotations

import gc
import logging
import os
import threading

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from lab import bentoml_compat  # noqa: E402
from serving import batching  # noqa: E402
from serving import catalog as C  # noqa: E402
from serving.config import Settings  # noqa: E402
from serving.metrics import publish_guards  # noqa: E402
from serving.middleware import FrontDoor  # noqa: E402
from serving.tryit import TryIt  # noqa: E402

SETTINGS = Settings.from_env()
bentoml_compat.cancel_request_timers()
bentoml_compat.guard_http(header_timeout=SETTINGS.header_timeout, max_header_bytes=SETTINGS.max_header_bytes,
                          max_headers=SETTINGS.max_headers, max_connections=SETTINGS.max_connections,
                          max_connections_per_client=SETTINGS.max_connections_per_client)
if SETTINGS.log_format == "json":
    from serving.logs import use_json_logs

    use_json_logs()
if logging.getLogger("lab").level == logging.NOTSET:  # BentoML's set-up leaves the root at WARNING
    logging.getLogger("lab").setLevel(logging.INFO)
for _guard, _state in bentoml_compat.GUARDS.items():
    logging.getLogger("lab.service").info("%s guard: %s", _guard, _state)


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
    threads=1,  # inference runs on the batching queue's thread (serving/batching.py), SETTINGS.threads inside it
    traffic={"timeout": SETTINGS.timeout},
    logging={"access": {"enabled": False}},  # the front door logs each request once, with its X-Request-ID
    # BentoML's OpenTelemetry middleware makes a span per request (about a tenth of the no-op request's
    # cost here, with no exporter to send it to): not for the classify routes, which log their own line
    tracing={"excluded_urls": ["/classify"]},
    http={"host": "127.0.0.1", "port": 3000},
)
class ImageClassifier:
    """Image classification with Torch and ONNX Runtime backends side by side."""

    def __init__(self) -> None:
        self.catalog = C.Catalog.from_store(SETTINGS)
        C.CURRENT = self.catalog
        self.batcher = batching.Batcher(max_batch=SETTINGS.max_batch_size, max_queue=SETTINGS.max_queue,
                                        max_bytes=SETTINGS.max_queue_bytes,
                                        max_wait_s=SETTINGS.max_latency_ms / 1000,
                                        wait_s=SETTINGS.batch_wait_ms / 1000,
                                        inline_max_s=SETTINGS.inline_max_ms / 1000)
        batching.CURRENT = self.batcher
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
    def _shutdown(self) -> None:
        self._stop.set()
        self.batcher.close()  # answers what is still queued first


ImageClassifier.add_asgi_middleware(FrontDoor, settings=SETTINGS)
bentoml_compat.outermost(FrontDoor)  # the first a request meets, before BentoML's metrics and timeout layers
ImageClassifier.add_asgi_middleware(TryIt)  # GET /: the try-it page (serving/static/); /docs: BentoML's UI
