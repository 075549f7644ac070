"""BentoML's model store, as this project uses it: publish all-or-nothing; find lab models by tag.

A lab model is a stored model whose folder holds a card.json (lab.card). Publishing stages the whole
model beside the store, re-hashes every file against the card, syncs, and makes it visible with one
rename (lab.bentoml_compat explains the one non-public step). Readers use only `bentoml.models.get`.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.card import CARD_FILE, Card, file_record, verify_files, write_card
from lab.paths import bentoml_home, models_dir, process_tag


class StoreBusyError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoredModel:
    tag: str            # name:version
    name: str
    version: str
    path: Path
    created: float      # POSIX seconds


def lab_models(names: tuple[str, ...] | list[str] = (), on_error=None) -> list[StoredModel]:
    """Every stored version that has a lab card (optionally only these names); newest first per name.

    A broken entry is reported through on_error(tag_or_name, exception) and skipped, never fatal."""
    import bentoml

    out = []
    root = models_dir()
    for name_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if not name_dir.is_dir() or name_dir.name.startswith(".") or (names and name_dir.name not in names):
            continue
        for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
            tag = f"{name_dir.name}:{version_dir.name}"
            try:
                m = bentoml.models.get(tag)
            except Exception as e:
                if on_error:
                    on_error(tag, e)
                continue
            if (Path(m.path) / CARD_FILE).exists():
                out.append(StoredModel(str(m.tag), m.tag.name, m.tag.version, Path(m.path),
                                       m.creation_time.timestamp()))
    out.sort(key=lambda m: (m.name, -m.created))
    return out


def get_model(tag: str) -> StoredModel:
    """A stored model by tag (name, name:latest or name:version); bentoml's NotFound if there is none."""
    import bentoml

    m = bentoml.models.get(tag)
    return StoredModel(str(m.tag), m.tag.name, m.tag.version, Path(m.path), m.creation_time.timestamp())


@contextmanager
def store_lock():
    """Exclusive while one process publishes into this store; a second gets StoreBusyError at once."""
    home = bentoml_home()
    home.mkdir(parents=True, exist_ok=True)
    f = open(home / ".lab-run_all.lock", "a+")
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


def staging_dir() -> Path:
    """Beside the store (same filesystem, so the final rename is atomic), never inside it."""
    return models_dir().parent / ".lab-staging"


def publish(name: str, files: dict[str, Path], card: Card, labels: dict[str, str] | None = None) -> str:
    """Store `files` (name in the model folder -> source path) and `card` as model `name`; returns the tag.

    The card gains the sha256 and size of every file. Nothing is visible in the store before every
    file is in place and verified; after the one rename everything is."""
    from lab import bentoml_compat as compat
    from lab.backends import backends_for_files

    card.files = {k: file_record(Path(p)) for k, p in files.items()}
    card.backends = backends_for_files(files)
    store_root = models_dir()
    store_root.mkdir(parents=True, exist_ok=True)
    staging = staging_dir() / f"{process_tag()}-{uuid.uuid4().hex}"  # its owner, for clean_staging
    staging.mkdir(parents=True)
    try:
        with compat.create_staged(name, labels or {}, _clean(card.to_dict()), staging) as model:
            for arcname, src in files.items():
                shutil.copyfile(src, model.path_of(arcname))
            write_card(model.path_of("/"), card)
            tag = model.tag
        staged = compat.staged_path(staging, tag)
        if staged is not None:
            verify_files(staged, card)  # the copies are byte-identical to what was verified
            for p in staged.rglob("*"):
                if p.is_file():
                    _fsync(p)
            final = store_root / tag.name / tag.version
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged, final)  # the atomic step
            _fsync(final.parent, directory=True)
            compat.point_latest(store_root / tag.name, tag.version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stored = get_model(f"{tag.name}:{tag.version}")
    verify_files(stored.path, card)
    return stored.tag


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A publish takes minutes: a staging folder this old is a leftover, whoever made it.
STAGING_MAX_AGE_S = 24 * 3600


def _staging_owner_gone(d: Path) -> bool:
    """Whether the process that made staging folder d (named <host>-<pid>-<uuid>) is gone: a dead process on
    this machine, or (another machine's, or a folder of unknown owner) untouched for STAGING_MAX_AGE_S."""
    import time

    try:
        age = time.time() - d.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STAGING_MAX_AGE_S:
        return True
    host_pid, _, rest = d.name.rpartition("-")
    host, _, pid = host_pid.rpartition("-")
    if not rest or not pid.isdigit() or host != process_tag().rpartition("-")[0]:
        return False  # another machine's (or of unknown owner), and recent: it may be publishing now
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_staging() -> int:
    """Remove staging folders left by killed publishes (never visible to the store); returns how many. A
    folder whose process still runs (a publish in progress, here or on another machine) is left alone."""
    root = staging_dir()
    n = 0
    if root.is_dir():
        for d in root.iterdir():
            if _staging_owner_gone(d):
                shutil.rmtree(d, ignore_errors=True)
                n += 1
    return n


def repair_latest() -> list[str]:
    """Point each model's `latest` at its newest version (a kill right after the rename leaves the old)."""
    from lab import bentoml_compat as compat

    fixed = []
    newest: dict[str, StoredModel] = {}
    for m in lab_models():
        if m.name not in newest:
            newest[m.name] = m
    for name, m in newest.items():
        latest = models_dir() / name / "latest"
        if not latest.exists() or latest.read_text().strip() != m.version:
            compat.point_latest(models_dir() / name, m.version)
            fixed.append(m.tag)
    return fixed
