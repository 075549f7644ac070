"""The models the service can answer with: found in BentoML's model store by tag, checked, loaded.

A stored model qualifies when its folder holds a lab model card (card.json). At start-up every version
is indexed and the newest version of each name is loaded; an older version is loaded (off the event
loop) the first time a request names it exactly, and only a few stay loaded. Each backend is built only
after the sha256 of its file matches the card; any failure refuses that backend (or model) with one log
line and the rest keep serving. Nothing here imports torch unless a torch backend is built.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.backends import OnnxBackend, softmax
from serving.card import inside, read_card, verify_files
from serving.config import Settings
from serving.preprocess import Preprocessing

log = logging.getLogger("lab.serving")
OLD_VERSIONS_LOADED = 3  # older versions kept loaded at once, per worker (least recently used go)


class RequestError(Exception):
    """A client error: HTTP `status` with a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServedModel:
    tag: str                       # name:version
    name: str
    path: Path
    card: dict
    created: float
    spec: Preprocessing = field(init=False)
    backends: dict = field(default_factory=dict)   # name -> backend object
    refused: dict = field(default_factory=dict)    # name -> reason

    def __post_init__(self):
        self.spec = Preprocessing.from_dict(self.card["preprocessing"])

    @property
    def classes(self) -> list[str]:
        return self.card["classes"]

    def describe(self) -> dict:
        card = copy.deepcopy(self.card)  # without this server's paths
        card.pop("run_dir", None)
        card.get("dataset", {}).pop("root", None)
        return {"tag": self.tag, "backends": sorted(self.backends), "refused": self.refused, "card": card}


class _Unavailable(Exception):
    pass


def _torch_importable() -> str | None:
    try:
        import torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"torch cannot be imported ({type(e).__name__}: {e})"
    return None


def _native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _store_models(names: tuple[str, ...]):
    """(tag, path, created) of every stored model with a lab card; a broken entry is skipped, not fatal."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = Path(BentoMLContainer.model_store_dir.get())
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or (names and d.name not in names):
            continue
        try:
            models = bentoml.models.list(d.name)
        except Exception as e:
            log.error("skipping stored model %s: %s", d.name, e)
            continue
        for m in models:
            if (Path(m.path) / "card.json").exists():
                yield str(m.tag), Path(m.path), m.creation_time.timestamp()


class Catalog:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.index: dict[str, dict[str, tuple[Path, float]]] = {}  # name -> version -> (path, created)
        self.latest: dict[str, ServedModel] = {}                    # name -> its newest servable version
        self.older: OrderedDict[str, ServedModel] = OrderedDict()   # tag -> model, an LRU
        self.default: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ loading

    @classmethod
    def from_store(cls, settings: Settings) -> "Catalog":
        cat = cls(settings)
        for tag, path, created in _store_models(settings.models):
            name, version = tag.split(":", 1)
            cat.index.setdefault(name, {})[version] = (path, created)
        for name, versions in cat.index.items():
            for version, (path, created) in sorted(versions.items(), key=lambda kv: -kv[1][1]):
                served = cat._load(f"{name}:{version}", path, created)
                if served is not None and served.backends:  # the newest version that passes its checks
                    cat.latest[name] = served
                    break
        if settings.default_model in cat.latest:
            cat.default = settings.default_model
        elif cat.latest:  # else the newest model in the store
            cat.default = max(cat.latest, key=lambda n: cat.latest[n].created)
        log.info("serving %d model(s): %s; default %s", len(cat.latest),
                 ", ".join(f"{m.tag} [{', '.join(sorted(m.backends))}]" for m in cat.latest.values()), cat.default)
        if not cat.latest:
            log.warning("no servable model in the BentoML store: run `python training/run_all.py` first")
        return cat

    def _load(self, tag: str, path: Path, created: float) -> ServedModel | None:
        try:
            served = ServedModel(tag=tag, name=tag.split(":")[0], path=path, card=read_card(path), created=created)
        except Exception as e:
            log.error("refusing model %s: %s", tag, e)
            return None
        for backend in self.settings.backends:
            try:
                served.backends[backend] = self._build(served, backend)
            except _Unavailable as e:
                served.refused[backend] = str(e)
                log.info("no %s backend for model %s: %s", backend, tag, e)
            except Exception as e:  # IntegrityError, a model file the runtime rejects, ...
                served.refused[backend] = f"{type(e).__name__}: {e}"
                log.error("refusing %s backend of model %s: %s", backend, tag, e)
        return served

    def _build(self, served: ServedModel, backend: str):
        files = served.card.get("backends", {})
        t = self.settings.threads
        if backend in ("onnx", "onnx_int8"):
            if backend not in files:
                raise _Unavailable("the card lists no file for it")
            verify_files(served.path, served.card, only=[files[backend]])
            return OnnxBackend(inside(served.path, files[backend]), threads=t)
        # torch and torch_bf16 both run model.pth
        if "torch" not in files:
            raise _Unavailable("the card lists no file for it")
        if backend == "torch_bf16" and not _native_bf16():
            raise _Unavailable("this CPU has no native bf16")
        reason = _torch_importable()
        if reason:
            raise _Unavailable(reason)
        verify_files(served.path, served.card, only=[files["torch"]])
        from serving.backends import TorchBackend

        return TorchBackend(inside(served.path, files["torch"]), served.card, threads=t,
                            precision="bf16" if backend == "torch_bf16" else "fp32")

    # ------------------------------------------------------------ lookups

    def _pick(self, name: str | None, version: str | None) -> tuple[str, str | None]:
        if not name and version:
            raise RequestError(400, "a version needs a model name too")
        name = name or self.default
        if name is None:
            raise RequestError(404, "no model is served: the model store has none (run `python training/run_all.py`)")
        if ":" in name and version is None:
            name, version = name.split(":", 1)
        if name not in self.latest:
            raise RequestError(404, f"unknown model {name!r}; served models: {', '.join(sorted(self.latest)) or 'none'}")
        version = (version or "").lower()  # BentoML stores versions in lower case
        if version in ("", "latest") or version == self.latest[name].tag.split(":", 1)[1]:
            return name, None
        if version not in self.index.get(name, {}):
            raise RequestError(404, f"model {name!r} has no version {version!r}")
        return name, version

    def loaded(self, name: str | None, version: str | None) -> ServedModel | None:
        """The model a request names if it is loaded (None: load_version it first). Raises RequestError."""
        name, version = self._pick(name, version)
        if version is None:
            return self.latest[name]
        return self.older.get(f"{name}:{version}")

    def load_version(self, name: str | None, version: str | None) -> ServedModel:
        """Load an indexed older version (slow: hashing and sessions), meant for a worker thread."""
        name, version = self._pick(name, version)
        if version is None:
            return self.latest[name]
        tag = f"{name}:{version}"
        with self._lock:
            if tag in self.older:
                self.older.move_to_end(tag)
                return self.older[tag]
            path, created = self.index[name][version]
            served = self._load(tag, path, created)
            if served is None or not served.backends:
                raise RequestError(404, f"model {tag} is not servable: "
                                        f"{'; '.join(f'{b}: {r}' for b, r in (served.refused if served else {}).items())}")
            self.older[tag] = served
            while len(self.older) > OLD_VERSIONS_LOADED:
                self.older.popitem(last=False)  # in-flight items keep their own reference
            return served

    @staticmethod
    def backend(model: ServedModel, backend: str):
        if backend in model.backends:
            return model.backends[backend]
        if backend in model.refused:
            raise RequestError(404, f"backend {backend!r} of model {model.tag} is not served: {model.refused[backend]}")
        raise RequestError(400, f"unknown backend {backend!r}; model {model.tag} has: "
                                f"{', '.join(sorted(model.backends)) or 'none'}")

    def describe(self) -> dict:
        return {"default": self.default,
                "models": {name: m.describe() for name, m in sorted(self.latest.items())},
                "versions": {name: sorted(v) for name, v in sorted(self.index.items())}}

    # ------------------------------------------------------------ inference

    def infer(self, items: list) -> list[dict]:
        """Run a batch of request items (serving.http_io.Item), grouped by model and backend.

        Returns one result per item, in order: {"status": 200, "body": {...}} or an error. A failure in
        one group answers 500 for that group's items only.
        """
        results: list[dict | None] = [None] * len(items)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, it in enumerate(items):
            if it.error is not None:
                results[i] = {"status": it.error[0], "body": {"error": it.error[1]}}
            else:
                groups.setdefault((id(it.model), it.backend), []).append(i)
        for (_, backend_name), idx in groups.items():
            model = items[idx[0]].model
            try:
                t0 = time.perf_counter()
                batch = np.stack([items[i].x for i in idx])
                probs = softmax(model.backends[backend_name].predict(batch).astype(np.float64))
                ms = (time.perf_counter() - t0) * 1000
            except Exception as e:
                log.exception("inference failed on %s/%s for a batch of %d", model.tag, backend_name, len(idx))
                for i in idx:
                    results[i] = {"status": 500, "body": {"error": f"inference failed: {type(e).__name__}"}}
                continue
            for row, i in zip(probs, idx):
                it = items[i]
                top = np.argsort(-row)[:it.top_k]
                results[i] = {"status": 200, "body": {
                    "model": model.tag, "backend": backend_name,
                    "predictions": [{"label": model.classes[j], "index": int(j), "probability": float(row[j])}
                                    for j in top],
                    "inference_ms": round(ms, 3), "batch_size": len(idx),
                    "preprocess_ms": round(it.preprocess_ms, 3), "queue_ms": round((t0 - it.ready_at) * 1000, 3),
                    **({"filename": it.filename} if it.filename else {}),
                }}
        return results


# One catalog per worker process, set by the service at start-up; read by the request parsers.
CURRENT: Catalog | None = None
