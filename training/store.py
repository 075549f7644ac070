"""Publishing into BentoML's model store, all or nothing.

BentoML's own `save` copies a model folder into the store file by file, so a kill -9 half-way leaves
a half-model that `bentoml models list` would show. We stage instead: `bentoml.models.create` writes
the whole model (its temporary folder too) into a private staging area beside the store, on the same
filesystem; every file is re-hashed against the card and synced, and one `os.rename` moves the finished
folder into `<store>/<name>/<version>`. Before the rename nothing is visible; after it everything is.
A kill between the rename and the update of the `latest` pointer is repaired by the next run_all.py
(`repair_latest`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
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
    staging_root = staging_dir() / uuid.uuid4().hex
    staging_root.mkdir(parents=True)
    saved_tempdir = tempfile.tempdir
    try:
        tempfile.tempdir = str(staging_root)  # bentoml.models.create's own temporary folder goes here too
        with bentoml.models.create(name, labels=labels or {}, metadata=_clean(card),
                                   _model_store=ModelStore(staging_root / "store")) as model:
            for arcname, src in files.items():
                shutil.copyfile(src, model.path_of(arcname))
            tag = model.tag
            (Path(model.path_of(CARD_FILE))).write_text(json.dumps(card, indent=1))
        tempfile.tempdir = saved_tempdir
        staged = staging_root / "store" / tag.name / tag.version
        verify_files(staged, card)  # the copies are byte-identical to what was verified
        for p in staged.rglob("*"):
            if p.is_file():
                _fsync(p)
        final = store_root / tag.name / tag.version
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)  # the atomic step
        _fsync(final.parent, directory=True)
        _write_latest(store_root / tag.name, tag.version)
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(staging_root, ignore_errors=True)
    got = bentoml.models.get(Tag(tag.name, tag.version))
    verify_files(got.path, card)
    return str(got.tag)


def staging_dir() -> Path:
    """Beside the store (same filesystem, so the final rename is atomic), never inside it."""
    return models_dir().parent / ".lab-staging"


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(name_dir: Path, version: str) -> None:
    tmp = name_dir / f".latest.{os.getpid()}"
    tmp.write_text(version)
    os.replace(tmp, name_dir / "latest")


def clean_staging() -> int:
    """Remove staging folders left by killed runs (never visible to the store); returns how many."""
    root = staging_dir()
    n = 0
    if root.is_dir():
        for d in root.iterdir():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def repair_latest() -> list[str]:
    """Point each model's `latest` at its newest version (a kill right after the rename leaves the old)."""
    import bentoml

    fixed = []
    root = models_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            versions = bentoml.models.list(d.name)
        except Exception:
            continue
        if not versions:
            continue
        newest = max(versions, key=lambda m: m.creation_time).tag.version
        latest = d / "latest"
        if not latest.exists() or latest.read_text().strip() != newest:
            _write_latest(d, newest)
            fixed.append(f"{d.name}:{newest}")
    return fixed


__all__ = ["publish", "store_lock", "clean_staging", "repair_latest", "StoreBusyError", "IntegrityError",
           "models_dir"]
