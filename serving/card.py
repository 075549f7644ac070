"""Model cards: the JSON that travels with every stored model, and the integrity check on its files.

NumPy-free and torch-free: the service reads cards before it decides which backends it can build.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

CARD_FILE = "card.json"
CARD_SCHEMA = 1


class IntegrityError(RuntimeError):
    """A stored model whose files do not match its card: it must not be served."""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_card(model_dir: Path | str) -> dict:
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable model card ({e})") from None
    if card.get("schema") != CARD_SCHEMA:
        raise IntegrityError(f"{path}: card schema {card.get('schema')!r}, expected {CARD_SCHEMA}")
    return card


def inside(model_dir: Path | str, name: str) -> Path:
    """model_dir/name, refusing names that lead outside the folder (../.., absolute paths)."""
    root = Path(model_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise IntegrityError(f"the card names a file outside the model folder: {name!r}")
    return path


def verify_files(model_dir: Path | str, card: dict, only: list[str] | None = None) -> None:
    """Every file the card lists (or those in `only`, which the card must list) exists inside
    model_dir with the card's sha256."""
    files = card.get("files") or {}
    names = list(files) if only is None else only
    if not names:
        raise IntegrityError("the card lists no files to check")
    for name in names:
        rec = files.get(name)
        if not isinstance(rec, dict) or "sha256" not in rec:
            raise IntegrityError(f"the card has no sha256 for {name!r}")
        path = inside(model_dir, name)
        if not path.is_file():
            raise IntegrityError(f"{name} is missing from the model folder")
        digest = sha256_file(path)
        if digest != rec["sha256"]:
            raise IntegrityError(f"{name} has sha256 {digest[:12]}..., the card says {rec['sha256'][:12]}...: "
                                 f"refusing it")
