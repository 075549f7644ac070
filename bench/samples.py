"""Request payloads for the benchmarks: real CIFAR-10 test images with their labels when present."""
from __future__ import annotations

import io
import random
from pathlib import Path

from bench.loadgen import Sample
from lab.paths import default_data_root


def cifar_test_samples(n: int = 1000, data_root: Path | None = None, seed: int = 0) -> list[Sample]:
    """`n` CIFAR-10 test JPEGs (a seeded sample over all classes) as they are on disk, with labels;
    synthetic PNGs without labels if there is no copy of the data."""
    root = (data_root or default_data_root()) / "cifar10-jpg" / "test"
    files = sorted(root.glob("*/*.jpg")) if root.is_dir() else []
    if files:
        random.Random(seed).shuffle(files)
        return [Sample(p.read_bytes(), "image/jpeg", p.parent.name) for p in files[:n]]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(n, 256)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(Sample(buf.getvalue(), "image/png", None))
    return out
