"""Checkpoints of a training run: written atomically every epoch, resumed only by the same run.

A checkpoint holds the model, the optimizers, the averaged weights, the RNG state, the epoch and step
and the history so far, under a key that covers everything that must match for resuming to be the
same run (recipe, precision, data size, architecture and dataset); a checkpoint with another key is
refused with a clear error rather than silently continued.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


FILE = "checkpoint.pt"


def run_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_atomic(path: Path, write) -> Path:
    """write(tmp) into a temporary file beside `path` (same suffix, for writers that read it), then one
    rename: a kill never leaves half a file, and a failed write leaves no temporary either."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomic(obj, path: Path) -> Path:
    """torch.save through write_atomic."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {reason}); "
                              f"delete it or start fresh (run_all.py --fresh)") from None


def save(path: Path, key: str, model, optimizers, averaging, *, epoch: int, step: int, history: list,
         train_seconds: float) -> None:
    save_atomic({"config_key": key, "model": model.state_dict(),
                 "optimizers": [o.state_dict() for o in optimizers],
                 "averaging": averaging.shadow.state_dict() if averaging else {},
                 "rng": torch.get_rng_state(), "epoch": epoch, "step": step,
                 "history": history, "train_seconds": train_seconds}, path)


def restore(path: Path, key: str, model, optimizers, averaging) -> dict:
    """Load model/optimizer/averaging state in place; returns epoch, step, history, train_seconds."""
    return restore_state(load(path), path, key, model, optimizers, averaging)


def restore_state(state: dict, path: Path, key: str, model, optimizers, averaging) -> dict:
    """`restore` from a checkpoint already read (by `load`, on this process or sent by another)."""
    if state.get("config_key") != key:
        raise CheckpointError(f"{path} was written by a run with a different configuration (recipe, "
                              f"precision, data or model); start fresh (run_all.py --fresh) or restore it")
    try:
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        if averaging is not None:
            averaging.shadow.load_state_dict(state["averaging"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model: {e}") from None
    torch.set_rng_state(state["rng"])
    return {k: state[k] for k in ("epoch", "step", "history", "train_seconds")}
