"""Request payloads for the benchmarks: real CIFAR-10 test images with their labels when present; PNGs of
one colour of any size, tiny on the wire (the thin images and bombs of bench/hostile.py and the tests)."""
from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

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


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """An image as the bytes of a file in format `fmt` (Pillow's save options in kw)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    """A w x h RGB image: red grows left to right, green top to bottom, blue 128."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_TYPES = {"L": (0, 1, 8), "RGB": (2, 3, 8), "RGBA": (6, 4, 8), "LA": (4, 2, 8), "I;16": (0, 1, 16)}


def solid_png(width: int, height: int, mode: str = "RGB", value: int = 0x80) -> bytes:
    """A valid PNG of one colour, built row by row: tiny on disk whatever its size (thin PNGs, bombs).
    mode: L, LA, RGB, RGBA or I;16 (16-bit grayscale); every sample byte is `value`."""
    color_type, samples, depth = _PNG_TYPES[mode]
    row = b"\x00" + bytes([value]) * (width * samples * depth // 8)
    comp = zlib.compressobj(9)
    parts, step = [], max(1, (1 << 22) // len(row))  # compress ~4 MB of rows at a time
    for y in range(0, height, step):
        parts.append(comp.compress(row * min(step, height - y)))
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
