#!/usr/bin/env python
"""Does the service answer as the model's graph does? N images sent to POST /classify, each answer's top-1
compared with ONNX Runtime run directly on the same image through the card's preprocessing, on the
stored model.sim.onnx (or the file of --backend). For imported models above all: the import changed
their graph (flattened outputs, a freed batch axis) and their preprocessing is declared, not trained.

    python bench/served_vs_direct.py --model zoo-resnet50 --images ../shared/data/cifar10-jpg/test -n 100
    python bench/served_vs_direct.py --url http://127.0.0.1:3000 --model tv-resnet18   # a running service

Without --url it starts `bentoml serve` on the store ($BENTOML_HOME) for the run. Prints the images
whose top-1 differs (none, when the service is right) and exits 1 if any does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import requests


def main(argv=None) -> int:
    from bench.server import Server
    from lab.backends import get_backend
    from lab.card import read_card
    from lab.paths import default_data_root
    from lab.preprocess import decode_uint8, normalize
    from lab.store import get_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--images", type=Path, default=default_data_root() / "cifar10-jpg" / "test",
                    help="a folder of images (searched recursively)")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--url", default=None, help="a running service (default: start one on the store)")
    args = ap.parse_args(argv)

    try:
        stored = get_model(args.model)
    except Exception as e:  # bentoml's NotFound
        print(f"error: no model {args.model!r} in the store: {e}", file=sys.stderr)
        return 2
    card = read_card(stored.path)
    spec = card.preprocessing
    cls = get_backend(args.backend)
    direct = cls(stored.path / cls.file, card)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        print(f"error: no images under {args.images}", file=sys.stderr)
        return 2
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:args.n]]
    server = None
    if args.url is None:
        import os

        log = Path(os.environ.get("LAB_RUNS_DIR", "runs")) / "served_vs_direct.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        server = Server(dict(os.environ), log, {"LAB_MODELS": args.model, "LAB_DEFAULT_MODEL": args.model},
                        startup_timeout=600)
    url = args.url or server.url
    try:
        t0 = time.perf_counter()
        differ = []
        for p in paths:
            data = p.read_bytes()
            r = requests.post(f"{url}/classify", data=data, params={"model": args.model, "backend": args.backend,
                                                                  "top_k": 1},
                              headers={"Content-Type": "image/jpeg" if p.suffix.lower() != ".png" else "image/png"},
                              timeout=120)
            r.raise_for_status()
            served = r.json()["predictions"][0]["label"]
            expected = card.classes[int(direct.predict(normalize(decode_uint8(data, spec), spec)[None]).argmax(1)[0])]
            if served != expected:
                differ.append((p.name, served, expected))
        seconds = time.perf_counter() - t0
    finally:
        if server is not None:
            server.stop()
    print(f"{args.model} ({args.backend}): {len(paths) - len(differ)} of {len(paths)} images answered by the "
          f"service with the top-1 ONNX Runtime gives directly on the same preprocessed tensor ({seconds:.1f} s)")
    for name, served, expected in differ:
        print(f"  {name}: service {served!r}, direct {expected!r}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
