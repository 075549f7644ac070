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
    """model.int8.onnx: every INT8 recipe of settings["int8_recipes"] (training/quantize.py) calibrated on
    training images and scored on held-out training images by top-1 agreement with the fp32 model; the
    best one is then measured on the test set and published only if it loses at most
    settings["int8_max_drop"] of test accuracy against the fp32 model. The choice never reads the test
    set; every candidate's test loss is measured after it, for the record."""
    import shutil

    from lab.backends.onnx_int8 import OnnxInt8Backend
    from training.evaluate import classification_metrics, predict_backend
    from training.quantize import Recipe, choose_recipe

    n = ctx.settings.get("calibration_images", 512)
    if not n:
        return None, {"skipped": "calibration_images is 0"}
    names = tuple(ctx.settings.get("int8_recipes") or ()) or (Recipe(calibration_images=n).name,)
    work = ctx.out_dir / "int8-recipes"
    try:
        t0 = time.perf_counter()
        ctx.log(f"INT8: {len(names)} recipe(s), scored on held-out training images")
        chosen, candidates = choose_recipe(ctx.out_dir / "model.sim.onnx", ctx.train_set, ctx.spec, names, work,
                                           log=ctx.log)
        choice_seconds = time.perf_counter() - t0
        # the choice is made; from here on the test set
        labels = ctx.test.labels.numpy()
        fp32_top1 = ctx.fp32_logits.argmax(1)
        fp32_acc = float((fp32_top1 == labels).mean())
        rows, logits = [], None
        for c in candidates:
            c_logits = predict_backend(OnnxInt8Backend(c.path), ctx.test, ctx.spec)
            c_acc = float((c_logits.argmax(1) == labels).mean())
            rows.append({**c.to_dict(), "test_accuracy": c_acc, "test_drop": fp32_acc - c_acc, "chosen": c is chosen})
            if c is chosen:
                logits = c_logits
        path = ctx.out_dir / OnnxInt8Backend.file
        shutil.move(str(chosen.path), path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    int8 = OnnxInt8Backend(path)
    m = classification_metrics(labels, logits.argmax(1), ctx.test.classes)
    ref, got = ctx.fp32.predict(ctx.parity_batch), int8.predict(ctx.parity_batch)
    drop = fp32_acc - m["accuracy"]
    max_drop = ctx.settings.get("int8_max_drop", 0.01)
    r = chosen.recipe
    rec = {"accuracy": m["accuracy"], "fp32_accuracy": fp32_acc, "drop": drop,
           "per_class_accuracy": m["per_class_accuracy"], "macro_f1": m["macro_f1"],
           "top1_disagreements_vs_fp32": int((logits.argmax(1) != fp32_top1).sum()),
           "test_images": m["images"], "calibration_images": r.calibration_images,
           "calibration": f"training images, {r.method}, {'per-channel' if r.per_channel else 'per-tensor'} "
                          f"int8 weights, {r.activations} activations",
           "parity_batch": {"max_abs_diff": float(np.abs(got - ref).max()),
                            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                            "images": len(ctx.parity_batch)},
           "quantize_seconds": round(chosen.quantize_seconds, 1), "bytes": path.stat().st_size,
           "accepted": drop <= max_drop, "recipe": r.to_dict(),
           "choice": f"highest top-1 agreement with fp32 on {chosen.held_out_images} held-out training images "
                     f"(ties: the simplest recipe); test set not read", "choice_seconds": round(choice_seconds, 1),
           "recipes": rows}
    losses = ", ".join(f"{row['name']} {100 * row['test_drop']:+.2f}" for row in rows)
    ctx.log(f"INT8 {r.name} (chosen of {len(rows)} on {chosen.held_out_images} held-out training images, "
            f"agreement {100 * chosen.score:.2f}%): test accuracy "
            f"{100 * m['accuracy']:.2f}% vs {100 * fp32_acc:.2f}% fp32 ({100 * drop:+.2f} points lost), "
            f"{rec['top1_disagreements_vs_fp32']} top-1 changes"
            + ("" if rec["accepted"] else f"; NOT published: more than {100 * max_drop:.1f} points lost")
            + f"; test points lost per recipe: {losses}")
    if not rec["accepted"]:
        rec["not_published"] = (f"the chosen recipe {r.name} loses {100 * drop:.2f} test points, more than "
                                f"{100 * max_drop:.1f}; per recipe: {losses}")
    return (OnnxInt8Backend.file if rec["accepted"] else None), rec

