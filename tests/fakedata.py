"""Small datasets written in the real on-disk formats, for tests that must not depend on ../shared."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _class_images(rng: np.random.Generator, labels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Images whose class is learnable: a per-class colour/brightness pattern plus noise."""
    n = len(labels)
    base = (labels[:, None, None, None] * 23 % 256).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy * (labels[:, None, None] % 3)) % (2 + labels[:, None, None] % 4) == 0) * 80.0
    img = base + stripes[..., None] + rng.normal(0, 20, (n, size, size, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cifar_pickles(root: Path, per_batch: int = 40, test: int = 100, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, as in the original."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n):
        labels = rng.integers(0, 10, n)
        images = _class_images(rng, labels, 32, 3)
        return {"data": images.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels.tolist(),
                "batch_label": "x", "filenames": [f"{i}.png" for i in range(n)]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}))
    return root


def _idx(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        header = struct.pack(">IIII", 2051, *array.shape)
    else:
        header = struct.pack(">II", 2049, len(array))
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 120, test: int = 60, seed: int = 0) -> Path:
    """root/<folder>/raw/ with the four uncompressed idx files torchvision reads."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n)
        _idx(raw / f"{prefix}-images-idx3-ubyte", _class_images(rng, labels, 28, 1)[..., 0])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 12, size=(40, 30),
                       fmt: str = "png", seed: int = 0) -> Path:
    """root/{train,test}/<class>/<n>.<fmt> with images of varying size."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            labels = np.full(n, ci)
            imgs = _class_images(rng, labels, max(size), 3)[:, :size[1], :size[0]]
            for i, a in enumerate(imgs):
                Image.fromarray(a).save(d / f"{i:04d}.{fmt}")
    return root
