"""The BentoML workarounds (lab/bentoml_compat.py): each test fails when its workaround stops working,
e.g. after a BentoML upgrade, so that someone looks before it breaks silently."""
from __future__ import annotations

import bentoml
import pytest

from lab import bentoml_compat as compat
from lab.paths import models_dir


def test_the_pinned_bentoml_is_a_tested_version():
    assert compat.tested_version(), (f"bentoml {bentoml.__version__} is not in {compat.TESTED}: check both "
                                     f"workarounds below against it, then add it to TESTED")


def test_the_store_is_where_bentoml_keeps_it():
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert models_dir().resolve() == type(models_dir())(BentoMLContainer.model_store_dir.get()).resolve()


def test_staged_create_builds_the_model_outside_the_store(tmp_path):
    staging = tmp_path / "staging"
    with compat.create_staged("compat-staged", {}, {"k": 1}, staging) as model:
        (tmp_path / "x").write_text("x")
        with open(model.path_of("file.txt"), "w") as f:
            f.write("hello")
        tag = model.tag
    staged = compat.staged_path(staging, tag)
    assert staged is not None and (staged / "file.txt").read_text() == "hello"
    assert (staged / "model.yaml").exists()
    with pytest.raises(bentoml.exceptions.NotFound):  # nothing visible in the real store yet
        bentoml.models.get(tag)


def test_the_pinned_uvicorn_is_a_tested_version():
    import uvicorn

    assert uvicorn.__version__ in compat.TESTED_UVICORN, (
        f"uvicorn {uvicorn.__version__} is not in {compat.TESTED_UVICORN}: check guard_http against it")


def test_an_untested_uvicorn_stops_the_http_guard_closed(monkeypatch):
    """The guard never steps aside quietly: an untested uvicorn raises GuardUnavailable (one line naming
    the versions and the setting), unless LAB_ALLOW_UNGUARDED=1, which leaves it off and says so."""
    import uvicorn
    from uvicorn.protocols.http import auto

    before = auto.AutoHTTPProtocol
    monkeypatch.setattr(uvicorn, "__version__", "0.999.0")
    monkeypatch.delenv(compat.ALLOW_UNGUARDED, raising=False)
    monkeypatch.setattr(compat, "GUARDS", {})
    args = dict(header_timeout=1, max_header_bytes=4096, max_headers=10, max_connections=10,
                max_connections_per_client=2)
    with pytest.raises(compat.GuardUnavailable) as e:
        compat.guard_http(**args)
    text = str(e.value)
    assert "uvicorn 0.999.0" in text and compat.TESTED_UVICORN[0] in text and "LAB_ALLOW_UNGUARDED=1" in text
    assert "\n" not in text and auto.AutoHTTPProtocol is before and compat.GUARDS == {}
    monkeypatch.setenv(compat.ALLOW_UNGUARDED, "1")
    assert compat.guard_http(**args) is None and auto.AutoHTTPProtocol is before
    assert compat.GUARDS["http"].startswith("OFF") and "0.999.0" in compat.GUARDS["http"]


def test_a_service_on_an_untested_uvicorn_refuses_to_start_unless_allowed(store, tmp_path):
    import requests

    from bench.server import Server

    import shutil

    home = tmp_path / "bentoml"  # its own home: BentoML keeps each home's metrics in one folder
    shutil.copytree(store["root"] / "bentoml" / "models" / "cifar10-airbench-smoke",
                    home / "models" / "cifar10-airbench-smoke")
    env = dict(store["env"], BENTOML_HOME=str(home), LAB_PLUGINS="tests.plugin_untested_uvicorn",
               LAB_DEFAULT_MODEL="cifar10-airbench-smoke")
    env.pop(compat.ALLOW_UNGUARDED, None)
    with pytest.raises(RuntimeError) as e:
        Server(env, tmp_path / "refused.log", startup_timeout=60).stop()
    log = (tmp_path / "refused.log").read_text()
    assert "exited with" in str(e.value), log
    assert "the http guard cannot install itself: uvicorn 0.999.0" in log and "LAB_ALLOW_UNGUARDED=1" in log, log
    assert "Traceback" not in log, log
    with Server(env, tmp_path / "allowed.log", {compat.ALLOW_UNGUARDED: "1"}) as s:
        ready = requests.get(f"{s.url}/readyz", timeout=10).json()
        assert ready["ready"] and ready["guards"]["http"].startswith("OFF (LAB_ALLOW_UNGUARDED=1)"), ready
        metrics = requests.get(f"{s.url}/metrics", timeout=10).text
        assert 'lab_guard_active{guard="http"} 0.0' in metrics, metrics[-2000:]
    assert "serving WITHOUT the http guard" in (tmp_path / "allowed.log").read_text()


def test_a_service_on_the_locked_install_reports_its_guard_active(server):
    import requests

    ready = requests.get(f"{server.url}/readyz", timeout=10).json()
    assert ready["guards"]["http"].startswith("active"), ready
    assert 'lab_guard_active{guard="http"} 1.0' in requests.get(f"{server.url}/metrics", timeout=10).text


def test_http_guard_is_the_protocol_bentoml_workers_get():
    """BentoML's worker builds uvicorn.Config without an `http=` choice, so uvicorn resolves "auto" at
    load time, after the service module (which installs the guard) is imported."""
    import inspect

    import uvicorn
    from _bentoml_impl.worker import service as worker
    from uvicorn.protocols.http import auto
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    src = inspect.getsource(worker.main.callback)  # a click command
    config_call = src[src.index("uvicorn.Config("):src.index("uvicorn.Server(")]
    assert "http=" not in config_call and "uvicorn.Server(config).run" in src
    before = auto.AutoHTTPProtocol
    try:
        guarded = compat.guard_http(header_timeout=1, max_header_bytes=4096, max_headers=10, max_connections=10,
                                    max_connections_per_client=2)
        assert guarded is not None and issubclass(guarded, HttpToolsProtocol)
        config = uvicorn.Config(app=lambda *a: None, log_config=None)
        config.load()
        assert config.http_protocol_class is guarded
        again = compat.guard_http(header_timeout=1, max_header_bytes=4096, max_headers=10, max_connections=10,
                                  max_connections_per_client=2)
        assert again.__mro__[1] is HttpToolsProtocol  # installing twice does not stack subclasses
        for hook in ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_header",
                     "on_headers_complete", "send_400_response"):
            assert hook in vars(HttpToolsProtocol), hook  # what the guard overrides still exists upstream
    finally:
        auto.AutoHTTPProtocol = before


def test_request_timers_are_cancelled_when_the_request_is_done():
    """BentoML's TimeoutMiddleware leaves each request's timer scheduled for the whole timeout; the
    installed one cancels it, and still answers 504 past the timeout."""
    import asyncio

    from bentoml._internal.server.http import traffic

    stock = getattr(traffic, "_lab_original_timeout", traffic.TimeoutMiddleware)
    patched = compat.cancel_request_timers()
    assert traffic.TimeoutMiddleware is patched and patched.__mro__[1] is stock
    assert compat.cancel_request_timers().__mro__[1] is stock  # installing twice does not stack subclasses

    async def quick(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def stuck(scope, receive, send):
        await asyncio.sleep(10)

    def timers_left(cls, app, timeout=60) -> tuple[int, list]:
        async def go():
            sent = []

            async def send(message):
                sent.append(message)

            await cls(app, timeout=timeout)({"type": "http"}, None, send)
            await asyncio.sleep(0)  # a cancelled app's own timers go once its cancellation has run
            return sum(not h.cancelled() for h in asyncio.get_running_loop()._scheduled), sent
        return asyncio.run(go())

    assert timers_left(stock, quick)[0] == 1    # upstream: the 60 s timer outlives the request
    assert timers_left(patched, quick)[0] == 0  # here: gone with it
    left, sent = timers_left(patched, stuck, timeout=0.05)
    assert sent[0]["status"] == 504 and left == 0


def test_the_front_door_is_the_first_middleware_a_request_meets():
    """outermost() moves a service's middleware in front of BentoML's metrics, tracing and timeout
    middlewares in the app BentoML builds; without it, add_asgi_middleware puts it behind them."""
    import bentoml
    from _bentoml_impl.server.app import ServiceAppFactory

    class Door:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            await self.app(scope, receive, send)

    @bentoml.service(name="door_probe", traffic={"timeout": 5})
    class Probe:
        @bentoml.api
        def hello(self) -> str:
            return "hello"

    Probe.add_asgi_middleware(Door)
    Probe.inject_config()
    factory = ServiceAppFactory(Probe, is_main=True)
    stock = [m.cls.__name__ for m in factory.middlewares]
    timeout = next(i for i, name in enumerate(stock) if name.endswith("TimeoutMiddleware"))  # ours cancels its timer
    assert stock.index("Door") > timeout, stock
    assert compat.outermost(Door)
    assert [m.cls.__name__ for m in factory.middlewares][0] == "Door"
    app = factory()
    assert app.user_middleware[0].cls is Door  # Starlette builds its stack from this list, first = outermost
