#!/usr/bin/env python
"""The CIFAR-10 JPEG tree as one .npz of the files' raw bytes, to carry to a machine without the data.

    python -m bench.pack_cifar --out .gpu/cifar10-jpg.npz            # from the data root's cifar10-jpg/
    python -m bench.pack_cifar --unpack .gpu/cifar10-jpg.npz --to /tmp/lab-data
                                                                    # -> /tmp/lab-data/cifar10-jpg/...

The archive holds, per split (train, test): every file's bytes end to end (`<split>_bytes`), where each
file starts (`<split>_offsets`, one more than files), its label and name; and the class names. Nothing is
decoded or re-encoded: unpacking writes back the same files under the same names, so the project's
image-folder reader (and its cache) reads them as it reads the original tree. About 56 MB for the
60,000 images. Keep it out of git (.gpu/ is ignored).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")


def pack(tree: Path, out: Path) -> dict:
    """tree/{train,test}/<class>/<file> -> out (.npz)."""
    from training.data import _list_image_folder

    arrays, counts, classes = {}, {}, None
    for split in SPLITS:
        files, labels, split_classes = _list_image_folder(tree / split)
        if not files:
            raise SystemExit(f"error: no images under {tree / split}")
        if classes is not None and split_classes != classes:
            raise SystemExit(f"error: the classes of {tree / 'train'} and {tree / split} differ")
        classes = split_classes
        blobs = [p.read_bytes() for p in files]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs])
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = offsets
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int16)
        arrays[f"{split}_names"] = np.asarray([p.name for p in files], dtype="S")
        counts[split] = len(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, classes=np.asarray(classes, dtype="S"), **arrays)
    tmp.replace(out)
    return {"images": counts, "classes": classes, "bytes": out.stat().st_size}


def unpack(archive: Path, root: Path) -> Path:
    """archive -> root/cifar10-jpg/{train,test}/<class>/<file>; returns root (a data root)."""
    tree = root / "cifar10-jpg"
    with np.load(archive, allow_pickle=False) as z:
        classes = [c.decode() for c in z["classes"]]
        for split in SPLITS:
            data, offsets = z[f"{split}_bytes"], z[f"{split}_offsets"]
            labels, names = z[f"{split}_labels"], z[f"{split}_names"]
            for c in classes:
                (tree / split / c).mkdir(parents=True, exist_ok=True)
            for i, (label, name) in enumerate(zip(labels, names)):
                (tree / split / classes[label] / name.decode()).write_bytes(data[offsets[i]:offsets[i + 1]].tobytes())
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the archive here (e.g. .gpu/cifar10-jpg.npz)")
    ap.add_argument("--data-root", type=Path, default=None, help="holds cifar10-jpg/ (default: the project's)")
    ap.add_argument("--unpack", type=Path, help="an archive to unpack")
    ap.add_argument("--to", type=Path, help="the data root to unpack into")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.unpack:
        if not args.to:
            ap.error("--unpack needs --to DIR")
        unpack(args.unpack, args.to)
        print(f"unpacked {args.unpack} into {args.to / 'cifar10-jpg'} in {time.perf_counter() - t0:.1f} s")
        return 0
    if not args.out:
        ap.error("give --out FILE (pack) or --unpack FILE --to DIR")
    from training.data import default_data_root

    tree = (args.data_root or default_data_root()) / "cifar10-jpg"
    info = pack(tree, args.out)
    print(f"packed {info['images']} images of {len(info['classes'])} classes from {tree} into {args.out} "
          f"({info['bytes'] / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
