"""The two places where this project needs more than BentoML's public API; each behind a version check.

BentoML's public API covers almost everything here: models are created with `bentoml.models.create`,
found with `bentoml.models.get/list` by tag, and served through typed, batchable `@bentoml.api`
methods. It cannot do two things we need:

1. **All-or-nothing publishing.** `bentoml.models.create` copies the finished model into the store file by
   file (`shutil.copytree`), so a kill half-way leaves a half-model that `bentoml models list` shows.
   We let it create the model in a private staging store beside the real one (its `_model_store`
   argument, undocumented), then move the finished folder into the store with one `os.rename`.
2. **A learned batching wait that holds lone requests.** BentoML's adaptive-batching dispatcher
   (`bentoml/_internal/marshal/dispatcher.py`) learns a `wait` from the queueing time of recent batches;
   after a burst of load even a lone request is held that long (measured here: 116 ms at concurrency 1
   after a concurrency-64 run, against 7 ms before it). We cap the learned wait (default 0: a batch
   leaves as soon as the model is free). Reported upstream behaviour: see README, "Notes on BentoML".

Both are checked against the pinned BentoML version (TESTED); on another version they step aside with
one warning (publishing falls back to the public, non-atomic `bentoml.models.create`, which the
service's sha256 check still protects; the batching cap is not installed), and tests/test_bentoml_compat.py
fails so that someone looks.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import bentoml

log = logging.getLogger("lab.bentoml_compat")
TESTED = ("1.4.40",)


def tested_version() -> bool:
    return bentoml.__version__ in TESTED


def _warn_untested(what: str) -> None:
    log.warning("bentoml %s is not a version this project tested (%s): %s", bentoml.__version__,
                ", ".join(TESTED), what)


# ---------------------------------------------------------------- 1. staged publishing


@contextmanager
def create_staged(name: str, labels: dict, metadata: dict, staging: Path):
    """`bentoml.models.create` into a private store under `staging`; yields the model being written.

    After the block, the finished model folder is `staging/store/<name>/<version>` (see staged_path).
    On an untested BentoML version the model goes straight into the real store (not atomic)."""
    if not tested_version():
        _warn_untested("publishing is not atomic")
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            yield model
        return
    from bentoml._internal.models.model import ModelStore

    with bentoml.models.create(name, labels=labels, metadata=metadata,
                               _model_store=ModelStore(staging / "store")) as model:
        yield model


def staged_path(staging: Path, tag) -> Path | None:
    """Where create_staged left the finished model, or None if it went straight into the store."""
    path = staging / "store" / tag.name / tag.version
    return path if path.is_dir() else None


def point_latest(name_dir: Path, version: str) -> None:
    """BentoML's `latest` pointer of a model name (a one-line file), replaced atomically."""
    tmp = name_dir / f".latest.{os.getpid()}"
    tmp.write_text(version)
    os.replace(tmp, name_dir / "latest")


# ---------------------------------------------------------------- 2. the batching wait


def cap_learned_batch_wait(max_wait_ms: int) -> bool:
    """Cap the dispatcher's learned wait in every dispatcher created from now on. Returns whether it did."""
    if not tested_version():
        _warn_untested("the batching wait is not capped (lone requests may wait after bursts)")
        return False
    from bentoml._internal.marshal import dispatcher

    base = getattr(dispatcher, "_lab_original_optimizer", dispatcher.Optimizer)

    class CappedWaitOptimizer(base):
        max_wait_s = max_wait_ms / 1000.0

        def trigger_refresh(self):
            super().trigger_refresh()
            self.wait = min(self.wait, self.max_wait_s)

    dispatcher._lab_original_optimizer = base
    dispatcher.Optimizer = CappedWaitOptimizer
    return True
