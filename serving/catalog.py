"""The models the service can answer with: found in BentoML's model store by tag, checked, loaded.

A stored model qualifies when its folder holds a lab model card (card.json). For each model the
backends its card lists are built once per worker, each only after the sha256 of its file matches
the card; a mismatch refuses that backend (or model) with one log line and the rest keep serving.
Nothing here imports torch unless a torch backend is built.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.backends import OnnxBackend, softmax
from serving.card import IntegrityError, read_card, verify_files
from serving.config import Settings
from serving.preprocess import Preprocessing

log = logging.getLogger("lab.serving")


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
        return {"tag": self.tag, "backends": sorted(self.backends), "refused": self.refused,
                "card": self.card}


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


class Catalog:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}   # tag -> model
        self.latest: dict[str, str] = {}           # name -> tag of its newest version
        self.default: str | None = None

    # ------------------------------------------------------------ loading

    @classmethod
    def from_store(cls, settings: Settings) -> "Catalog":
        import bentoml

        cat = cls(settings)
        found: dict[str, list] = {}
        for m in bentoml.models.list():
            if settings.models and m.tag.name not in settings.models:
                continue
            if not (Path(m.path) / "card.json").exists():
                continue  # not one of ours
            found.setdefault(m.tag.name, []).append(m)
        for name, versions in found.items():
            versions.sort(key=lambda m: m.creation_time, reverse=True)
            for m in versions:  # the newest version that passes its checks is the default one
                served = cat._load(str(m.tag), Path(m.path), m.creation_time.timestamp())
                if served is not None and served.backends:
                    cat.latest[name] = served.tag
                    break
        if settings.default_model in cat.latest:
            cat.default = settings.default_model
        elif cat.latest:  # else the newest model in the store
            cat.default = max(cat.latest, key=lambda n: cat.models[cat.latest[n]].created)
        log.info("serving %d model(s): %s; default %s", len(cat.latest),
                 ", ".join(f"{t} [{', '.join(sorted(cat.models[t].backends))}]" for t in cat.latest.values()),
                 cat.default)
        if not cat.latest:
            log.warning("no servable model in the BentoML store: run `python training/run_all.py` first")
        return cat

    def _load(self, tag: str, path: Path, created: float) -> ServedModel | None:
        try:
            card = read_card(path)
            served = ServedModel(tag=tag, name=tag.split(":")[0], path=path, card=card, created=created)
        except (IntegrityError, KeyError, ValueError) as e:
            log.error("refusing model %s: %s", tag, e)
            return None
        for backend in self.settings.backends:
            try:
                obj = self._build(served, backend)
            except IntegrityError as e:
                served.refused[backend] = str(e)
                log.error("refusing %s backend of model %s: %s", backend, tag, e)
                continue
            except _Unavailable as e:
                served.refused[backend] = str(e)
                log.info("no %s backend for model %s: %s", backend, tag, e)
                continue
            served.backends[backend] = obj
        self.models[tag] = served
        return served

    def _build(self, served: ServedModel, backend: str):
        files = served.card.get("backends", {})
        t = self.settings.threads
        if backend in ("onnx", "onnx_int8"):
            if backend not in files:
                raise _Unavailable("the card lists no file for it")
            verify_files(served.path, served.card, only=[files[backend]])
            return OnnxBackend(served.path / files[backend], threads=t)
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

        return TorchBackend(served.path / files["torch"], served.card, threads=t,
                            precision="bf16" if backend == "torch_bf16" else "fp32")

    # ------------------------------------------------------------ lookups

    def resolve(self, name: str | None, version: str | None) -> ServedModel:
        if not name and version:
            raise RequestError(400, "a version needs a model name too")
        name = name or self.default
        if name is None:
            raise RequestError(404, "no model is served: the model store has none "
                                    "(run `python training/run_all.py`)")
        if ":" in name and version is None:
            name, version = name.split(":", 1)
        if not version or version == "latest":
            tag = self.latest.get(name)
            if tag is None:
                raise RequestError(404, f"unknown model {name!r}; served models: "
                                        f"{', '.join(sorted(self.latest)) or 'none'}")
            return self.models[tag]
        tag = f"{name}:{version}"
        if tag in self.models:
            return self.models[tag]
        if name not in self.latest:
            raise RequestError(404, f"unknown model {name!r}; served models: "
                                    f"{', '.join(sorted(self.latest)) or 'none'}")
        return self._load_version(name, version)

    def _load_version(self, name: str, version: str) -> ServedModel:
        """An older version, loaded on first use (the store lookup goes by tag only)."""
        import bentoml
        from bentoml.exceptions import BentoMLException

        if not version.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise RequestError(400, f"malformed version {version!r}")
        try:
            m = bentoml.models.get(f"{name}:{version}")
        except BentoMLException:
            raise RequestError(404, f"model {name!r} has no version {version!r}") from None
        served = self._load(str(m.tag), Path(m.path), m.creation_time.timestamp())
        if served is None:
            raise RequestError(404, f"model {name}:{version} is not servable (see the server log)")
        return served

    def backend(self, model: ServedModel, backend: str):
        if backend in model.backends:
            return model.backends[backend]
        if backend in model.refused:
            raise RequestError(404, f"backend {backend!r} of model {model.tag} is not served: "
                                    f"{model.refused[backend]}")
        raise RequestError(400, f"unknown backend {backend!r}; model {model.tag} has: "
                                f"{', '.join(sorted(model.backends)) or 'none'}")

    def describe(self) -> dict:
        return {"default": self.default,
                "models": {name: self.models[tag].describe() for name, tag in sorted(self.latest.items())}}

    # ------------------------------------------------------------ inference

    def infer(self, items: list) -> list[dict]:
        """Run a batch of request items (serving.http_io.Item), grouped by model and backend.

        Returns one result per item, in order: {"status": 200, "body": {...}} or the item's error.
        """
        results: list[dict | None] = [None] * len(items)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, it in enumerate(items):
            if it.error is not None:
                results[i] = {"status": it.error[0], "body": {"error": it.error[1]}}
            else:
                groups.setdefault((it.model, it.backend), []).append(i)
        for (tag, backend_name), idx in groups.items():
            model = self.models[tag]
            backend = model.backends[backend_name]
            batch = np.stack([items[i].x for i in idx])
            t0 = time.perf_counter()
            probs = softmax(backend.predict(batch).astype(np.float64))
            ms = (time.perf_counter() - t0) * 1000
            for row, i in zip(probs, idx):
                k = items[i].top_k
                top = np.argsort(-row)[:k]
                results[i] = {"status": 200, "body": {
                    "model": tag, "backend": backend_name,
                    "predictions": [{"label": model.classes[j], "index": int(j), "probability": float(row[j])}
                                    for j in top],
                    "inference_ms": round(ms, 3), "batch_size": len(idx),
                    "preprocess_ms": round(items[i].preprocess_ms, 3),
                    **({"filename": items[i].filename} if items[i].filename else {}),
                }}
        return results


class _Unavailable(Exception):
    pass


# One catalog per worker process, set by the service at start-up; read by the request parsers.
CURRENT: Catalog | None = None
