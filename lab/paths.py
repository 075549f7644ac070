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
