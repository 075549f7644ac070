"""Publishing into BentoML's model store, all or nothing.

BentoML's own `save` copies a model folder into the store file by file, so a kill -9 half-way leaves
a half-model that `bentoml models list` would show. We stage instead: `bentoml.models.create` writes
the whole model into a private staging store on the same filesystem, every file is re-hashed against
the card, and one `os.rename` moves the finished folder into `$BENTOML_HOME/models/<name>/<version>`.
Before the rename nothing is visible; after it everything is.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from serving.card import CARD_FILE, IntegrityError, file_record, verify_files


class StoreBusyError(RuntimeError):
    pass


def bentoml_home() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def models_dir() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get())


@contextmanager
def store_lock():
    """Exclusive while one run_all.py writes this store; a second gets StoreBusyError at once."""
    home = bentoml_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / ".lab-run_all.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StoreBusyError(f"another run_all.py ({holder}) is writing the model store {home}; "
                             f"wait for it to finish or use another BENTOML_HOME") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _clean(obj):
    """BentoML metadata accepts no None; drop those entries."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def publish(name: str, files: dict[str, Path], card: dict, labels: dict[str, str] | None = None) -> str:
    """Store `files` (name in the model folder -> source path) and `card` as model `name`.

    The card gains a "files" entry with each file's sha256 and size. Returns the new tag.
    """
    import bentoml
    from bentoml._internal.models.model import ModelStore
    from bentoml._internal.tag import Tag

    card = dict(card, files={k: file_record(Path(p)) for k, p in files.items()})
    store_root = models_dir()
    store_root.mkdir(parents=True, exist_ok=True)
    staging_root = bentoml_home() / ".lab-staging" / uuid.uuid4().hex
    staging_root.mkdir(parents=True)
    try:
        with bentoml.models.create(name, labels=labels or {}, metadata=_clean(card),
                                   _model_store=ModelStore(staging_root)) as model:
            for arcname, src in files.items():
                shutil.copyfile(src, model.path_of(arcname))
            tag = model.tag
            (Path(model.path_of(CARD_FILE))).write_text(json.dumps(card, indent=1))
        staged = staging_root / tag.name / tag.version
        verify_files(staged, card)  # the copies are byte-identical to what was verified
        for p in staged.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        final = store_root / tag.name / tag.version
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)  # the atomic step
        latest = store_root / tag.name / "latest"
        tmp = latest.with_name(f".latest.{os.getpid()}")
        tmp.write_text(tag.version)
        os.replace(tmp, latest)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    got = bentoml.models.get(Tag(tag.name, tag.version))
    verify_files(got.path, card)
    return str(got.tag)


def clean_staging() -> int:
    """Remove staging folders left by killed runs (never visible to the store); returns how many."""
    root = bentoml_home() / ".lab-staging"
    n = 0
    if root.is_dir():
        for d in root.iterdir():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


__all__ = ["publish", "store_lock", "clean_staging", "StoreBusyError", "IntegrityError", "models_dir"]
