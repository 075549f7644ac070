"""Evaluation: accuracy, per-class accuracy, confusion matrix, macro-F1, and their plots.

Metrics are plain NumPy on (labels, predictions), so every backend (torch, ONNX, INT8) is scored by
the same code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lab.preprocess import Preprocessing
from training.data import ArrayDataset, BatchLoader
from training.engine import autocast, has_conv, native_bf16


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    k = len(classes)
    labels, preds = np.asarray(labels), np.asarray(preds)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    tp = np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "per_class_accuracy": {c: float(recall[i]) for i, c in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),
        "images": int(len(labels)),
    }


def per_class_lines(metrics: dict) -> list[str]:
    """The seeds' report: 'Accuracy for class: cat        is 27.8 %'."""
    per = metrics["per_class_accuracy"]
    width = max(len(c) for c in per)
    return [f"Accuracy for class: {c:<{width}s} is {100 * a:.1f} %" for c, a in per.items()]


def eval_precision(device: torch.device) -> str:
    """The precision of the torch evaluation: bf16 on a GPU that has it (the served figure is measured on
    the fp32 ONNX model anyway); fp32 on the CPU, where evaluation is a small part of a run and its figure
    stays comparable with earlier runs. LAB_EVAL_PRECISION=bf16|fp32 overrides."""
    import os

    forced = os.environ.get("LAB_EVAL_PRECISION", "")
    if forced:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"LAB_EVAL_PRECISION={forced!r}; valid: bf16, fp32")
        return forced
    return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"


@torch.no_grad()
def predict_torch(model: nn.Module, ds: ArrayDataset, spec: Preprocessing, *, precision: str = "fp32",
                  batch_size: int | None = None, device: torch.device | str | None = None,
                  channels_last: bool | None = None) -> np.ndarray:
    """Logits of a torch model on a dataset (normalised as the serving path does).

    Runs on `device` (default: the model's; the model is moved there if needed): the uint8 images go
    there once, each batch is normalised there, the logits stay there until the end. `batch_size`
    defaults to 500 on the CPU and 2000 on a GPU (x6 views with TTA level 2)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    cl = has_conv(model) if channels_last is None else channels_last
    batch_size = batch_size or (2000 if device.type == "cuda" else 500)
    loader = BatchLoader(ds, spec, batch_size, train=False, channels_last=cl, device=device)
    model.eval()
    out = []
    for x, _ in loader:
        with autocast(device, precision):
            out.append(model(x).float())
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(ds.classes)), np.float32)


def predict_backend(backend, ds: ArrayDataset, spec: Preprocessing, batch_size: int = 500) -> np.ndarray:
    """Logits from a backend of the registry (lab.backends), batch by batch."""
    from lab.preprocess import normalize

    images = ds.images.permute(0, 2, 3, 1).numpy()
    out = [backend.predict(normalize(images[i:i + batch_size], spec))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(ds.classes)), np.float32)


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: list[dict], path: Path, title: str = "") -> Path:
    plt = _plt()
    epochs = [r["epoch"] for r in history]
    evals = sorted({k[:-4] for r in history for k in r if k.endswith("_acc") and k != "train_acc"})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax2.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train")
    for name in evals:
        ax1.plot(epochs, [r.get(f"{name}_loss") for r in history], "o-", label=name)
        ax2.plot(epochs, [100 * r.get(f"{name}_acc", float("nan")) for r in history], "o-", label=name)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy, %", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(metrics: dict, classes: list[str], path: Path, title: str = "") -> Path:
    plt = _plt()
    cm = np.asarray(metrics["confusion_matrix"])
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or f"accuracy {100 * metrics['accuracy']:.2f}%")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
