"""What a backend is, and the registry that holds them.

A backend turns a float32 NCHW batch (from lab.preprocess) into logits for one stored model. Each is
one class in one file of this package, declaring its name, the file of the model folder it runs, and
how it loads, predicts and which devices it uses:

    @register_backend
    class OnnxBackend(Backend):
        name, file = "onnx", "model.sim.onnx"
        def __init__(self, path, card, threads=None): ...
        def predict(self, batch): ...

The service, the model card, the OpenAPI description, the accuracy report and the benchmarks all
enumerate this registry. Modules named in $LAB_PLUGINS (comma-separated) are imported when the
registry loads, so a backend can live outside this package too.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from lab.card import Card


class BackendUnavailable(Exception):
    """This backend cannot run here (no torch, no bf16, no file for it): not a fault of the model."""


class UnknownBackendError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class Backend:
    name: ClassVar[str]
    file: ClassVar[str]                      # the file of the model folder it runs
    description: ClassVar[str] = ""
    serve_by_default: ClassVar[bool] = True  # built by the service unless LAB_BACKENDS says otherwise
    shape_warmup: ClassVar[bool] = False     # its first call at each batch size is slow: the service calls
                                             # it once at every size up to its largest batch before serving
    computes_model: ClassVar[bool] = True    # it runs the model: the service proves its golden answers at
                                             # load (lab/golden.py); False only for a benchmark's stand-in
    # what the rung is, for the ladder (training/ladder.py) and the card's `rungs`:
    network: ClassVar[str] = "served"        # the network it runs: "served", or a student's name
    method: ClassVar[str] = "runtime"        # how it was made cheaper: runtime | distillation | pruning | qat
    views: ClassVar[int] = 0                 # images through the network per image; 0 = the card's TTA views

    @classmethod
    def check_available(cls) -> None:
        """Raise BackendUnavailable(reason) when this machine cannot run it."""

    @classmethod
    def devices(cls) -> list[str]:
        """Where it would run here, in order of preference (execution providers, torch devices)."""
        return ["cpu"]

    def __init__(self, path: Path, card: "Card", threads: int | None = None):
        raise NotImplementedError

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    for attr in ("name", "file"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"backend {cls.__name__} must declare `{attr}` as a string")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"backend {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_backends() -> list[str]:
    """Every registered backend, in registration order."""
    return list(_REGISTRY)


def default_backends() -> list[str]:
    return [n for n, b in _REGISTRY.items() if b.serve_by_default]


def get_backend(name: str) -> type[Backend]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(f"unknown backend {name!r}; valid backends: {', '.join(_REGISTRY)}") from None


def backends_for_files(files) -> dict[str, str]:
    """backend name -> file, for every registered backend whose file is among `files`."""
    return {n: b.file for n, b in _REGISTRY.items() if b.file in set(files)}


def load_backend(name: str, model_dir: Path | str, card: "Card", threads: int | None = None) -> Backend:
    """Build backend `name` for the stored model in model_dir, after checking its file's sha256.

    Raises BackendUnavailable when it cannot run here or the model has no file for it, IntegrityError
    when its file does not match the card."""
    from lab.card import inside, verify_files

    cls = get_backend(name)
    if cls.file not in card.files:
        raise BackendUnavailable(f"the model has no {cls.file}")
    cls.check_available()
    verify_files(model_dir, card, only=[cls.file])
    return within_max_batch(cls(inside(model_dir, cls.file), card, threads=threads), card)


class ChunkedBackend:
    """A backend whose graph takes at most `max_batch` images a call (an imported graph whose batch axis
    could not be made free): a larger batch runs as several calls, so the service batches it as any other."""

    def __init__(self, backend: Backend, max_batch: int):
        self.backend, self.max_batch = backend, max_batch

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) <= self.max_batch:
            return self.backend.predict(batch)
        return np.concatenate([self.backend.predict(batch[i:i + self.max_batch])
                               for i in range(0, len(batch), self.max_batch)])


def within_max_batch(backend: Backend, card) -> Backend:
    """The backend as is, or chunked when the card says its graph takes at most max_batch images."""
    limit = getattr(card, "max_batch", 0) or 0
    return ChunkedBackend(backend, limit) if limit else backend


def load_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get("LAB_PLUGINS", "").split(","))):
        importlib.import_module(module)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
