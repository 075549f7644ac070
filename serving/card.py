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


def verify_files(model_dir: Path | str, card: dict, only: list[str] | None = None) -> None:
    """Every file the card lists (or those in `only`) exists inside model_dir with the card's sha256."""
    root = Path(model_dir).resolve()
    for name, rec in card.get("files", {}).items():
        if only is not None and name not in only:
            continue
        path = (root / name).resolve()
        if root not in path.parents:  # a card naming ../../etc/passwd
            raise IntegrityError(f"card names a file outside the model folder: {name!r}")
        if not path.is_file():
            raise IntegrityError(f"{name} is missing from {root}")
        digest = sha256_file(path)
        if digest != rec["sha256"]:
            raise IntegrityError(f"{name} in {root} has sha256 {digest[:12]}..., "
                                 f"the card says {rec['sha256'][:12]}...: refusing it")
