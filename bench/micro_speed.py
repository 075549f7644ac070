#!/usr/bin/env python
"""Short CPU micro-benchmarks of the training path's host work (seconds, not minutes):

    python -m bench.micro_speed                  # all parts, real CIFAR-10 from the data root
    python -m bench.micro_speed --parts loader --rounds 7

  loader    ms per batch of the quick recipe (2000 images, translate 2, alternating flip, channels_last):
            the earlier loader (the whole set pre-normalised to float32, index, pad-and-crop, flip) against
            BatchLoader (uint8 rows and columns gathered, then normalised); the batches are bit-identical
  sync      ms per step of a tiny model with a loss check after every step (finite_check=step, a host
            sync per step) against the epoch-end check
  evalfmt   seconds of the TTA evaluation of test images with the weights NCHW (the earlier evaluate
            stage) or channels_last (now), fp32; the logits are compared too

Rounds alternate the variants, so that a drift in machine speed hits them alike; medians are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from training import data as D


def earlier_batches(ds, spec, batch, *, seed, epoch, translate, flip, channels_last, drop_last=True, images=None):
    """The batches of the earlier, host-only BatchLoader: the whole set normalised through the serving path
    once, then per batch an index, random_translate (pad and crop) and the alternating flip."""
    images = D.to_float(ds.images, spec) if images is None else images
    g = torch.Generator().manual_seed(seed)
    flip_mask = torch.rand(len(ds), generator=g) < 0.5
    g.manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(ds), generator=g)
    mask = flip_mask if epoch % 2 == 0 else ~flip_mask
    steps = len(ds) // batch if drop_last else -(-len(ds) // batch)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        x = images[idx]
        if translate:
            x = D.random_translate(x, translate, g)
        if flip:
            x = torch.where(mask[idx].view(-1, 1, 1, 1), x.flip(-1), x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        yield x.contiguous(memory_format=fmt), ds.labels[idx]


def _timed(it, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t0) / n * 1e3


def loader(rounds: int, data_root) -> dict:
    from training.pipeline import make_spec

    ds = D.load_dataset("cifar10", "train", data_root, progress=False)
    spec = make_spec(ds)
    t0 = time.perf_counter()
    pre = D.to_float(ds.images, spec)
    setup_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = D.BatchLoader(ds, spec, 2000, train=True, translate=2, flip=True, seed=0, channels_last=True)
    setup_new = time.perf_counter() - t0
    res = {"earlier": [], "now": []}
    for r in range(rounds):
        new.set_epoch(r)
        old_it = earlier_batches(ds, spec, 2000, seed=0, epoch=r, translate=2, flip=True, channels_last=True,
                                 images=pre)
        new_it = iter(new)
        next(old_it), next(new_it)  # the epoch's draws
        res["earlier"].append(_timed(old_it, 5))
        res["now"].append(_timed(new_it, 5))
    x_old, _ = next(earlier_batches(ds, spec, 2000, seed=0, epoch=0, translate=2, flip=True, channels_last=True,
                                    images=pre))
    new.set_epoch(0)
    x_new, _ = next(iter(new))
    out = {k: statistics.median(v) for k, v in res.items()}
    print(f"loader, ms per batch of 2000 (median of {rounds} rounds of 5): earlier {out['earlier']:.1f}, "
          f"now {out['now']:.1f} ({out['earlier'] / out['now']:.2f}x); set-up: earlier {setup_old:.2f} s "
          f"(+{pre.numel() * 4 / 1e6:.0f} MB float copy), now {setup_new:.3f} s; identical batch: "
          f"{torch.equal(x_old, x_new)}")
    return {"ms_per_batch": out, "rounds": res, "identical": torch.equal(x_old, x_new)}


def sync(rounds: int) -> dict:
    from models import create_model
    from training.engine import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    ds = D.ArrayDataset(torch.randint(0, 256, (4096, 3, 16, 16), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (4096,), generator=g), [str(i) for i in range(10)])
    spec = D.image_folder_spec(16)
    res = {"epoch": [], "step": []}
    for _ in range(rounds):
        for check in res:
            cfg = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.01, precision="fp32",
                              finite_check=check)
            net = create_model("simple_cnn", num_classes=10, image_size=16, n_layers=1, width=4, hidden=8, seed=0)
            r = train(net, ds, spec, cfg, progress=False, log=lambda *_: None)
            res[check].append(r.history[0]["seconds"] / 256 * 1e3)
    out = {k: statistics.median(v) for k, v in res.items()}
    print(f"sync, ms per step of a tiny model (256 steps, median of {rounds}): check at the epoch's end "
          f"{out['epoch']:.3f}, after every step {out['step']:.3f}")
    return {"ms_per_step": out, "rounds": res}


def evalfmt(rounds: int, data_root, images: int = 500) -> dict:
    from models import create_model, with_tta
    from training.evaluate import predict_torch
    from training.pipeline import make_spec

    test = D.shuffled(D.load_dataset("cifar10", "test", data_root, progress=False), 0).subset(slice(0, images))
    spec = make_spec(test)
    net = create_model("airbench", seed=0)
    net.fit_whitening(D.to_float(test.images[:200], spec))
    net.eval()
    res, logits = {"nchw": [], "channels_last": []}, {}
    for _ in range(rounds):
        for fmt in res:
            m = net.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
            t0 = time.perf_counter()
            logits[fmt] = predict_torch(with_tta(m, 2), test, spec, precision="fp32", device="cpu")
            res[fmt].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in res.items()}
    diff = float(abs(logits["nchw"] - logits["channels_last"]).max())
    print(f"evalfmt, s for {images} test images with TTA (6 views), fp32, median of {rounds}: weights NCHW "
          f"{out['nchw']:.2f}, channels_last {out['channels_last']:.2f}; max |logit diff| {diff:.2e}")
    return {"seconds": out, "rounds": res, "max_abs_diff": diff, "images": images}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="loader,sync,evalfmt")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    parts = {"loader": lambda: loader(args.rounds, args.data_root), "sync": lambda: sync(args.rounds),
             "evalfmt": lambda: evalfmt(args.rounds, args.data_root)}
    for p in args.parts.split(","):
        parts[p.strip()]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
