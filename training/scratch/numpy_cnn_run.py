"""Train the NumPy CNN on real MNIST, save it, plot its loss, test it, and time it against torch.

    python -m training.scratch.numpy_cnn_run [--data-root DIR] [--out-dir DIR] [--epochs 3]
                                             [--train-limit N] [--seed 0] [--no-speed]

or, from a pipeline stage, `run_numpy_cnn(data_root, out_dir, epochs=..., train_limit=..., seed=...)`.
Writes into out_dir: numpy_cnn.npz (weights, training.scratch.numpy_cnn.load reads it),
numpy_cnn_loss.png (the loss curve) and numpy_cnn.json (the figures returned). Training, saving and
testing use NumPy only (the IDX files are read by numpy_cnn.load_mnist); torch is imported only for
the speed comparison (training.scratch.torch_twin).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lab.paths import REPO, default_data_root
from training.scratch import numpy_cnn as N

DEFAULTS = dict(epochs=3, batch_size=64, lr=1e-3, channels=(16, 32), hidden=128)


def plot_loss(history: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(history["step_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(steps) + 1), steps, lw=0.5, alpha=0.4, label="per step")
    win = max(1, min(100, len(steps) // 20))
    if len(steps) >= win > 1:
        smooth = np.convolve(steps, np.ones(win) / win, mode="valid")
        ax.plot(np.arange(win, len(steps) + 1), smooth, lw=1.5, label=f"mean of {win} steps")
    per_epoch = len(steps) / max(1, len(history["epoch_loss"]))
    for e, loss in enumerate(history["epoch_loss"], 1):
        ax.axvline(e * per_epoch, color="grey", lw=0.5, ls=":")
        ax.annotate(f"epoch {e}: {loss:.3f}", (e * per_epoch, loss), fontsize=7, ha="right", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_numpy_cnn(data_root=None, out_dir=None, epochs: int = DEFAULTS["epochs"], train_limit: int | None = None,
                  seed: int = 0, batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                  channels: tuple[int, int] = DEFAULTS["channels"], hidden: int = DEFAULTS["hidden"],
                  speed: bool = True, speed_batches: int = 30, progress: bool = True,
                  numpy_threads: int | None = None) -> dict:
    """Train, save, plot, test and (speed=True) time the NumPy CNN; returns the figures as a dict.

    numpy_threads: OpenBLAS threads for training and testing (default: as they are, every core unless
    OPENBLAS_NUM_THREADS says otherwise); the speed comparisons set their own."""
    data_root = Path(data_root) if data_root else default_data_root()
    out_dir = Path(out_dir) if out_dir else REPO / "runs" / "numpy_cnn"
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train = N.load_mnist(data_root, "train")
    x_test, y_test = N.load_mnist(data_root, "test")
    if train_limit:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]

    if numpy_threads:
        N.set_blas_threads(numpy_threads)
    train_blas_threads = N.blas_threads()
    model = N.NumpyCNN(channels, hidden, seed=seed)
    history = N.train(model, x_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      progress=progress)
    weights = model.save(out_dir / "numpy_cnn.npz")

    t0 = time.perf_counter()
    logits = N.load(weights).predict(x_test)           # the saved file, not the object in memory
    test_seconds = time.perf_counter() - t0
    test_accuracy = float((logits.argmax(1) == y_test).mean())
    n_params = sum(p.data.size for p in model.parameters())
    title = (f"NumPy CNN {channels}-{hidden} ({n_params:,} params) on MNIST: {len(x_train):,} images x "
             f"{epochs} epochs\nAdam lr {lr:g}, batch {batch_size}; test accuracy {100 * test_accuracy:.2f}%")
    curve = plot_loss(history, out_dir / "numpy_cnn_loss.png", title)

    result = {
        "test_accuracy": test_accuracy,
        "test_images": len(x_test),
        "train_images": len(x_train),
        "epochs": epochs,
        "steps": history["steps"],
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": "adam",
        "seed": seed,
        "architecture": model.config(),
        "parameters": n_params,
        "train_seconds": history["seconds"],
        "train_images_per_s": history["images_per_s"],
        "train_blas_threads": train_blas_threads,
        "test_seconds": test_seconds,
        "epoch_loss": history["epoch_loss"],
        "final_step_loss": history["step_loss"][-1],
        "files": {"weights": str(weights), "loss_curve": str(curve)},
        "cpu_count": os.cpu_count(),
    }
    if speed:
        from training.scratch.torch_twin import compare_speed

        # every core for both (the headline), then one thread each (per-core cost; steadier on a busy machine)
        result["speed"] = compare_speed(model, x_test, y_test, batch_size=batch_size, n_batches=speed_batches,
                                        verbose=False)
        result["speed_1_thread"] = compare_speed(model, x_test, y_test, batch_size=batch_size,
                                                 n_batches=speed_batches, threads=1, numpy_threads=1, verbose=False)
    (out_dir / "numpy_cnn.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=None, help="folder holding MNIST/raw/ (default: the project's)")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: runs/numpy_cnn")
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--speed-batches", type=int, default=30)
    ap.add_argument("--no-speed", action="store_true", help="skip the torch speed comparisons")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--numpy-threads", type=int, default=None,
                    help="OpenBLAS threads for training (default: as set, i.e. every core)")
    args = ap.parse_args(argv)
    r = run_numpy_cnn(args.data_root, args.out_dir, epochs=args.epochs, train_limit=args.train_limit, seed=args.seed,
                      batch_size=args.batch_size, lr=args.lr, speed=not args.no_speed,
                      speed_batches=args.speed_batches, progress=not args.no_progress,
                      numpy_threads=args.numpy_threads)
    print(f"test accuracy {100 * r['test_accuracy']:.2f}% on {r['test_images']:,} MNIST test images")
    print(f"trained on {r['train_images']:,} images x {r['epochs']} epochs ({r['steps']} steps) in "
          f"{r['train_seconds']:.1f} s ({r['train_images_per_s']:.0f} img/s, OpenBLAS threads "
          f"{r['train_blas_threads']}); epoch losses "
          + ", ".join(f"{x:.4f}" for x in r["epoch_loss"]))
    if "speed" in r:
        from training.scratch.torch_twin import format_speed

        print(format_speed(r["speed"]))
        print(format_speed(r["speed_1_thread"]))
    print(f"files: {r['files']['weights']}, {r['files']['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
