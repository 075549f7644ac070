#!/usr/bin/env python
"""Import an image classifier made elsewhere as ONNX: checked, made servable, published like the lab's own.

    python training/import_onnx.py MODEL.onnx --name NAME --classes CLASSES.txt --preprocessing SPEC.json \\
        [--outputs logits|probabilities] [--accuracy-folder DIR] [--calibration-folder DIR]

CLASSES.txt: one class name a line, in the order of the model's outputs. SPEC.json: the keys of a card's
`preprocessing` (lab/preprocess.py): size [H, W], channels, mean, std, and optionally resize
("shorter_side_center_crop" or "stretch"), resize_size (the shorter side before the central crop),
interpolation, channel_order (RGB or BGR), layout (NCHW or NHWC), input_range ("0-1" or "0-255").
The folders hold labelled images as DIR/<class name>/<image>: the accuracy folder measures every rung
(the ladder) on them; the calibration folder, training-like images, calibrates the INT8 graph.

The checks, each failure one line on stderr with exit code 2 and nothing published:
ONNX Runtime loads the file; one 4-D float image input (graph inputs that are initializers are not
inputs) matching the declared layout, channels and size; one [N, K] output ([N, K, 1, 1] is flattened)
with K the number of class names; the IR version and opset within what onnx and ONNX Runtime here
support; external data present; file and graph within --max-mib and --max-nodes; class names distinct.
A fixed batch axis is made free where the graph allows it, proven by the outputs of a batch of 3
equalling those of the 3 images one by one; else the model is served one image a call (card:
max_batch 1). Probabilities become log-probabilities in the graph, so the service's softmax gives them
back. Then as for a trained model: onnxsim (parity-checked against the source), INT8 (with a
calibration folder), the ladder's rungs that need no torch, golden answers, the card, the store.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

MAX_MIB = 1024         # the source graph with its external data, MiB
MAX_NODES = 100_000    # nodes in the graph
MAX_CLASSES = 100_000
PARITY_ATOL = 1e-4     # of the output's spread: the same graph on two batch shapes / before and after onnxsim
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class ImportRefused(Exception):
    """What is wrong with the import, in one line."""


# ---------------------------------------------------------------- what the user declared


def read_classes(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ImportRefused(f"cannot read the class file {path}: {e}") from None
    names = [n for n in names if n]
    if not names:
        raise ImportRefused(f"the class file {path} names no class")
    if len(names) > MAX_CLASSES:
        raise ImportRefused(f"the class file names {len(names)} classes, more than {MAX_CLASSES}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ImportRefused(f"the class file {path} names some classes twice: {', '.join(dup[:5])}")
    return names


def read_spec(path: Path):
    from lab.preprocess import Preprocessing

    try:
        d = json.loads(Path(path).read_text())
        return Preprocessing.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
        raise ImportRefused(f"the preprocessing spec {path}: {what}") from None


# ---------------------------------------------------------------- the graph


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def load_checked(path: Path, classes: list[str], spec, max_mib: float, max_nodes: int, output: str | None):
    """The ONNX model with its external data, after every static check; ImportRefused names the first problem."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ImportRefused(f"{path}: no such file")
    size = path.stat().st_size
    if size > max_mib * 2**20:
        raise ImportRefused(f"{path.name} is {size / 2**20:.0f} MiB, more than the bound of {max_mib:g} MiB (--max-mib)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ImportRefused(f"{path.name} is not a readable ONNX model ({type(e).__name__}: {e})".strip()) from None
    if not model.graph.node:
        raise ImportRefused(f"{path.name} is not an ONNX model with a graph (no nodes: not ONNX, or truncated)")
    if model.ir_version > onnx.IR_VERSION:
        raise ImportRefused(f"IR version {model.ir_version} is newer than this onnx reads (at most {onnx.IR_VERSION})")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or opset > newest:
        raise ImportRefused(f"opset {opset} of the default domain is not supported here (1..{newest})")
    if len(model.graph.node) > max_nodes:
        raise ImportRefused(f"the graph has {len(model.graph.node)} nodes, more than the bound of {max_nodes} (--max-nodes)")
    external = external_files(model)
    total = size
    for name, need in external.items():
        f = path.parent / name
        if not f.is_file():
            raise ImportRefused(f"external data file {name!r} that the graph names is missing beside {path.name}")
        if f.stat().st_size < need:
            raise ImportRefused(f"external data file {name!r} is {f.stat().st_size} bytes, the graph reads {need}")
        total += f.stat().st_size
    if total > max_mib * 2**20:
        raise ImportRefused(f"the graph and its external data are {total / 2**20:.0f} MiB, more than {max_mib:g} MiB")
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ImportRefused(f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                            f"an image classifier takes one")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise ImportRefused(f"input {inputs[0].name!r} is {len(dims)}-D {dims}; an image batch is 4-D")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ImportRefused(f"input {inputs[0].name!r} is {onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type)}, "
                            f"not FLOAT")
    want = list(spec.input_shape)
    got = dims[1:]
    if any(isinstance(g, int) and g != w for g, w in zip(got, want)):
        raise ImportRefused(f"input {inputs[0].name!r} is {dims}, the preprocessing makes [N, "
                            f"{', '.join(map(str, want))}] ({spec.layout}, {spec.channels} channels, "
                            f"{spec.size[0]}x{spec.size[1]})")
    outputs = list(model.graph.output)
    if output is not None:
        outputs = [o for o in outputs if o.name == output]
        if not outputs:
            raise ImportRefused(f"no graph output named {output!r}; it has {', '.join(o.name for o in model.graph.output)}")
    if len(outputs) != 1:
        raise ImportRefused(f"the graph has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); "
                            f"name the class scores with --output")
    odims = _dims(outputs[0])
    if not (len(odims) == 2 or (len(odims) == 4 and odims[2:] == [1, 1])):
        raise ImportRefused(f"output {outputs[0].name!r} is {odims}; class scores are [N, K] (or [N, K, 1, 1])")
    if isinstance(odims[1], int) and odims[1] != len(classes):
        raise ImportRefused(f"output {outputs[0].name!r} has {odims[1]} classes, the class file names {len(classes)}")
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model


def external_files(model) -> dict[str, int]:
    """External data files the graph's tensors name -> the bytes read from each, at least."""
    import onnx

    need: dict[str, int] = {}
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
                raise ImportRefused(f"tensor {t.name!r} names external data {loc!r} outside the model's folder")
            end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
            need[loc] = max(need.get(loc, 0), end)
    return need


def servable_graph(model, outputs_kind: str, fixed_batch: bool):
    """The graph as the service runs it: one output `logits` [N, K] (flattened; log of probabilities),
    the batch axis free unless fixed_batch. Returns (model, [what was changed])."""
    import onnx
    from onnx import helper, numpy_helper

    m = copy.deepcopy(model)
    changes = []
    g = m.graph
    out = g.output[0]
    name = out.name
    if len(_dims(out)) == 4:
        g.node.append(helper.make_node("Flatten", [name], [name + "_flat"], axis=1))
        name += "_flat"
        changes.append("[N, K, 1, 1] output flattened to [N, K]")
    if outputs_kind == "probabilities":
        g.initializer.append(numpy_helper.from_array(np.array(1e-30, np.float32), "lab_min_probability"))
        g.node.append(helper.make_node("Max", [name, "lab_min_probability"], [name + "_floor"]))
        g.node.append(helper.make_node("Log", [name + "_floor"], [name + "_log"]))
        name += "_log"
        changes.append("probabilities turned into log-probabilities (softmax gives them back)")
    names = {o for n in g.node for o in (*n.input, *n.output)} | {i.name for i in (*g.input, *g.initializer)}
    final = "logits" if "logits" not in names else "lab_logits"
    g.node.append(helper.make_node("Identity", [name], [final]))
    k = _dims(out)[1]
    batch = "N" if not fixed_batch else (_dims(out)[0] if isinstance(_dims(out)[0], int) else 1)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, [batch, k]))
    inits = {i.name for i in g.initializer}
    inp = next(i for i in g.input if i.name not in inits)
    if not fixed_batch and inp.type.tensor_type.shape.dim[0].HasField("dim_value"):
        inp.type.tensor_type.shape.dim[0].dim_param = "N"
        del g.value_info[:]  # shapes inferred for the fixed batch would contradict the free one
        changes.append("batch axis made free")
    # older IR versions list initializers among the inputs: keep only the image input there
    if any(i.name in inits for i in g.input):
        keep = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(keep)
        if m.ir_version < 4:
            m.ir_version = 4
        changes.append("initializers taken out of the graph's inputs")
    return m, changes


def _session(model_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def make_servable(model, outputs_kind: str, sample: np.ndarray, classes: list[str], log=print):
    """(servable model, its batch limit (0: any), changes, parity record). The free batch axis only when a
    batch of 3 gives what 3 calls of one give."""
    try:
        fixed_session = _session(servable_graph(model, outputs_kind, fixed_batch=True)[0])
    except Exception as e:
        raise ImportRefused(f"ONNX Runtime cannot load the graph: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    fixed_n = fixed_session.get_inputs()[0].shape[0]
    one = np.stack([_run(fixed_session, sample[i:i + 1])[0] if fixed_n in (1, None) or isinstance(fixed_n, str)
                    else _run(fixed_session, np.repeat(sample[i:i + 1], fixed_n, 0))[0] for i in range(len(sample))])
    if one.shape != (len(sample), len(classes)):
        raise ImportRefused(f"the graph answers shape {one.shape[1:]} per image, the class file names {len(classes)} classes")
    if not np.all(np.isfinite(one)):
        raise ImportRefused("the graph gives non-finite outputs on the sample images")
    free, changes = servable_graph(model, outputs_kind, fixed_batch=False)
    why = ""
    try:
        got = _run(_session(free), sample)
        scale = float(np.abs(one).max()) or 1.0
        diff = float(np.abs(got - one).max()) / scale if got.shape == one.shape else float("inf")
        if diff > PARITY_ATOL or (got.argmax(1) != one.argmax(1)).any():
            why = f"a batch of {len(sample)} differs from one image at a time (max difference {diff:.2g} of the largest output)"
    except Exception as e:  # a Reshape to a fixed batch, ...
        why = f"ONNX Runtime refuses a batch of {len(sample)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if why:
        log(f"the batch axis stays fixed ({why}): served one image a call")
        fixed, changes = servable_graph(model, outputs_kind, fixed_batch=True)
        return fixed, 1, changes + [f"batch axis left fixed: {why}"], one
    log("batch axis made free: a batch of 3 equals the 3 images one by one")
    return free, 0, changes, one


# ---------------------------------------------------------------- images


def read_folder(folder: Path, classes: list[str], spec, limit: int = 0):
    """uint8 (N, H, W, C) and int labels of DIR/<class>/<image>, through the card's preprocessing."""
    from lab.preprocess import ImageError, decode_uint8

    folder = Path(folder)
    if not folder.is_dir():
        raise ImportRefused(f"{folder}: no such folder")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in index)
    if unknown:
        raise ImportRefused(f"{folder} has folders that are no class of the model: {', '.join(unknown[:5])}")
    files = sorted((p, index[p.parent.name]) for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImportRefused(f"{folder} holds no images as <class>/<image>")
    if limit and len(files) > limit:
        pick = np.sort(np.random.default_rng(0).permutation(len(files))[:limit])
        files = [files[i] for i in pick]
    images, labels = [], []
    for p, label in files:
        try:
            images.append(decode_uint8(p.read_bytes(), spec))
        except ImageError as e:
            raise ImportRefused(f"{p}: {e}") from None
        labels.append(label)
    return np.stack(images), np.array(labels, np.int64)


def count_macs(model, input_shape: tuple) -> int:
    """Multiply-accumulates of one image through the graph's Conv, Gemm and MatMul nodes (shape-inferred)."""
    from onnx import shape_inference

    m = copy.deepcopy(model)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    for d, v in zip(inp.type.tensor_type.shape.dim, (1, *input_shape)):
        d.Clear()
        d.dim_value = v
    try:
        m = shape_inference.infer_shapes(m)
    except Exception:
        return 0
    shapes = {v.name: _dims(v) for v in (*m.graph.value_info, *m.graph.output, *m.graph.input)}
    shapes.update({i.name: list(i.dims) for i in m.graph.initializer})
    macs = 0
    for n in m.graph.node:
        out = shapes.get(n.output[0]) if n.output else None
        if not out or not all(isinstance(v, int) for v in out):
            continue
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in shapes:
            w = shapes[n.input[1]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in shapes:
            w = shapes[n.input[1]]
            transposed = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            macs += int(np.prod(out)) * int(w[-1] if transposed else w[-2] if len(w) > 1 else 1)
    return macs


# ---------------------------------------------------------------- the import


def import_model(src: Path, name: str, classes_file: Path, spec_file: Path, *, outputs: str = "logits",
                 output: str | None = None, accuracy_folder: Path | None = None,
                 calibration_folder: Path | None = None, max_mib: float = MAX_MIB, max_nodes: int = MAX_NODES,
                 accuracy_images: int = 10_000, n_golden: int = 256, log=print) -> str:
    """Check, convert, measure and publish; returns the store tag. ImportRefused: nothing was published."""
    import onnx

    from lab import golden as G
    from lab.backends import backends_for_files, get_backend
    from lab.card import Architecture, Card
    from lab.preprocess import normalize
    from lab.store import publish
    from training.export import ExportError, simplify_onnx

    if not name or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-_." for c in name) or name[0] in "-_.":
        raise ImportRefused(f"model name {name!r}: lower-case letters, digits, '-', '_' and '.', not first")
    classes = read_classes(classes_file)
    spec = read_spec(spec_file)
    src = Path(src)
    model = load_checked(src, classes, spec, max_mib, max_nodes, output)
    source_sha = hashlib.sha256(src.read_bytes()).hexdigest()
    accuracy = read_folder(accuracy_folder, classes, spec, accuracy_images) if accuracy_folder else None
    calibration = read_folder(calibration_folder, classes, spec, 512) if calibration_folder else None
    pool = accuracy[0] if accuracy is not None else calibration[0] if calibration is not None else None
    golden_note = ""
    if pool is None:
        golden_note = "no images were given: the golden images are seeded noise"
        pool = np.random.default_rng(0).integers(0, 256, (n_golden, *spec.size, spec.channels), dtype=np.uint8)
    golden_images = G.golden_images(pool, n_golden)
    sample = normalize(golden_images[:3], spec)
    servable, max_batch, changes, _ = make_servable(model, outputs, sample, classes, log=log)

    work = Path(tempfile.mkdtemp(prefix=f"lab-import-{name}-"))
    try:
        raw = work / "model.onnx"
        onnx.save(servable, str(raw))
        sim = work / "model.sim.onnx"
        sim_note = ""
        try:
            simplify_onnx(raw, sim)
        except ExportError as e:
            sim_note = f"onnxsim could not simplify it ({e}); the graph is served as imported"
            shutil.copyfile(raw, sim)
            log(sim_note)
        parity = _parity(raw, sim, normalize(golden_images, spec), max_batch)
        if not parity["ok"]:
            raise ImportRefused(f"the simplified graph disagrees with the source: max difference "
                                f"{parity['max_abs_diff']:.3g}, top-1 agreement {100 * parity['top1_agreement']:.1f}%")
        files = {"model.onnx": raw, "model.sim.onnx": sim}
        int8_rec = None
        if calibration is not None and not max_batch:
            int8_rec = _int8(sim, work, calibration[0], spec, accuracy, log)
            if int8_rec.get("accepted"):
                files["model.int8.onnx"] = work / "model.int8.onnx"
        elif calibration is not None:
            int8_rec = {"skipped": "the graph takes one image a call; INT8 calibration needs batches"}
        card_stub = _Stub(spec, classes, max_batch)
        from lab.backends.base import within_max_batch

        def builder(backend_name):
            cls = get_backend(backend_name)

            def build():
                cls.check_available()
                return within_max_batch(cls(work / cls.file, card_stub), card_stub)
            return build

        rungs_for = {b: builder(b) for b in backends_for_files(files) if not get_backend(b).file.endswith(".pth")}
        ladder, metrics = _ladder(rungs_for, files, accuracy, classes, spec, log)
        reference = G.run(rungs_for["onnx"](), golden_images, spec)
        G.write(work, golden_images, reference)
        files.update({G.GOLDEN_IMAGES_FILE: work / G.GOLDEN_IMAGES_FILE, G.GOLDEN_OUTPUTS_FILE: work / G.GOLDEN_OUTPUTS_FILE})
        records, not_measured = {}, {}
        for b, build in rungs_for.items():
            try:
                records[b] = G.record(G.run(build(), golden_images, spec), reference)
            except Exception as e:
                not_measured[b] = f"{type(e).__name__}: {e}".splitlines()[0]
        golden = {"reference": "onnx", "images": len(golden_images), "backends": records, "not_measured": not_measured,
                  "source": golden_note or ("the accuracy folder" if accuracy is not None else "the calibration folder")}
        macs = count_macs(servable, spec.input_shape)
        card = Card(
            name=name, architecture=Architecture("imported", {"num_classes": len(classes)}), classes=classes,
            preprocessing=spec, tta_level=0, backends={}, metrics=metrics,
            dataset={"name": Path(accuracy_folder).name if accuracy_folder else "none",
                     "accuracy_folder": str(accuracy_folder or ""), "calibration_folder": str(calibration_folder or "")},
            training={"imported": True},
            parameters=int(sum(np.prod(i.dims) for i in servable.graph.initializer)), flops_per_image=2 * macs,
            flops_per_image_with_tta=2 * macs, parity={"onnx_simplified": parity}, versions=_versions(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), int8=int8_rec,
            rungs=(ladder or {}).get("rungs"), best_rung=(ladder or {}).get("best"), golden=golden,
            imported={"source": src.name, "sha256": source_sha, "bytes": src.stat().st_size,
                      "outputs": outputs, "output": model.graph.output[0].name,
                      "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
                      "ir_version": model.ir_version, "changes": changes + ([sim_note] if sim_note else []),
                      "declared": {"classes_file": str(classes_file), "preprocessing": spec.to_dict()}},
            max_batch=max_batch)
        tag = publish(name, files, card, labels={"imported": "true", "source": src.name[:60]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"published {tag}" + (": served one image a call" if max_batch else ""))
    return tag


class _Stub:
    """What a backend reads of a card, before the card exists."""

    def __init__(self, spec, classes, max_batch):
        self.preprocessing, self.classes, self.max_batch, self.tta_level = spec, classes, max_batch, 0
        self.architecture = None


def _parity(raw: Path, sim: Path, x: np.ndarray, max_batch: int) -> dict:
    a, b = _session(raw), _session(sim)
    step = max_batch or len(x)
    ya = np.concatenate([_run(a, x[i:i + step]) for i in range(0, len(x), step)])
    yb = np.concatenate([_run(b, x[i:i + step]) for i in range(0, len(x), step)])
    scale = float(np.abs(ya).max()) or 1.0
    diff = float(np.abs(ya - yb).max())
    agree = float((ya.argmax(1) == yb.argmax(1)).mean())
    return {"max_abs_diff": diff, "relative": diff / scale, "top1_agreement": agree, "images": len(x),
            "atol": PARITY_ATOL, "ok": diff / scale <= PARITY_ATOL and agree == 1.0}


def _int8(sim: Path, work: Path, calibration: np.ndarray, spec, accuracy, log) -> dict:
    from lab.backends.onnx import OnnxBackend
    from lab.backends.onnx_int8 import OnnxInt8Backend
    from lab.preprocess import normalize
    from training.quantize import Recipe, quantize_int8

    recipe = Recipe(calibration_images=len(calibration))
    t0 = time.perf_counter()
    out = quantize_int8(sim, normalize(calibration, spec), work / "model.int8.onnx", recipe)
    rec = {"recipe": recipe.to_dict(), "calibration_images": len(calibration),
           "quantize_seconds": round(time.perf_counter() - t0, 1), "bytes": out.stat().st_size}
    if accuracy is None:
        rec.update(accepted=True, note="no accuracy folder: its top-1 agreement is proven by the golden answers only")
        return rec
    x, labels = normalize(accuracy[0], spec), accuracy[1]
    fp32 = np.concatenate([OnnxBackend(sim).predict(x[i:i + 64]) for i in range(0, len(x), 64)]).argmax(1)
    int8 = np.concatenate([OnnxInt8Backend(out).predict(x[i:i + 64]) for i in range(0, len(x), 64)]).argmax(1)
    drop = float((fp32 == labels).mean() - (int8 == labels).mean())
    rec.update(accuracy=float((int8 == labels).mean()), fp32_accuracy=float((fp32 == labels).mean()), drop=drop,
               accepted=drop <= 0.01, top1_disagreements_vs_fp32=int((fp32 != int8).sum()))
    log(f"INT8: {100 * rec['accuracy']:.2f}% vs {100 * rec['fp32_accuracy']:.2f}% fp32 on the accuracy folder"
        + ("" if rec["accepted"] else "; NOT published: more than 1 point lost"))
    return rec


def _ladder(builders: dict, files: dict, accuracy, classes, spec, log):
    """The rungs measured on the accuracy folder (training/ladder.py), and the card's metrics."""
    if accuracy is None:
        return None, {"note": "no accuracy folder was given: accuracy not measured"}
    import torch

    from lab.backends import get_backend
    from training.data import ArrayDataset
    from training.ladder import MAX_DROP, best_rung, measure

    images, labels = accuracy
    test = ArrayDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                        list(classes), "accuracy folder")
    paths = {b: files[get_backend(b).file] for b in builders}
    rungs = measure(builders, test, spec, reference="onnx", files=paths, log=log, progress=False)
    best, rule = best_rung(rungs, "onnx", MAX_DROP)
    for r in rungs.values():
        if not r.note:
            log(f"  rung {r.backend:16s} {100 * r.accuracy:6.2f}% {r.images_per_s_b64:8.1f} images/s at batch 64, "
                f"{r.ms_b1_p50:6.2f} ms at batch 1")
    correct = rungs["onnx"].correct
    per_class = {c: float(correct[labels == i].mean()) for i, c in enumerate(classes) if (labels == i).any()}
    metrics = {"test_accuracy": rungs["onnx"].accuracy, "test_images": len(labels), "per_class_accuracy": per_class,
               "measured_with": "model.sim.onnx in onnxruntime on the accuracy folder, card preprocessing"}
    return {"rungs": {n: r.to_dict() for n, r in rungs.items()}, "best": best, "rule": rule}, metrics


def _versions() -> dict:
    import platform

    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="the ONNX file (external data beside it)")
    ap.add_argument("--name", required=True, help="the model's name in the store")
    ap.add_argument("--classes", required=True, type=Path, help="class names, one a line, in output order")
    ap.add_argument("--preprocessing", required=True, type=Path, help="JSON: the card's preprocessing keys")
    ap.add_argument("--outputs", choices=("logits", "probabilities"), default="logits",
                    help="what the graph's output holds (default logits)")
    ap.add_argument("--output", default=None, help="the output with the class scores, when the graph has several")
    ap.add_argument("--accuracy-folder", type=Path, default=None, help="labelled images DIR/<class>/<image>")
    ap.add_argument("--calibration-folder", type=Path, default=None,
                    help="training-like labelled images for INT8 calibration (never the accuracy folder's)")
    ap.add_argument("--max-mib", type=float, default=MAX_MIB, help=f"bound on the file and its external data "
                                                                   f"(default {MAX_MIB})")
    ap.add_argument("--golden-images", type=int, default=256, help="images in the golden set (default 256)")
    ap.add_argument("--max-nodes", type=int, default=MAX_NODES, help=f"bound on the graph's nodes (default {MAX_NODES})")
    args = ap.parse_args(argv)
    if args.golden_images < 3:
        ap.error("--golden-images must be at least 3")
    if args.accuracy_folder and args.calibration_folder and \
            args.accuracy_folder.resolve() == args.calibration_folder.resolve():
        print("error: the calibration folder must not be the accuracy folder (INT8 would be tuned on what "
              "measures it)", file=sys.stderr)
        return 2
    try:
        tag = import_model(args.model, args.name, args.classes, args.preprocessing, outputs=args.outputs,
                           output=args.output, accuracy_folder=args.accuracy_folder,
                           calibration_folder=args.calibration_folder, max_mib=args.max_mib, max_nodes=args.max_nodes,
                           n_golden=args.golden_images)
    except ImportRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
