"""The teacher's outputs on the training images, computed once and cached.

A student learns from the served network as served: its logits with test-time augmentation (6 views for
the default model) on every training image, in the training set's order. Computing them costs one
forward pass of every view of every image, so they are cached under <cache>/teachers/, keyed by what
makes them: the sha256 of the trained weights, the TTA level, the preprocessing and the training images
and labels. A cache file is read only when its recorded key equals the key asked for.

    logits = teacher_logits(net, weights_sha256, tta_level, train_set, spec)   # (N, K) float32 tensor
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from lab.preprocess import Preprocessing
from models.tta import passes


class TeacherCacheError(ValueError):
    """A teacher cache that does not belong to the teacher and data asked for."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_digest(train_set, spec: Preprocessing) -> str:
    """sha256 of the training images (uint8, in order), their labels and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    h.update(train_set.labels.contiguous().numpy().tobytes())
    h.update(train_set.images.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(weights_sha256: str, tta_level: int, data_sha256: str) -> dict:
    return {"weights_sha256": weights_sha256, "tta_level": int(tta_level), "data_sha256": data_sha256}


def cache_path(key: dict, cache_dir: Path) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"teacher-{name}.npz"


def read_cache(path: Path, key: dict) -> np.ndarray:
    """The cached logits at `path`, after checking that they were made for `key`; TeacherCacheError if not."""
    try:
        with np.load(path, allow_pickle=False) as z:
            made_for, logits = json.loads(str(z["key"])), z["logits"]
    except (OSError, ValueError, KeyError) as e:
        raise TeacherCacheError(f"{path}: not a teacher cache ({type(e).__name__}: {e})") from None
    if made_for != key:
        what = [k for k in key if made_for.get(k) != key[k]]
        raise TeacherCacheError(f"{path} holds the outputs of another teacher or data (its {', '.join(what)} "
                                f"differ{'s' if len(what) == 1 else ''}): refused")
    return logits


def write_cache(path: Path, key: dict, logits: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, key=np.array(json.dumps(key, sort_keys=True)), logits=logits.astype(np.float32))
    os.replace(tmp, path)


@torch.no_grad()
def compute(net: torch.nn.Module, tta_level: int, train_set, spec: Preprocessing, *, batch_size: int = 500,
            progress: bool = True) -> np.ndarray:
    """The network with `tta_level` on every training image, in order: (N, K) float32 logits."""
    from tqdm import tqdm

    from models import with_tta
    from training.data import BatchLoader

    model = with_tta(net.eval(), tta_level)
    loader = BatchLoader(train_set, spec, batch_size, train=False)
    out = [model(x).float() for x, _ in tqdm(loader, desc="teacher outputs", disable=not progress, leave=False)]
    return torch.cat(out).numpy()


def teacher_logits(net: torch.nn.Module, weights_sha256: str, tta_level: int, train_set, spec: Preprocessing, *,
                   cache_dir: Path, progress: bool = True, log=print) -> tuple[torch.Tensor, dict]:
    """The teacher's logits on `train_set` ((N, K) tensor) and the cache key, from the cache when it holds
    them, else computed and cached."""
    key = cache_key(weights_sha256, tta_level, data_digest(train_set, spec))
    path = cache_path(key, cache_dir)
    if path.is_file():
        logits = read_cache(path, key)
        log(f"teacher outputs: {len(logits):,} images from the cache ({path})")
    else:
        logits = compute(net, tta_level, train_set, spec, progress=progress)
        write_cache(path, key, logits)
        log(f"teacher outputs: {len(logits):,} images x {passes(tta_level)} views, cached in {path}")
    if logits.shape[0] != len(train_set):
        raise TeacherCacheError(f"{path} holds {logits.shape[0]} images' outputs, the training set has "
                                f"{len(train_set)}")
    return torch.from_numpy(logits), {**key, "file": str(path)}
