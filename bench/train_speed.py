#!/usr/bin/env python
"""Training speed of the default model on this machine, and the quick preset's accuracy-vs-time curve.

    python bench/train_speed.py                       # throughput: fp32 vs bf16, side by side
    python bench/train_speed.py --curve runs/<run>    # + the accuracy-vs-wall-clock curve of a quick run
    python bench/train_speed.py --variants fp32,bf16,bf16-nchw,bf16-compile

Throughput is measured on real CIFAR-10 batches with the quick recipe's optimizers, batch size and
augmentation, alternating the variants in rounds so that drifts in machine speed hit them equally. On a GPU
the model and the training set live there (as in training) and each timing is synchronised. Seconds to a
target accuracy, over seeds and beside airbench94: bench/time_to_accuracy.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lab.paths import REPO
from lab.runfiles import RunFiles
from models import create_model
from training.data import BatchLoader, load_dataset
from training.engine import fit_to_data, pick_device, synchronize, train_step
from training.optim import build_optimizers
from training.pipeline import make_spec
from training.presets import get_preset

VARIANTS = {  # name -> (precision, channels_last, compile)
    "fp32": ("fp32", True, False),
    "bf16": ("bf16", True, False),
    "bf16-nchw": ("bf16", False, False),
    "bf16-compile": ("bf16", True, True),
}


class Trainer:
    """One variant's model, optimizers and batches, stepped on demand."""

    def __init__(self, name: str, train_set, spec, cfg, device: torch.device):
        precision, cl, compile_ = VARIANTS[name]
        self.precision, self.cfg, self.device = precision, cfg, device
        self.model = create_model("airbench", seed=0).to(device)
        if cl:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loader = BatchLoader(train_set, spec, cfg.batch_size, train=True, translate=cfg.translate,
                                  flip=cfg.flip, channels_last=cl, device=device)
        fit_to_data(self.model, self.loader, cfg, device)
        self.optimizers = build_optimizers(self.model, cfg)
        self.forward = torch.compile(self.model) if compile_ else self.model
        self.batches = iter(())

    def step(self) -> int:
        """One step of the engine's own training step (training/engine.py), on the next batch."""
        try:
            x, y, *_ = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            x, y, *_ = next(self.batches)
        train_step(self.forward, x, y, self.optimizers, precision=self.precision,
                   label_smoothing=self.cfg.label_smoothing)
        return len(y)


def throughput(variants: list[str], steps: int, rounds: int, data_root) -> dict[str, list[float]]:
    preset = get_preset("quick")
    train_set = load_dataset("cifar10", "train", data_root, progress=False)
    spec = make_spec(train_set)
    device = pick_device()
    trainers = {v: Trainer(v, train_set, spec, preset.config(), device) for v in variants}
    for t in trainers.values():  # warm-up (and compilation)
        for _ in range(2):
            t.step()
    results = {v: [] for v in variants}
    for r in range(rounds):
        for v, t in trainers.items():
            synchronize(device)
            t0 = time.perf_counter()
            n = sum(t.step() for _ in range(steps))
            synchronize(device)
            results[v].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{v} {results[v][-1]:.0f}" for v in variants), flush=True)
    return results


def curve(run_dir: Path, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = RunFiles(run_dir)
    meta = files.trained()
    served = files.export().served
    hist = meta.history
    t = [r["train_seconds"] / 60 for r in hist]
    acc = [100 * r["test_acc"] for r in hist]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(t, acc, "o-", label="test accuracy after each epoch (no TTA, torch)")
    ax.plot([t[-1]], [100 * served["accuracy"]], "r*", ms=14,
            label=f"served: model.sim.onnx with TTA, {100 * served['accuracy']:.2f}%")
    ax.axhline(90.0, color="gray", ls="--", lw=1, label="target 90%")
    ax.axvline(15.0, color="gray", ls=":", lw=1, label="15 minutes")
    ax.set(xlabel="training wall-clock, minutes", ylabel="CIFAR-10 test accuracy, %",
           title=f"{meta.training['preset']} preset: accuracy vs training time "
                 f"({meta.training['precision']} on {meta.training['device']})")
    ax.set_ylim(max(0, min(acc) - 5), 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"train_minutes": t[-1], "served_accuracy": served["accuracy"], "epochs": len(hist),
            "images_per_second": meta.training["images_per_second"], "points": list(zip(t, acc))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="fp32,bf16", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--curve", type=Path, default=None, help="a finished quick run folder")
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"error: unknown variant(s) {bad}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"training throughput of airbench (quick recipe, batch {get_preset('quick').config().batch_size}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    res = throughput(variants, args.steps, args.rounds, args.data_root)
    med = {v: statistics.median(x) for v, x in res.items()}
    print("\nvariant        images/s (median of rounds)   vs fp32")
    for v in variants:
        ratio = f"{med[v] / med['fp32']:.2f}x" if "fp32" in med else "-"
        print(f"{v:<14} {med[v]:>8.0f}  (min {min(res[v]):.0f}, max {max(res[v]):.0f})       {ratio}")
    report = {"threads": torch.get_num_threads(), "images_per_second": med, "rounds": res}
    if args.curve:
        png = args.out / "train_accuracy_vs_time.png"
        c = curve(args.curve, png)
        report["curve"] = c
        print(f"\nquick run {args.curve.name}: {c['epochs']} epochs in {c['train_minutes']:.1f} min of training "
              f"at {c['images_per_second']:.0f} images/s; served accuracy {100 * c['served_accuracy']:.2f}%")
        for minutes, acc in c["points"]:
            print(f"  {minutes:6.2f} min  {acc:6.2f}%")
        print(f"curve: {png}")
    (args.out / "train_speed.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
