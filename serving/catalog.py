"""The models the service can answer with: found in BentoML's model store by tag, checked, loaded.

A stored model qualifies when its folder holds a lab model card (lab.card). At start-up every version
is indexed and the newest version of each name is loaded; an older version is loaded (off the event
loop) the first time a request names it exactly, and only a few stay loaded. Each backend of the
registry (lab.backends) is built only after the sha256 of its file matches the card; any failure
refuses that backend (or the model, for a bad card) with one log line and the rest keep serving.
Nothing here imports torch unless a torch backend is built.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lab.backends import BackendUnavailable, load_backend, softmax
from lab.card import Card, read_card
from lab.preprocess import Preprocessing
from lab.store import lab_models
from serving.config import Settings

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
    card: Card
    created: float
    backends: dict = field(default_factory=dict)   # name -> backend object
    refused: dict = field(default_factory=dict)    # name -> reason

    @property
    def spec(self) -> Preprocessing:
        return self.card.preprocessing

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def describe(self) -> dict:
        return {"tag": self.tag, "backends": sorted(self.backends), "refused": self.refused,
                "card": self.card.public_dict()}


class Catalog:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.index: dict[str, dict[str, tuple[Path, float]]] = {}  # name -> version -> (path, created)
        self.latest: dict[str, ServedModel] = {}                    # name -> its newest servable version
        self.older: OrderedDict[str, ServedModel] = OrderedDict()   # tag -> model, an LRU
        self.refused_models: dict[str, str] = {}                    # tag -> why it cannot be served
        self.default: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ loading

    @classmethod
    def from_store(cls, settings: Settings) -> "Catalog":
        cat = cls(settings)

        def broken(tag, e):
            log.error("skipping stored model %s: %s", tag, e)
            cat.refused_models[tag] = f"{type(e).__name__}: {e}"

        for m in lab_models(settings.models, on_error=broken):
            cat.index.setdefault(m.name, {})[m.version] = (m.path, m.created)
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
            card = read_card(path)
        except Exception as e:  # CardError: one line naming what is wrong with it
            log.error("refusing model %s: %s", tag, e)
            self.refused_models[tag] = str(e)
            return None
        served = ServedModel(tag=tag, name=tag.split(":")[0], path=path, card=card, created=created)
        for backend in self.settings.backends:
            try:
                served.backends[backend] = load_backend(backend, path, card, threads=self.settings.threads)
            except BackendUnavailable as e:
                served.refused[backend] = str(e)
                log.info("no %s backend for model %s: %s", backend, tag, e)
            except Exception as e:  # IntegrityError, a model file the runtime rejects, ...
                served.refused[backend] = f"{type(e).__name__}: {e}"
                log.error("refusing %s backend of model %s: %s", backend, tag, e)
        if not served.backends:
            self.refused_models[tag] = "no backend could be built: " + "; ".join(
                f"{b}: {r}" for b, r in served.refused.items())
        return served

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
            refused = [f"{tag}: {why}" for tag, why in self.refused_models.items() if tag.split(":")[0] == name]
            if refused:
                raise RequestError(404, f"model {name!r} is not served: {refused[0]}")
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
                "versions": {name: sorted(v) for name, v in sorted(self.index.items())},
                "refused": dict(sorted(self.refused_models.items()))}

    # ------------------------------------------------------------ inference

    def infer(self, items: list) -> list[dict]:
        """Run a batch of request items (serving.http_io.Item), grouped by model and backend.

        Returns one result per item, in order: {"status": 200, "body": {...}} or an error. A failure in
        one group answers 500 for that group's items only; a None item (its request has gone: a timeout)
        answers 503.
        """
        results: list[dict | None] = [None] * len(items)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, it in enumerate(items):
            if it is None:
                results[i] = {"status": 503, "body": {"error": "the request timed out before inference"}}
            elif it.error is not None:
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
