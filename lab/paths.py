"""Where the project reads data and keeps caches, runs and models (no torch: the load generators import this)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_data_root() -> Path:
    """--data-root beats $LAB_DATA_ROOT beats ../shared/data beside the checkout beats ./data."""
    env = os.environ.get("LAB_DATA_ROOT")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else REPO / "data"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAB_CACHE_DIR", REPO / ".cache"))


def default_runs_dir() -> Path:
    return Path(os.environ.get("LAB_RUNS_DIR", REPO / "runs"))


def bentoml_home() -> Path:
    """BentoML's documented home: $BENTOML_HOME, else ~/bentoml. Its model store is <home>/models."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()


def models_dir() -> Path:
    return bentoml_home() / "models"


def process_tag() -> str:
    """This process in a file name: <host>-<pid> (the host's characters outside [A-Za-z0-9._] become '_')."""
    import re
    import socket

    return f"{re.sub(r'[^A-Za-z0-9._]', '_', socket.gethostname()) or 'host'}-{os.getpid()}"


def new_run_dir(parent: Path, name: str) -> Path:
    """A new folder parent/<YYYYmmdd-HHMMSS>-<host>-<pid>-<name>, made by this process (atomically: never one
    that another process, on this machine or another, made or writes), and returned."""
    import time

    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{process_tag()}"
    for i in range(1000):
        d = parent / (f"{stem}-{name}" if i == 0 else f"{stem}.{i}-{name}")
        try:
            d.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return d
    raise FileExistsError(f"could not make a new run folder under {parent}")
