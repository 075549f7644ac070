"""Export hooks: each makes the file of one further backend (lab.backends) from the verified fp32 export.

A hook returns (the file to publish, or None when it is not good enough; its record for the card).
Adding a backend that needs a new file: its class in lab/backends/, its hook here.
"""
from __future__ import annotations

import time

import numpy as np

from training.export import ExportContext, export_hook, export_verified
from training.quantize import SHUFFLE_SEED, Recipe, quantize_int8


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



# ---------------------------------------------------------------- one view: the TTA level as a rung


def _one_view_record(ctx: ExportContext, backend, seconds: float) -> dict:
    from training.evaluate import classification_metrics, predict_backend

    labels = ctx.test.labels.numpy()
    logits = predict_backend(backend, ctx.test, ctx.spec)
    m = classification_metrics(labels, logits.argmax(1), ctx.test.classes)
    fp32_acc = float((ctx.fp32_logits.argmax(1) == labels).mean())
    return {"accuracy": m["accuracy"], "drop_vs_served": fp32_acc - m["accuracy"], "tta_level": 0, "views": 1,
            "per_class_accuracy": m["per_class_accuracy"], "macro_f1": m["macro_f1"], "test_images": m["images"],
            "top1_disagreements_vs_served": int((logits.argmax(1) != ctx.fp32_logits.argmax(1)).sum()),
            "seconds": round(seconds, 1)}


@export_hook("one_view")
def one_view(ctx: ExportContext) -> tuple[str | None, dict]:
    """model.1view.sim.onnx: the network without test-time augmentation (1 view instead of the card's
    TTA views), exported and parity-checked like the served graph; its test accuracy goes in the card."""
    import shutil

    from lab.backends.one_view import OnnxOneViewBackend

    if ctx.tta_level == 0:
        return None, {"skipped": "the served graph already has one view"}
    t0 = time.perf_counter()
    work = ctx.out_dir / "one_view"
    try:
        export_verified(ctx.net, 0, ctx.parity_batch, work)
        path = ctx.out_dir / OnnxOneViewBackend.file
        shutil.move(str(work / "model.sim.onnx"), path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec = _one_view_record(ctx, OnnxOneViewBackend(path), time.perf_counter() - t0)
    rec["bytes"] = path.stat().st_size
    ctx.log(f"one view (no TTA): test accuracy {100 * rec['accuracy']:.2f}% "
            f"({-100 * rec['drop_vs_served']:+.2f} points against the served TTA graph)")
    return OnnxOneViewBackend.file, rec


@export_hook("one_view_int8")
def one_view_int8(ctx: ExportContext) -> tuple[str | None, dict]:
    """model.1view.int8.onnx: the one-view graph quantized with the recipe the int8 hook chose (on
    training images); published under the same bound on the test accuracy it loses against one view."""
    from lab.backends.one_view import OnnxInt8OneViewBackend, OnnxOneViewBackend
    from training import data as D

    fp32_path = ctx.out_dir / OnnxOneViewBackend.file
    int8 = ctx.previous.get("int8") or {}
    one = ctx.previous.get("one_view") or {}
    if not fp32_path.is_file() or "accuracy" not in one:
        return None, {"skipped": "no one-view graph"}
    if "accuracy" not in int8:
        return None, {"skipped": "no INT8 recipe (the int8 hook did not run)"}
    recipe = Recipe.parse(int8["recipe"]["name"]) if int8.get("recipe") else Recipe()
    # the calibration images the int8 hook used: the first N of the training set in its fixed order
    calib = D.to_float(D.shuffled(ctx.train_set, SHUFFLE_SEED).images[:int8.get("calibration_images", 512)],
                       ctx.spec).numpy()
    t0 = time.perf_counter()
    path = ctx.out_dir / OnnxInt8OneViewBackend.file
    quantize_int8(fp32_path, calib, path, recipe)
    rec = _one_view_record(ctx, OnnxInt8OneViewBackend(path), time.perf_counter() - t0)
    drop = one["accuracy"] - rec["accuracy"]
    max_drop = ctx.settings.get("int8_max_drop", 0.01)
    rec.update(drop_vs_one_view=drop, recipe=recipe.to_dict(), bytes=path.stat().st_size, accepted=drop <= max_drop)
    ctx.log(f"one view INT8: test accuracy {100 * rec['accuracy']:.2f}% ({100 * drop:+.2f} points against one "
            f"view fp32)" + ("" if rec["accepted"] else f"; NOT published: more than {100 * max_drop:.1f} points lost"))
    if not rec["accepted"]:
        path.unlink(missing_ok=True)
        return None, rec
    return OnnxInt8OneViewBackend.file, rec


# ---------------------------------------------------------------- students: cheaper networks as rungs


@export_hook("students")
def students(ctx: ExportContext) -> tuple[list[str], dict]:
    """student.<name>.sim.onnx and student.<name>.int8.onnx for each student the students stage trained
    (training/compress/students.py, settings["students"]: their records): one view, exported and
    parity-checked like the served graph, quantized with the recipe the int8 hook chose on the same
    calibration images; the INT8 file is published when it loses at most int8_max_drop against the
    student's fp32 graph. A student whose export fails its parity check is not published (one line says
    why); the others are."""
    import shutil

    from lab.backends import get_backend
    from training import data as D
    from training.compress.students import load_student
    from training.export import ExportError
    from training.evaluate import classification_metrics, predict_backend

    records = ctx.settings.get("students") or {}
    if not records:
        return [], {"skipped": "no students trained (the students stage did not run)"}
    int8 = ctx.previous.get("int8") or {}
    recipe = Recipe.parse(int8["recipe"]["name"]) if int8.get("recipe") else None
    calib = (D.to_float(D.shuffled(ctx.train_set, SHUFFLE_SEED).images[:int8.get("calibration_images", 512)],
                        ctx.spec).numpy() if recipe else None)
    labels = ctx.test.labels.numpy()
    served_acc = float((ctx.fp32_logits.argmax(1) == labels).mean())
    max_drop = ctx.settings.get("int8_max_drop", 0.01)
    made, out = [], {}
    for name, rec in records.items():
        fp32_cls, int8_cls = get_backend(f"{name}_1view"), get_backend(f"{name}_int8_1view")
        work = ctx.out_dir / f"student-{name}"
        for cls in (fp32_cls, int8_cls):  # an earlier export's files never stand in for this one's
            (ctx.out_dir / cls.file).unlink(missing_ok=True)
        try:
            net = load_student(ctx.settings["run_dir"], rec)
            result = export_verified(net, 0, ctx.parity_batch, work)
            shutil.move(str(work / "model.sim.onnx"), ctx.out_dir / fp32_cls.file)
        except ExportError as e:
            out[name] = {"refused": str(e)}
            ctx.log(f"student {name}: NOT published: {e}")
            continue
        finally:
            shutil.rmtree(work, ignore_errors=True)
        acc = float((predict_backend(fp32_cls(ctx.out_dir / fp32_cls.file), ctx.test, ctx.spec).argmax(1)
                     == labels).mean())
        entry = {"network": name, "method": rec["method"], "architecture": rec["architecture"],
                 "macs_per_image": rec["macs_per_image"], "parameters": rec["parameters"],
                 "train_seconds": rec["train_seconds"], "epochs": rec["epochs"],
                 "train_images": rec.get("train_images"), "accuracy": acc,
                 "drop_vs_served": served_acc - acc, "parity": result["parity"], "pruning": rec.get("pruning"),
                 "distill_weight": rec.get("distill_weight"), "distill_temperature": rec.get("distill_temperature"),
                 "teacher_sha256": rec["teacher"]["weights_sha256"]}
        made.append(fp32_cls.file)
        if recipe is not None:
            path = ctx.out_dir / int8_cls.file
            quantize_int8(ctx.out_dir / fp32_cls.file, calib, path, recipe)
            q_acc = float((predict_backend(int8_cls(path), ctx.test, ctx.spec).argmax(1) == labels).mean())
            entry["int8"] = {"accuracy": q_acc, "drop_vs_student": acc - q_acc, "recipe": recipe.name,
                             "accepted": acc - q_acc <= max_drop}
            if entry["int8"]["accepted"]:
                made.append(int8_cls.file)
            else:
                path.unlink(missing_ok=True)
        out[name] = entry
        ctx.log(f"student {name}: test accuracy {100 * acc:.2f}% with one view ({100 * (acc - served_acc):+.2f} "
                f"points against the served graph)" + (f"; INT8 {100 * entry['int8']['accuracy']:.2f}%"
                                                       + ("" if entry["int8"]["accepted"] else " NOT published")
                                                       if "int8" in entry else ""))
    return made, {"students": out}


# ---------------------------------------------------------------- the ladder: every published rung measured


def published_rungs(ctx: ExportContext) -> tuple[dict, dict]:
    """({backend: a function that builds it}, {backend: its file}) for every registered backend whose
    file is published, but those the preset skips (settings["ladder_skip"])."""
    from types import SimpleNamespace

    from lab.backends import get_backend, list_backends
    from lab.card import Architecture
    from lab.hardware import cores

    arch = ctx.architecture  # what the torch backends build model.pth into
    card = SimpleNamespace(tta_level=ctx.tta_level, preprocessing=ctx.spec, classes=list(ctx.test.classes),
                           architecture=Architecture(arch["name"], arch["kwargs"]) if arch else None)
    published = set(ctx.files)
    builders, files = {}, {}
    for name in list_backends():
        cls = get_backend(name)
        if name in ctx.settings.get("ladder_skip", ()) or cls.file not in published:
            continue
        path = ctx.out_dir / cls.file

        def build(cls=cls, path=path):
            cls.check_available()
            return cls(path, card, threads=cores())

        builders[name], files[name] = build, path
    return builders, files


@export_hook("qat")
def qat(ctx: ExportContext) -> tuple[str | None, dict]:
    """model.qat.int8.onnx: where the post-training INT8 graph the int8 hook chose loses more than
    settings["qat_above_drop"] of accuracy on the held-out training images (the last ones of the fixed
    order, which no calibration used; the test set takes no part in the decision), the served network is
    fine-tuned with its quantization in the loop (training/compress/qat.py: fake int8 weights per channel
    and u8 activations calibrated on the same images as post-training INT8, settings["qat_epochs"] epochs
    of the model's recipe at a tenth of its learning rates) and exported as a QDQ graph; published when it
    loses at most int8_max_drop of test accuracy."""
    from lab.backends.onnx_int8 import OnnxInt8Backend
    from lab.backends.qat import OnnxInt8QatBackend
    from training import data as D
    from training.compress import qat as Q
    from training.evaluate import classification_metrics, predict_backend
    from training.quantize import split_training

    int8 = ctx.previous.get("int8") or {}
    cfg = ctx.settings.get("train_config")
    ptq_path = ctx.out_dir / OnnxInt8Backend.file
    if "accuracy" not in int8 or cfg is None or not ptq_path.is_file():
        return None, {"skipped": "no post-training INT8 graph to compare with"}
    order = D.shuffled(ctx.train_set, SHUFFLE_SEED)
    held = order.subset(slice(len(order) - split_training(len(order))[1], len(order)))
    labels = held.labels.numpy()
    fp32_held = float((predict_backend(ctx.fp32, held, ctx.spec).argmax(1) == labels).mean())
    ptq_held = float((predict_backend(OnnxInt8Backend(ptq_path), held, ctx.spec).argmax(1) == labels).mean())
    drop, limit = fp32_held - ptq_held, ctx.settings.get("qat_above_drop", 0.003)
    decision = {"held_out_images": len(held), "held_out_fp32": fp32_held, "held_out_post_training": ptq_held}
    if drop <= limit:
        return None, {"skipped": f"post-training INT8 loses {100 * drop:.2f} points on {len(held)} held-out "
                                 f"training images, within {100 * limit:.2f}", **decision}
    path = ctx.out_dir / OnnxInt8QatBackend.file
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    calib = D.to_float(order.images[:int8.get("calibration_images", 512)], ctx.spec).numpy()
    try:  # a network QAT cannot handle (nothing to quantize, untraceable, parity missed) keeps its other rungs
        net = Q.prepare(ctx.net, calib)
        result = Q.finetune(net, ctx.train_set, ctx.spec, cfg, ctx.settings.get("qat_epochs", 1.0),
                            log=lambda *_: None)
        exported = Q.export_qdq(result.model, ctx.tta_level, ctx.parity_batch, path)
    except Q.QATError as e:
        path.unlink(missing_ok=True)
        ctx.log(f"QAT: NOT published: {e}")
        return None, {"refused": str(e), **decision}
    labels = ctx.test.labels.numpy()
    logits = predict_backend(OnnxInt8QatBackend(path), ctx.test, ctx.spec)
    m = classification_metrics(labels, logits.argmax(1), ctx.test.classes)
    fp32_acc = float((ctx.fp32_logits.argmax(1) == labels).mean())
    max_drop = ctx.settings.get("int8_max_drop", 0.01)
    rec = {"accuracy": m["accuracy"], "fp32_accuracy": fp32_acc, "drop": fp32_acc - m["accuracy"],
           "post_training_drop": int8.get("drop"), **decision, "epochs": result.history[-1]["epoch"],
           "train_seconds": round(result.train_seconds, 3), "seconds": round(time.perf_counter() - t0, 1),
           "int8_kernels": exported.get("int8_kernels"), "parity": exported.get("parity"), "bytes": path.stat().st_size,
           "accepted": fp32_acc - m["accuracy"] <= max_drop}
    ctx.log(f"QAT: test accuracy {100 * m['accuracy']:.2f}% ({100 * -rec['drop']:+.2f} points against fp32; "
            f"post-training INT8 {100 * -(int8.get('drop') or 0):+.2f})"
            + ("" if rec["accepted"] else f"; NOT published: more than {100 * max_drop:.1f} points lost"))
    if not rec["accepted"]:
        path.unlink(missing_ok=True)
        return None, rec
    return OnnxInt8QatBackend.file, rec


def rung_facts(ctx: ExportContext) -> dict[str, dict]:
    """What each registered backend's rung is: the network it runs, how it was made cheaper, its views
    per image and its multiply-accumulates per image (views x one view's), its parameters and the
    training it cost (students only)."""
    from lab.backends import get_backend, list_backends
    from models import count_parameters
    from models.tta import passes
    from training.pipeline import count_flops

    shape = tuple(ctx.parity_batch.shape[1:])
    served_macs = count_flops(ctx.net, shape) // 2
    students = (ctx.previous.get("students") or {}).get("students") or {}
    out = {}
    for name in list_backends():
        cls = get_backend(name)
        views = cls.views or passes(ctx.tta_level)
        if cls.network == "served":
            out[name] = {"network": "served", "method": cls.method, "views": views,
                         "macs_per_image": served_macs * views, "parameters": count_parameters(ctx.net)}
        elif cls.network == "qat" and "train_seconds" in (ctx.previous.get("qat") or {}):
            q = ctx.previous["qat"]
            out[name] = {"network": "qat", "method": cls.method, "views": views,
                         "macs_per_image": served_macs * views, "parameters": count_parameters(ctx.net),
                         "train_seconds": q["train_seconds"], "train_epochs": q["epochs"]}
        elif "macs_per_image" in students.get(cls.network, {}):
            st = students[cls.network]
            out[name] = {"network": cls.network, "method": cls.method, "views": views,
                         "macs_per_image": st["macs_per_image"] * views, "parameters": st["parameters"],
                         "train_seconds": st["train_seconds"], "train_epochs": st["epochs"]}
    return out


@export_hook("ladder")
def ladder(ctx: ExportContext) -> tuple[None, dict]:
    """Measure every rung the model will be published with (training/ladder.py): accuracy on the test
    set, latency at batch 1, throughput at batch 64; the card gets them and the best rung (the fastest
    within MAX_DROP of the served fp32 graph), the service's default where no faster proven rung is timed
    on the serving machine (serving/catalog.py). Runs after the hooks that make backend files."""
    from lab.hardware import cores, cpu_name
    from training.ladder import MAX_DROP, best_rung, cpu_flags, measure

    builders, files = published_rungs(ctx)
    t0 = time.perf_counter()
    rungs = measure(builders, ctx.test, ctx.spec, reference="onnx", files=files, log=ctx.log, progress=False)
    best, rule = best_rung(rungs, "onnx", ctx.settings.get("ladder_max_drop", MAX_DROP))
    for r in rungs.values():
        if not r.note:
            ctx.log(f"  rung {r.backend:16s} {100 * r.accuracy:6.2f}% ({100 * r.diff:+.2f} points) "
                    f"{r.images_per_s_b64:8.1f} images/s at batch 64, {r.ms_b1_p50:6.2f} ms at batch 1")
    ctx.log(f"best rung: {best} ({rule})")
    facts = rung_facts(ctx)
    return None, {"rungs": {n: {**r.to_dict(), **facts.get(n, {})} for n, r in rungs.items()}, "best": best,
                  "rule": rule,
                  "reference": "onnx", "threads": cores(), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
                  "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- golden answers: what every backend must reproduce


@export_hook("golden")
def golden(ctx: ExportContext) -> tuple[list[str], dict]:
    """golden.images.npy and golden.outputs.npy (lab/golden.py): a fixed sample of test images and the
    served fp32 graph's outputs on them; each published backend that runs here is measured against them
    and its tolerance recorded, which the service checks again at load on the machine that serves it."""
    from lab import golden as G

    images = G.golden_images(ctx.test.images.permute(0, 2, 3, 1).numpy())
    reference = G.run(ctx.fp32, images, ctx.spec)
    paths = G.write(ctx.out_dir, images, reference)
    builders, _ = published_rungs(ctx)
    records, skipped = {}, {}
    for name, build in builders.items():
        try:
            backend = build()
        except Exception as e:  # BackendUnavailable here: measured nowhere, proven with the default tolerance
            skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0]
            continue
        records[name] = G.record(G.run(backend, images, ctx.spec), reference)
        m = records[name]["measured"]
        ctx.log(f"golden answers, {name}: top-1 agreement {100 * m['agreement']:.1f}%, mean difference "
                f"{m['mean_diff']:.2g} std on {len(images)} images")
    rec = {"reference": "onnx", "images": len(images), "files": sorted(paths), "backends": records,
           "not_measured": skipped}
    return sorted(paths), rec
