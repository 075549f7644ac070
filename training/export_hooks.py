"""Export hooks: each makes the file of one further backend (lab.backends) from the verified fp32 export.

A hook returns (the file to publish, or None when it is not good enough; its record for the card).
Adding a backend that needs a new file: its class in lab/backends/, its hook here.
"""
from __future__ import annotations

import time

import numpy as np

from training.export import ExportContext, export_hook
from training.quantize import quantize_int8


@export_hook("int8")
def int8(ctx: ExportContext) -> tuple[str | None, dict]:
    """model.int8.onnx calibrated on training images; published only if it loses at most
    settings["int8_max_drop"] of test accuracy against the fp32 model."""
    from lab.backends.onnx_int8 import OnnxInt8Backend
    from training import data as D
    from training.evaluate import classification_metrics, predict_backend

    n = ctx.settings.get("calibration_images", 512)
    if not n:
        return None, {"skipped": "calibration_images is 0"}
    calib = D.to_float(D.shuffled(ctx.train_set, 99).images[:n], ctx.spec).numpy()
    t0 = time.perf_counter()
    path = quantize_int8(ctx.out_dir / "model.sim.onnx", calib, ctx.out_dir / OnnxInt8Backend.file)
    seconds = time.perf_counter() - t0
    int8 = OnnxInt8Backend(path)
    labels = ctx.test.labels.numpy()
    logits = predict_backend(int8, ctx.test, ctx.spec)
    m = classification_metrics(labels, logits.argmax(1), ctx.test.classes)
    fp32_acc = float((ctx.fp32_logits.argmax(1) == labels).mean())
    ref, got = ctx.fp32.predict(ctx.parity_batch), int8.predict(ctx.parity_batch)
    drop = fp32_acc - m["accuracy"]
    max_drop = ctx.settings.get("int8_max_drop", 0.01)
    rec = {"accuracy": m["accuracy"], "fp32_accuracy": fp32_acc, "drop": drop,
           "per_class_accuracy": m["per_class_accuracy"], "macro_f1": m["macro_f1"],
           "top1_disagreements_vs_fp32": int((logits.argmax(1) != ctx.fp32_logits.argmax(1)).sum()),
           "test_images": m["images"], "calibration_images": len(calib), "calibration": "training images, MinMax",
           "parity_batch": {"max_abs_diff": float(np.abs(got - ref).max()),
                            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                            "images": len(ctx.parity_batch)},
           "quantize_seconds": round(seconds, 1), "bytes": path.stat().st_size, "accepted": drop <= max_drop}
    ctx.log(f"INT8 (static, per-channel, {len(calib)} training images): test accuracy "
            f"{100 * m['accuracy']:.2f}% vs {100 * fp32_acc:.2f}% fp32 ({100 * drop:+.2f} points lost), "
            f"{rec['top1_disagreements_vs_fp32']} top-1 changes"
            + ("" if rec["accepted"] else f"; NOT published: more than {100 * max_drop:.1f} points lost"))
    return (OnnxInt8Backend.file if rec["accepted"] else None), rec

