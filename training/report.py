"""summary.md of a run folder: what was trained, how fast, how well, what was published."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lab.runfiles import EvalRecord, ExportRecord, PublishedRecord, RunFiles, TrainedRecord
from training.evaluate import per_class_lines


def write_summary(run) -> Path:
    d = run.dir
    files = RunFiles(d)
    meta = asdict(files.trained()) if files.has(TrainedRecord) else None
    metrics = files.metrics().levels if files.has(EvalRecord) else None
    exported = files.export() if files.has(ExportRecord) else None
    published = asdict(files.published()) if files.has(PublishedRecord) else None
    p = run.preset
    lines = [f"# Run {d.name}", "", f"Preset **{p.name}**: {p.description}", ""]
    if meta:
        t, ds = meta["training"], meta["dataset"]
        lines += [
            "## Training", "",
            f"- data: {ds['name']} from `{ds['root']}`: {ds['train_images']} train, "
            f"{ds['val_images']} validation, {ds['test_images']} test images",
            f"- model: `{meta['architecture']['name']}` {json.dumps(meta['architecture']['kwargs'])}, "
            f"TTA level {meta['tta_level']}",
            f"- {t['epochs']} epochs in **{t['train_seconds']:.1f} s** of training "
            f"({t['images_per_second']:.0f} images/s, {t['precision']} on {t['device']}"
            + (f", {t['world_size']} processes" if t.get("world_size", 1) > 1 else "") + "); "
            f"{t['wall_seconds']:.1f} s wall-clock with per-epoch evaluation",
            f"- optimizer {t['config']['optimizer']}, batch {t['config']['batch_size']}, "
            f"lr {t['config']['lr']}, schedule {t['config']['schedule']}, recipe {t.get('recipe', '')}, "
            f"label smoothing {t['config']['label_smoothing']}", "",
        ]
        hist = meta["history"]
        if hist:
            keys = [k for k in hist[0] if k not in ("epoch", "images")]
            lines += ["| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for r in hist:
                lines.append(f"| {r['epoch']} | " + " | ".join(
                    f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
            lines += ["", "![learning curves](learning_curves.png)", ""]
    if metrics:
        first = next(iter(metrics.values()))
        where = first.get("precision", "fp32") + (f" on {first['device']}" if first.get("device", "cpu") != "cpu" else "")
        lines += [f"## Evaluation (torch, {where})", ""]
        for key, m in metrics.items():
            lines.append(f"- {key}: accuracy **{100 * m['accuracy']:.2f}%**, macro-F1 {m['macro_f1']:.4f} "
                         f"on {m['images']} test images")
        final = metrics[f"tta{meta['tta_level']}"] if meta else list(metrics.values())[-1]
        lines += ["", "```", *per_class_lines(final), "```", "", "![confusion matrix](confusion.png)", ""]
    if exported:
        lines += ["## Export", ""]
        for name, par in exported.parity.items():
            lines.append(f"- {name}: max |logit diff| {par['max_abs_diff']:.2e} (tolerance {par['atol']:g}), "
                         f"top-1 agreement {100 * par['top1_agreement']:.1f}% on {par['images']} held-out images")
        s = exported.served
        lines += [f"- accuracy as served (model.sim.onnx, onnxruntime, card preprocessing): "
                  f"**{100 * s['accuracy']:.2f}%** on {s['images']} test images"]
        i8 = exported.int8
        if i8:
            lines += [f"- INT8 (model.int8.onnx, calibrated on {i8['calibration_images']} training images): "
                      f"{100 * i8['accuracy']:.2f}% ({100 * i8['drop']:+.2f} points lost, "
                      f"{i8['top1_disagreements_vs_fp32']} top-1 changes); "
                      f"{'published' if i8['accepted'] else 'not published'}"]
        lines.append("")
    if published:
        lines += ["## Published", "", f"- BentoML model `{published['tag']}` "
                  f"(`bentoml models get {published['tag']}`)", ""]
    out = d / "summary.md"
    out.write_text("\n".join(lines))
    return out
