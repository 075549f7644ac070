"""The models the service can answer with: found in BentoML's model store by tag, checked, loaded.

A stored model qualifies when its folder holds a lab model card (lab.card). At start-up every version
is indexed and the newest version of each name is loaded; an older version is loaded (off the event
loop) the first time a request names it exactly, and only a few stay loaded. Each backend of the
registry (lab.backends) is built only after the sha256 of its file matches the card, and kept only if
a smoke inference gives finite logits of the right shape and it reproduces the model's golden answers
on this machine within the tolerance its card records (lab/golden.py: a runtime that computes another
function on this CPU is refused); any failure refuses that backend (or the model, for a bad card or
unreadable golden answers) with one log line and the rest keep serving.

The default rung, for requests naming no backend: LAB_DEFAULT_BACKEND when set; else the card's rungs
whose test accuracy is within RUNG_MAX_DROP of the reference rung's are each built, proven and timed
here at the service's largest batch, and the fastest serves (`ServedModel.choice` says which, why and
from what measurement; GET /models/ shows it). The rungs built only to be timed are let go.

Hot reload: `rescan()` (every LAB_RELOAD_SECONDS from a thread of each worker, or POST /models/reload
from localhost) indexes versions published since, and loads the newest of each name; it replaces the
version being served only once it is verified (hashes, smoke inference, golden answers) and serves
every backend asked for that the old one served. Until then, and for ever if it is broken, the old version keeps serving; requests in
flight keep the model they started with. Readers on the event loop never see a half-updated catalog:
the watcher builds new dicts and swaps them in.
Nothing here imports torch unless a torch backend is built.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lab import golden as G
from lab.backends import BackendUnavailable, load_backend
from lab.card import Card, read_card
from lab.hardware import cpu_flags
from lab.preprocess import Preprocessing, normalize
from lab.store import lab_models
from serving.config import Settings

log = logging.getLogger("lab.serving")
OLD_VERSIONS_LOADED = 3  # older versions kept loaded at once, per worker (least recently used go)
SPEED_ROUNDS = 3         # calls per rung when the default rung is timed at load (after a first one)


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
    proof: dict = field(default_factory=dict)      # name -> its golden answers measured here (lab/golden.py)
    choice: dict = field(default_factory=dict)     # the default rung chosen on this machine, and why

    @property
    def spec(self) -> Preprocessing:
        return self.card.preprocessing

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def default_backend(self, configured: str = "") -> str:
        """The backend a request naming none gets: the configured one, else the fastest proven rung timed
        on this machine within the accuracy bound (`choice`), else the card's best rung, else onnx, else
        the first built; each only when built."""
        for b in (configured, self.choice.get("backend"), self.card.best_rung, "onnx"):
            if b and b in self.backends:
                return b
        return sorted(self.backends)[0]

    def describe(self, configured_backend: str = "") -> dict:
        default = self.default_backend(configured_backend) if self.backends else None
        why = ("LAB_DEFAULT_BACKEND" if configured_backend and default == configured_backend
               else self.choice.get("why", "") if default == self.choice.get("backend") else
               "the card's best rung (no rung was timed here)" if default == self.card.best_rung else
               "the first backend served")
        return {"tag": self.tag, "backends": sorted(self.backends), "refused": self.refused,
                "default_backend": default, "default_reason": why, "default_choice": self.choice,
                "proof": self.proof, "rungs": (self.card.rungs or {}), "card": self.card.public_dict()}


class Catalog:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._reload_lock = threading.Lock()
        self.store_signature: tuple = ()
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

        cat.store_signature = store_signature()
        for m in lab_models(settings.models, on_error=broken):
            cat.index.setdefault(m.name, {})[m.version] = (m.path, m.created)
        for name, versions in cat.index.items():
            for version, (path, created) in sorted(versions.items(), key=lambda kv: -kv[1][1]):
                served, why = cat._load(f"{name}:{version}", path, created)
                if why is None:  # the newest version that passes its checks
                    cat.latest[name] = served
                    break
                cat.refused_models[f"{name}:{version}"] = why
        cat.default = cat._pick_default(cat.latest)
        log.info("serving %d model(s): %s; default %s", len(cat.latest),
                 ", ".join(f"{m.tag} [{', '.join(sorted(m.backends))}]" for m in cat.latest.values()), cat.default)
        if not cat.latest:
            log.warning("no servable model in the BentoML store: run `python training/run_all.py` first; "
                        "/readyz answers 503 until one is published")
        return cat

    def _load(self, tag: str, path: Path, created: float) -> tuple[ServedModel | None, str | None]:
        """Read the card, build and smoke-test each backend. Returns the model (None for a bad card)
        and why it cannot be served (None when at least one backend serves). Never raises."""
        try:
            card = read_card(path)
        except Exception as e:  # CardError: one line naming what is wrong with it
            log.error("refusing model %s: %s", tag, e)
            return None, str(e)
        served = ServedModel(tag=tag, name=tag.split(":")[0], path=path, card=card, created=created)
        golden = None
        if card.golden:
            try:
                golden = G.load(path, card)
            except Exception as e:  # a golden file whose hash changed: nothing can be proven, nothing served
                log.error("refusing model %s: its golden answers cannot be read: %s", tag, e)
                return served, f"its golden answers cannot be read: {type(e).__name__}: {e}"
        wanted = list(self.settings.backends)
        candidates = [] if self.settings.default_backend else rungs_within_bound(card)
        if self.settings.backends_chosen:
            candidates = [b for b in candidates if b in wanted]
        wanted += [b for b in candidates if b not in wanted]  # built to be proven and timed here
        for backend in wanted:
            try:
                built = load_backend(backend, path, card, threads=self.settings.threads)
                smoke_test(built, card)
                served.proof[backend] = self._prove(tag, backend, built, card, golden)
                served.backends[backend] = built
            except BackendUnavailable as e:
                served.refused[backend] = str(e)
                log.info("no %s backend for model %s: %s", backend, tag, e)
            except Exception as e:  # IntegrityError, a model file the runtime rejects, a failed smoke test, ...
                served.refused[backend] = f"{type(e).__name__}: {e}"
                log.error("refusing %s backend of model %s: %s", backend, tag, e)
        if not served.backends:
            return served, "no backend could be built: " + "; ".join(f"{b}: {r}" for b, r in served.refused.items())
        proven = [b for b in candidates if b in served.backends and served.proof.get(b, {}).get("proven")]
        if proven:
            served.choice = choose_default(served, proven, golden, self.settings.max_batch_size)
            log.info("%s: default rung %s (%s)", tag, served.choice["backend"], served.choice["why"])
        for backend in candidates:  # built only to be timed: let go of those that are neither asked for nor chosen
            if backend not in self.settings.backends and backend != served.choice.get("backend"):
                served.backends.pop(backend, None)
        for backend, built in served.backends.items():
            if built.shape_warmup:
                t0 = time.perf_counter()
                warm_up(built, card, self.settings.max_batch_size)
                log.info("%s of %s: called once at every batch size 1..%d in %.1f s", backend, tag,
                         self.settings.max_batch_size, time.perf_counter() - t0)
        return served, None

    @staticmethod
    def _prove(tag: str, backend: str, built, card: Card, golden) -> dict:
        """Run the backend on the model's golden images; raise golden.ProofFailed when it is off."""
        if not getattr(built, "computes_model", True):
            return {"proven": False, "skipped": "it computes no model by design"}
        if golden is None:
            log.warning("%s of %s: not proven (the card has no golden answers)", backend, tag)
            return {"proven": False, "skipped": "the card has no golden answers"}
        t0 = time.perf_counter()
        result = G.prove(built, backend, *golden, card.preprocessing, card.golden)
        result.update(proven=True, seconds=round(time.perf_counter() - t0, 3))
        m = result["measured_here"]
        log.info("%s of %s: golden answers reproduced (top-1 agreement %.1f%%, mean difference %.2g std, "
                 "%d images, %.2f s)", backend, tag, 100 * m["agreement"], m["mean_diff"], m["images"],
                 result["seconds"])
        return result

    # ------------------------------------------------------------ hot reload

    def _pick_default(self, latest: dict) -> str | None:
        """The configured default model if it is served, else the newest model served, else None."""
        if self.settings.default_model in latest:
            return self.settings.default_model
        return max(latest, key=lambda n: latest[n].created) if latest else None

    def rescan(self, force: bool = False) -> dict:
        """Index versions published since the last scan; serve the newest of each name once verified.

        Returns what changed: {"indexed": [tags], "serving": {name: tag}, "refused": {tag: why}}. Safe
        to call from any thread; one scan at a time."""
        with self._reload_lock:
            signature = store_signature()
            if not force and signature == self.store_signature:
                return {"indexed": [], "serving": {}, "refused": {}}
            index = {name: dict(v) for name, v in self.index.items()}
            refused = dict(self.refused_models)
            latest = dict(self.latest)
            changes: dict = {"indexed": [], "serving": {}, "refused": {}}

            def broken(tag, e):
                if tag not in refused:
                    log.error("skipping stored model %s: %s", tag, e)
                    refused[tag] = changes["refused"][tag] = f"{type(e).__name__}: {e}"

            fresh: dict[str, list] = {}
            for m in lab_models(self.settings.models, on_error=broken):
                if m.version in index.get(m.name, {}):
                    continue
                index.setdefault(m.name, {})[m.version] = (m.path, m.created)
                fresh.setdefault(m.name, []).append(m)
                changes["indexed"].append(m.tag)
            for name, ms in fresh.items():
                newest = max(ms, key=lambda m: m.created)
                current = latest.get(name)
                if current is not None and newest.created <= current.created:
                    continue  # an older version appeared: indexed, loadable by version
                served, why = self._load(newest.tag, newest.path, newest.created)
                kept = set(self.settings.backends)  # the default rung may move; the backends asked for may not
                if why is None and current is not None and (set(current.backends) & kept) - set(served.backends):
                    lost = sorted((set(current.backends) & kept) - set(served.backends))
                    why = (f"it would lose backend(s) {', '.join(lost)} that {current.tag} serves: "
                           + "; ".join(f"{b}: {served.refused.get(b, 'not built')}" for b in lost))
                if why is not None:
                    refused[newest.tag] = changes["refused"][newest.tag] = why
                    log.error("not serving new version %s (%s keeps serving): %s", newest.tag,
                              current.tag if current else "nothing", why)
                    continue
                latest[name] = served
                refused.pop(newest.tag, None)
                changes["serving"][name] = served.tag
                log.info("now serving %s [%s]%s", served.tag, ", ".join(sorted(served.backends)),
                         f" in place of {current.tag}" if current else "")
            # swap in whole dicts: readers on the event loop see the old catalog or the new one
            self.index, self.refused_models, self.latest = index, refused, latest
            if self.default not in latest:
                self.default = self._pick_default(latest)
            self.store_signature = signature
            publish_metrics(self)
            if changes["serving"]:
                _collect_replaced()
            return changes

    def servable(self) -> tuple[bool, str]:
        """Whether a request naming no model can be answered; else why not (for /readyz)."""
        if self.default is not None and self.latest.get(self.default) is not None:
            return True, ""
        if self.refused_models:
            first = next(iter(sorted(self.refused_models.items())))
            return False, (f"no servable model ({len(self.refused_models)} refused; "
                           f"{first[0]}: {first[1]})")
        return False, "no servable model: the model store has none (run `python training/run_all.py`)"

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
            served, why = self._load(tag, path, created)
            if why is not None:
                self.refused_models = dict(self.refused_models, **{tag: why})
                raise RequestError(404, f"model {tag} is not servable: {why}")
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
                "models": {name: m.describe(self.settings.default_backend) for name, m in sorted(self.latest.items())},
                "versions": {name: sorted(v) for name, v in sorted(self.index.items())},
                "refused": dict(sorted(self.refused_models.items()))}


def _collect_replaced() -> None:
    """The service froze everything it loaded at start-up out of the collector's sight (gc.freeze); a
    replaced version may sit in reference cycles among those objects. Unfreeze, collect once, freeze the
    survivors again: one full collection per reload, never per request."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


def smoke_test(backend, card: Card) -> None:
    """A backend must turn a small batch (zeros, and noise) into finite logits of the right shape."""
    spec = card.preprocessing
    x = np.zeros((2, *spec.input_shape), np.float32)
    x[1] = np.random.default_rng(0).standard_normal(x.shape[1:]).astype(np.float32)
    out = np.asarray(backend.predict(x))
    if out.shape != (2, len(card.classes)):
        raise ValueError(f"smoke inference gave shape {out.shape}, expected (2, {len(card.classes)})")
    if not np.all(np.isfinite(out)):
        raise ValueError("smoke inference gave non-finite logits")


def rungs_within_bound(card: Card) -> list[str]:
    """The card's rungs whose test accuracy (measured at export) is within RUNG_MAX_DROP of its reference
    rung's: the candidates for the default, each proven and timed on this machine before it is chosen."""
    rungs = card.rungs or {}
    reference = (card.golden or {}).get("reference") or "onnx"
    if reference not in rungs or "accuracy" not in rungs[reference]:
        return []
    bound = rungs[reference]["accuracy"] - G.RUNG_MAX_DROP - 1e-12
    return [name for name, r in rungs.items() if not r.get("note") and r.get("accuracy", -1.0) >= bound
            and name in card.backends]


def choose_default(served: ServedModel, proven: list[str], golden, max_batch: int) -> dict:
    """The fastest of the proven rungs at the service's largest batch, timed here on golden images (or
    zeros for a card without them): a few calls each, interleaved round by round."""
    spec = served.card.preprocessing
    n = max(1, min(max_batch, 64))
    if golden is not None:
        x = normalize(np.resize(golden[0], (n, *golden[0].shape[1:])), spec)
    else:
        x = np.zeros((n, *spec.input_shape), np.float32)
    seconds: dict[str, list[float]] = {b: [] for b in proven}
    t_all = time.perf_counter()
    for b in proven:
        served.backends[b].predict(x)  # its first call at this size
    for k in range(SPEED_ROUNDS):
        for b in proven[k % len(proven):] + proven[:k % len(proven)]:
            t0 = time.perf_counter()
            served.backends[b].predict(x)
            seconds[b].append(time.perf_counter() - t0)
    speed = {b: round(n / float(np.median(s)), 1) for b, s in seconds.items()}
    best = max(proven, key=lambda b: speed[b])
    ref = (served.card.golden or {}).get("reference") or "onnx"
    why = (f"the fastest of {len(proven)} rung(s) proven on this machine within {100 * G.RUNG_MAX_DROP:.1f} points "
           f"of {ref}'s test accuracy: {speed[best]:.0f} images/s at batch {n}, timed at load")
    return {"backend": best, "why": why, "images_per_s": speed, "batch": n, "rounds": SPEED_ROUNDS,
            "cpu_flags": sorted(f for f, on in cpu_flags().items() if on),
            "exported_best_rung": served.card.best_rung, "seconds": round(time.perf_counter() - t_all, 2)}


def warm_up(backend, card: Card, max_batch: int) -> None:
    """One call at every batch size 1..max_batch (zeros), for a backend that prepares each new shape the
    first time it sees it: no request pays for that."""
    spec = card.preprocessing
    for n in range(1, max_batch + 1):
        backend.predict(np.zeros((n, *spec.input_shape), np.float32))


def store_signature() -> tuple:
    """The model store's name/version folders and latest pointers: cheap; changes when a model is
    published or removed."""
    from lab.paths import models_dir

    root = models_dir()
    out = []
    try:
        for name_dir in sorted(os.scandir(root), key=lambda e: e.name):
            if not name_dir.is_dir() or name_dir.name.startswith("."):
                continue
            versions = sorted(e.name for e in os.scandir(name_dir.path) if e.is_dir())
            out.append((name_dir.name, tuple(versions)))
    except OSError:
        pass
    return tuple(out)


def publish_metrics(cat: "Catalog") -> None:
    from serving.metrics import metrics

    m = metrics()
    if m is None:
        return
    m.models_served.set(len(cat.latest))
    for model in cat.latest.values():
        for b in model.refused:
            m.backend_refused.labels(model.name, b).set(1)


def watch(cat: "Catalog", every: float, stop: threading.Event) -> None:
    """Rescan the store every `every` seconds until `stop` is set (a daemon thread of each worker)."""
    while not stop.wait(every):
        try:
            cat.rescan()
        except Exception:
            log.exception("model store rescan failed; serving what was loaded")


# One catalog per worker process, set by the service at start-up; read by the request parsers.
CURRENT: Catalog | None = None
