#!/usr/bin/env python
"""Per-backend accuracy and latency, in process, on the whole CIFAR-10 test set.

    python bench/accuracy_report.py                          # cifar10-airbench:latest
    python bench/accuracy_report.py --model NAME:VERSION --limit 1000

Every backend of the stored model runs the test set through the card's preprocessing: torch (fp32),
torch with bf16 autocast, ONNX as exported, ONNX simplified, and the INT8 ONNX model. Reported per
backend: accuracy, per-class accuracy, macro-F1, confusion matrix, how many test images get a different
top-1 than on every other backend, file size, and mean latency per image at batch 1 and batch 64.
Writes accuracy.md, accuracy.json and PNGs into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lab.backends import BackendUnavailable, get_backend, list_backends, load_backend
from lab.card import read_card
from lab.hardware import cores, cpu_name
from lab.paths import REPO
from lab.store import get_model

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


WHY = ("Why the backends differ: all of them compute the same graph (with the TTA views batched into one "
       "pass). ONNX Runtime folds each BatchNorm into the convolution before it and runs the convolutions with "
       "its own blocked-layout kernels, so almost all of its time is convolution; torch in eager mode runs "
       "BatchNorm, GELU and max-pooling as separate passes over memory, which the operator shares above show. "
       "bf16 autocast halves the bytes moved and uses the CPU's AVX-512 BF16 dot products, so it wins at batch 64 "
       "where the convolutions dominate. INT8 replaces the float convolutions by u8 x s8 integer kernels (VNNI), "
       "the largest gain at batch 64; at batch 1 fixed per-call costs weigh more.")


def available(card, path: Path) -> list[str]:
    """Every backend of the registry that can run this model here."""
    out = []
    for name in list_backends():
        b = get_backend(name)
        try:
            b.check_available()
        except BackendUnavailable:
            continue
        if b.file in card.files:
            out.append(name)
    return out


def latency(backend, x: np.ndarray, batch: int, reps: int) -> float:
    """Mean seconds per image of backend.predict at this batch size (after a warm-up call)."""
    xb = x[:batch]
    backend.predict(xb)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.predict(xb)
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) / len(xb)


def op_profile(name: str, path: Path, card: dict, x: np.ndarray, threads: int, calls: int = 3) -> list[dict]:
    """Where a backend's time goes at this batch: the top operators by self time (profiler runs)."""
    if name.startswith("torch"):
        import torch
        from torch.profiler import ProfilerActivity, profile

        be = load_backend(name, path, card, threads)
        be.predict(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                be.predict(x)
        rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
        del torch
    else:
        import tempfile

        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
        sess = ort.InferenceSession(str(path / get_backend(name).file), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0].name
        for _ in range(calls + 1):
            sess.run(None, {inp: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
        by_op: dict[str, float] = {}
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + ev["dur"]
        rows = list(by_op.items())
    total = sum(t for _, t in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    return [{"op": op, "share": t / total} for op, t in rows[:6]]


def machine() -> dict:
    cpu = cpu_name()
    import onnxruntime
    vers = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import torch
        vers["torch"] = str(torch.__version__)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": vers}


def accuracy_report(tag: str, out: Path, *, data_root: Path | None = None, limit: int = 0,
                    backends: list[str] | None = None, reps1: int = 100, reps64: int = 10,
                    threads: int = 0, profile: bool = True, log=print) -> dict:
    from training.data import load_dataset
    from training.evaluate import (classification_metrics, per_class_lines, plot_confusion,
                                   predict_backend)

    m = get_model(tag)
    path, card = m.path, read_card(m.path)
    tag = m.tag
    spec = card.preprocessing
    test = load_dataset(card.dataset["name"], "test", data_root, progress=False)
    if limit:
        test = test.subset(slice(0, limit)) if limit >= len(test) else _stratified(test, limit)
    labels = test.labels.numpy()
    threads = threads or cores()
    names = [b for b in (backends or available(card, path)) if b in available(card, path)]
    out.mkdir(parents=True, exist_ok=True)
    x64 = None
    results, preds = {}, {}
    log(f"accuracy report: {tag} on {len(test)} {card.dataset['name']} test images, {threads} threads")
    for name in names:
        be, fname = load_backend(name, path, card, threads), get_backend(name).file
        t0 = time.perf_counter()
        logits = predict_backend(be, test, spec, batch_size=250)
        eval_s = time.perf_counter() - t0
        if x64 is None:
            from lab.preprocess import normalize
            x64 = normalize(test.images[:64].permute(0, 2, 3, 1).numpy(), spec)
        met = classification_metrics(labels, logits.argmax(1), test.classes)
        met.update(file=fname, file_bytes=(path / fname).stat().st_size,
                   ms_per_image_batch1=1000 * latency(be, x64, 1, reps1),
                   ms_per_image_batch64=1000 * latency(be, x64, 64, reps64), eval_seconds=round(eval_s, 1))
        results[name], preds[name] = met, logits.argmax(1)
        plot_confusion(met, test.classes, out / f"confusion_{name}.png", f"{name}: {100 * met['accuracy']:.2f}%")
        log(f"  {name:<11} accuracy {100 * met['accuracy']:.2f}%  batch 1 {met['ms_per_image_batch1']:.2f} ms/image  "
            f"batch 64 {met['ms_per_image_batch64']:.3f} ms/image  ({met['file']}, {met['file_bytes'] / 1e6:.1f} MB)")
        del be
    agree = {a: {b: int((preds[a] != preds[b]).sum()) for b in names} for a in names}
    profiles = {}
    if profile and x64 is not None:
        for name in [n for n in ("torch", "torch_bf16", "onnx", "onnx_int8") if n in names]:
            profiles[name] = op_profile(name, path, card, x64, threads)
    report = {"model": tag, "images": len(test), "threads": threads, "machine": machine(),
              "tta_level": card.tta_level, "backends": results, "top1_differences": agree,
              "int8_record": card.int8, "op_profiles_batch64": profiles}
    (out / "accuracy.json").write_text(json.dumps(report, indent=1))
    _plots(report, test.classes, out)
    (out / "accuracy.md").write_text(markdown(report, per_class_lines))
    log(f"written: {out / 'accuracy.md'}")
    return report


def _stratified(ds, n):
    """n images spread over the classes (the test split is class-sorted on disk)."""
    from training.data import shuffled

    return shuffled(ds, 0).subset(slice(0, n))


def _plots(report: dict, classes: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    fig, ax = plt.subplots(figsize=(max(7, len(classes) * 0.9), 4))
    w = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        per = report["backends"][n]["per_class_accuracy"]
        ax.bar(np.arange(len(classes)) + i * w, [100 * per[c] for c in classes], w, label=n)
    ax.set_xticks(np.arange(len(classes)) + w * (len(names) - 1) / 2, classes, rotation=30)
    ax.set(ylabel="accuracy, %", title="per-class test accuracy by backend")
    ax.set_ylim(max(0, min(100 * min(report["backends"][n]["per_class_accuracy"].values()) for n in names) - 10), 100)
    ax.legend(ncol=len(names), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "per_class_accuracy.png", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((a1, "ms_per_image_batch1", "batch 1"), (a2, "ms_per_image_batch64", "batch 64")):
        vals = [report["backends"][n][key] for n in names]
        ax.bar(names, vals, color="tab:blue")
        ax.set(ylabel="ms per image", title=f"latency per image, {title}")
        ax.tick_params(axis="x", rotation=30)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "backend_latency.png", dpi=110)
    plt.close(fig)


def markdown(report: dict, per_class_lines) -> str:
    b = report["backends"]
    names = list(b)
    ref = "onnx" if "onnx" in b else names[0]
    lines = [f"# Accuracy and latency per backend: `{report['model']}`", "",
             f"{report['images']} test images, in process, {report['threads']} threads, "
             f"TTA level {report['tta_level']} (inside every backend); CPU: {report['machine']['cpu']}.", "",
             "| backend | file | size, MB | accuracy | macro-F1 | top-1 differs from " + ref +
             " | ms/image batch 1 | ms/image batch 64 | images/s batch 64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = b[n]
        lines.append(f"| {n} | {r['file']} | {r['file_bytes'] / 1e6:.2f} | {100 * r['accuracy']:.2f}% | "
                     f"{r['macro_f1']:.4f} | {report['top1_differences'][n][ref]} | {r['ms_per_image_batch1']:.2f} | "
                     f"{r['ms_per_image_batch64']:.3f} | {1000 / r['ms_per_image_batch64']:.0f} |")
    if "onnx_int8" in b and "onnx" in b:
        i8, fp = b["onnx_int8"], b["onnx"]
        lines += ["", f"INT8 vs FP32 ONNX: {fp['ms_per_image_batch64'] / i8['ms_per_image_batch64']:.2f}x faster at "
                      f"batch 64, {fp['ms_per_image_batch1'] / i8['ms_per_image_batch1']:.2f}x at batch 1, "
                      f"{100 * (fp['accuracy'] - i8['accuracy']):+.2f} points of accuracy lost."]
    if "torch" in b and "onnx" in b:
        t, o = b["torch"], b["onnx"]
        lines += ["", f"ONNX Runtime vs Torch (fp32): {t['ms_per_image_batch1'] / o['ms_per_image_batch1']:.2f}x at "
                      f"batch 1, {t['ms_per_image_batch64'] / o['ms_per_image_batch64']:.2f}x at batch 64 "
                      f"(> 1 means ONNX Runtime is faster)."]
    profs = report.get("op_profiles_batch64") or {}
    if profs:
        lines += ["", "Where the time goes at batch 64 (share of operator time, from torch.profiler and "
                      "onnxruntime's profiler):", "", "| backend | top operators |", "|---|---|"]
        for n, rows in profs.items():
            lines.append(f"| {n} | " + ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in rows) + " |")
        lines += ["", WHY]
    lines += ["", "Images whose top-1 differs between two backends:", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(str(report["top1_differences"][a][c]) for c in names) + " |")
    lines += ["", "![per-class accuracy](per_class_accuracy.png)", "", "![latency](backend_latency.png)", ""]
    for n in names:
        lines += [f"## {n}", "", "```", *per_class_lines(b[n]), "```", "", f"![confusion](confusion_{n}.png)", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-airbench:latest")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0, help="use this many test images (0 = all)")
    ap.add_argument("--backends", default="", help=f"comma-separated subset of {', '.join(list_backends())}")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "accuracy")
    args = ap.parse_args()
    backends = backends_or_exit(args.backends)
    return one_line_errors(lambda: accuracy_report(args.model, args.out, data_root=args.data_root,
                                                   limit=args.limit, backends=backends, threads=args.threads))


def parse_backends(text: str) -> list[str] | None:
    """A comma-separated --backends value: the names (None when empty); ValueError for an unknown one."""
    backends = [b.strip() for b in text.split(",") if b.strip()] or None
    if backends and any(b not in list_backends() for b in backends):
        raise ValueError(f"backends must be among {', '.join(list_backends())}")
    return backends


def backends_or_exit(text: str) -> list[str] | None:
    """parse_backends for a script's --backends: an unknown name ends the script with one line, status 2."""
    try:
        return parse_backends(text)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line_errors(job) -> int:
    """Run `job`; a missing model or missing data ends with one clear line and status 2."""
    from bentoml.exceptions import NotFound

    from training.data import DataError
    try:
        job()
    except (NotFound, DataError) as e:
        print(f"error: {e}; `python training/run_all.py` publishes the default model", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
