"""The stages of run_all.py. Each reads its inputs from, and writes its outputs to, one run folder:

  train     trained.pth, trained.json, history.json, learning_curves.png (checkpoint.pt while running)
  evaluate  metrics.json, confusion.png, per-class accuracy in the log
  export    export/model.pth, model.onnx, model.sim.onnx, parity.json and the served accuracy
  publish   the BentoML model (all of export/ plus card.json), published.json

so a stage can run alone on an earlier run folder (run_all.py --only export --run-dir runs/...).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models import count_parameters, create_model, with_tta
from models.tta import passes
from serving.card import CARD_SCHEMA
from serving.preprocess import Preprocessing
from training import data as D
from training.engine import CheckpointError, train, write_json_atomic
from training.optim import ConfigError
from training.presets import Preset

STAGES = ("train", "evaluate", "export", "publish")


@dataclass
class Run:
    """Where a run lives and what it was asked to do."""

    dir: Path
    preset: Preset
    data_root: Path
    download: bool = False
    progress: bool = True

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        with open(self.dir / "run.log", "a") as f:
            f.write(msg + "\n")

    def path(self, name: str) -> Path:
        return self.dir / name

    def read_json(self, name: str) -> dict:
        p = self.path(name)
        if not p.exists():
            raise CheckpointError(f"{p} is missing: run the stage that makes it first "
                                  f"(or point --run-dir at a run that has it)")
        return json.loads(p.read_text())

    def write_json(self, name: str, obj) -> Path:
        p = self.path(name)
        write_json_atomic(p, obj)  # a kill mid-write never leaves half a file
        return p

    def stages_done(self) -> list[str]:
        p = self.path("stages.json")
        return json.loads(p.read_text()) if p.exists() else []

    def mark_done(self, stage: str) -> None:
        done = self.stages_done()
        if stage not in done:
            self.write_json("stages.json", done + [stage])


# ---------------------------------------------------------------- data


def load_splits(run: Run) -> tuple[D.ArrayDataset, D.ArrayDataset | None, D.ArrayDataset]:
    p = run.preset
    seed = p.train.seed
    train_all = D.load_dataset(p.dataset, "train", run.data_root, image_size=p.image_size,
                               download=run.download, progress=run.progress)
    test = D.load_dataset(p.dataset, "test", run.data_root, image_size=p.image_size,
                          download=run.download, progress=run.progress)
    train_set, val_set = D.train_val_split(D.shuffled(train_all, seed), p.val_size, seed)
    if p.train_limit:
        train_set = train_set.subset(slice(0, p.train_limit))
    if p.test_limit:
        test = D.shuffled(test, seed + 1).subset(slice(0, p.test_limit))
    return train_set, val_set, test


def make_spec(train_set: D.ArrayDataset, p: Preset) -> Preprocessing:
    mean, std = train_set.mean_std()
    return Preprocessing(size=train_set.size, channels=train_set.channels,
                         mean=tuple(round(m, 4) for m in mean), std=tuple(round(s, 4) for s in std))


def build_model(meta: dict) -> torch.nn.Module:
    return create_model(meta["architecture"]["name"], **meta["architecture"]["kwargs"])


def load_trained(run: Run) -> tuple[torch.nn.Module, dict]:
    meta = run.read_json("trained.json")
    net = build_model(meta)
    path = run.path("trained.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: run the train stage first") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {meta['architecture']['name']}: "
                              f"{str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable state_dict: {type(e).__name__}: {e}") from None
    return net.eval(), meta


# ---------------------------------------------------------------- stages


def stage_train(run: Run) -> None:
    from training.evaluate import plot_learning_curves

    p = run.preset
    train_set, val_set, test = load_splits(run)
    spec = make_spec(train_set, p)
    if p.model_kwargs.get("num_classes", len(train_set.classes)) != len(train_set.classes):
        raise ValueError(f"the model is asked for {p.model_kwargs['num_classes']} classes but "
                         f"{p.dataset} has {len(train_set.classes)}")
    kwargs = dict(p.model_kwargs, num_classes=len(train_set.classes), in_channels=train_set.channels)
    kwargs.setdefault("image_size", train_set.size[0])
    try:
        net = create_model(p.model, **kwargs)
    except TypeError as e:  # an argument the architecture does not take
        raise ConfigError(str(e)) from None
    run.log(f"data: {p.dataset} from {run.data_root}: {len(train_set)} train, "
            f"{len(val_set) if val_set else 0} validation, {len(test)} test images, "
            f"{len(train_set.classes)} classes")
    run.log(f"model: {p.model} {kwargs}: {count_parameters(net):,} parameters")
    eval_sets = {"val": val_set} if val_set is not None else {}
    eval_sets["test"] = test
    result = train(net, train_set, spec, p.train, eval_sets=eval_sets, run_dir=run.dir,
                   progress=run.progress, log=run.log,
                   context={"dataset": p.dataset, "model": p.model, "kwargs": kwargs, "val_size": p.val_size})
    torch.save({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
               run.path("trained.pth"))
    run.write_json("trained.json", {
        "architecture": {"name": p.model, "kwargs": kwargs},
        "tta_level": p.train.tta_level,
        "classes": train_set.classes,
        "preprocessing": spec.to_dict(),
        "dataset": {"name": p.dataset, "root": str(run.data_root), "train_images": len(train_set),
                    "val_images": len(val_set) if val_set else 0, "test_images": len(test)},
        "training": {"preset": p.name, "config": asdict(p.train), "epochs": len(result.history),
                     "train_seconds": round(result.train_seconds, 2),
                     "wall_seconds": round(result.wall_seconds, 2),
                     "images_per_second": round(result.images_per_second, 1),
                     "device": result.device, "precision": result.precision,
                     "resumed_from_epoch": result.resumed_from_epoch},
        "history": result.history,
    })
    plot_learning_curves(result.history, run.path("learning_curves.png"), f"{p.model} on {p.dataset}")
    run.path("checkpoint.pt").unlink(missing_ok=True)
    run.log(f"trained in {result.train_seconds:.1f} s ({result.images_per_second:.0f} images/s, "
            f"{result.precision} on {result.device})")


def stage_evaluate(run: Run) -> None:
    from training.evaluate import (classification_metrics, per_class_lines, plot_confusion,
                                   predict_torch)

    net, meta = load_trained(run)
    spec = Preprocessing.from_dict(meta["preprocessing"])
    *_, test = load_splits(run)
    _check_classes(meta, test)
    out = {}
    for level in sorted({0, meta["tta_level"]}):
        t0 = time.perf_counter()
        logits = predict_torch(with_tta(net, level), test, spec, precision="fp32")
        m = classification_metrics(test.labels.numpy(), logits.argmax(1), test.classes)
        m["seconds"] = round(time.perf_counter() - t0, 2)
        out[f"tta{level}"] = m
        run.log(f"test accuracy (torch fp32, TTA level {level}): {100 * m['accuracy']:.2f}% "
                f"macro-F1 {m['macro_f1']:.4f} ({m['seconds']:.1f} s)")
    final = out[f"tta{meta['tta_level']}"]
    for line in per_class_lines(final):
        run.log(line)
    run.write_json("metrics.json", out)
    plot_confusion(final, test.classes, run.path("confusion.png"),
                   f"{meta['architecture']['name']}: test accuracy {100 * final['accuracy']:.2f}%")


def stage_export(run: Run) -> None:
    from serving.backends import OnnxBackend
    from training.evaluate import classification_metrics, predict_backend
    from training.export import export_verified

    net, meta = load_trained(run)
    spec = Preprocessing.from_dict(meta["preprocessing"])
    train_set, _, test = load_splits(run)
    _check_classes(meta, test)
    # the parity batch: real test images, never seen in training
    held_out = D.shuffled(test, 1234).subset(slice(0, run.preset.parity_images))
    batch = D.to_float(held_out.images, spec).numpy()
    out_dir = run.path("export")
    result = export_verified(net, meta["tta_level"], batch, out_dir)
    for name, par in result["parity"].items():
        run.log(f"parity {name}: max |logit diff| {par['max_abs_diff']:.2e} (atol {par['atol']:g}), "
                f"top-1 agreement {100 * par['top1_agreement']:.1f}% on {par['images']} images")
    # the accuracy as served: the simplified ONNX through the card's preprocessing
    t0 = time.perf_counter()
    fp32 = OnnxBackend(out_dir / "model.sim.onnx")
    logits = predict_backend(fp32, test, spec)
    served = classification_metrics(test.labels.numpy(), logits.argmax(1), test.classes)
    served["seconds"] = round(time.perf_counter() - t0, 2)
    run.log(f"test accuracy as served (model.sim.onnx, onnxruntime): {100 * served['accuracy']:.2f}%")
    record = {"parity": result["parity"], "served": served}
    if run.preset.calibration_images:
        record["int8"] = _export_int8(run, out_dir, spec, train_set, test, batch, fp32, logits)
    run.write_json("export/parity.json", record)


def _export_int8(run: Run, out_dir: Path, spec: Preprocessing, train_set: D.ArrayDataset, test: D.ArrayDataset,
                 parity_batch: np.ndarray, fp32, fp32_logits: np.ndarray) -> dict:
    """INT8 model calibrated on training images; published if it loses at most the preset's int8_max_drop."""
    from serving.backends import OnnxBackend
    from training.evaluate import classification_metrics, predict_backend
    from training.quantize import quantize_int8

    calib = D.to_float(D.shuffled(train_set, 99).images[:run.preset.calibration_images], spec).numpy()
    t0 = time.perf_counter()
    path = quantize_int8(out_dir / "model.sim.onnx", calib, out_dir / "model.int8.onnx")
    seconds = time.perf_counter() - t0
    int8 = OnnxBackend(path)
    logits = predict_backend(int8, test, spec)
    m = classification_metrics(test.labels.numpy(), logits.argmax(1), test.classes)
    fp32_acc = float((fp32_logits.argmax(1) == test.labels.numpy()).mean())
    ref = fp32.predict(parity_batch)
    got = int8.predict(parity_batch)
    drop = fp32_acc - m["accuracy"]
    rec = {"accuracy": m["accuracy"], "fp32_accuracy": fp32_acc, "drop": drop,
           "per_class_accuracy": m["per_class_accuracy"], "macro_f1": m["macro_f1"],
           "top1_disagreements_vs_fp32": int((logits.argmax(1) != fp32_logits.argmax(1)).sum()),
           "test_images": m["images"], "calibration_images": len(calib), "calibration": "training images, MinMax",
           "parity_batch": {"max_abs_diff": float(np.abs(got - ref).max()),
                            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                            "images": len(parity_batch)},
           "quantize_seconds": round(seconds, 1), "bytes": path.stat().st_size,
           "accepted": drop <= run.preset.int8_max_drop}
    run.log(f"INT8 (static, per-channel, {len(calib)} training images): test accuracy "
            f"{100 * m['accuracy']:.2f}% vs {100 * fp32_acc:.2f}% fp32 ({100 * drop:+.2f} points lost), "
            f"{rec['top1_disagreements_vs_fp32']} top-1 changes"
            + ("" if rec["accepted"] else
               f"; NOT published: more than {100 * run.preset.int8_max_drop:.1f} points lost"))
    return rec


def stage_publish(run: Run) -> str:
    from training.store import publish

    meta = run.read_json("trained.json")
    exported = run.read_json("export/parity.json")
    metrics = run.read_json("metrics.json") if run.path("metrics.json").exists() else {}
    card = make_card(run, meta, exported, metrics)
    files = {name: run.path(f"export/{name}") for name in ("model.pth", "model.onnx", "model.sim.onnx")}
    if exported.get("int8", {}).get("accepted"):
        files["model.int8.onnx"] = run.path("export/model.int8.onnx")
    tag = publish(run.preset.model_name_in_store, files, card,
                  labels={"preset": run.preset.name, "dataset": meta["dataset"]["name"],
                          "architecture": meta["architecture"]["name"]})
    run.write_json("published.json", {"tag": tag})
    run.log(f"published {tag} to the BentoML model store ({_store_dir()})")
    return tag


def _store_dir() -> str:
    from training.store import models_dir

    return str(models_dir())


def _check_classes(meta: dict, test: D.ArrayDataset) -> None:
    if list(meta["classes"]) != list(test.classes):
        raise ValueError(f"the trained model knows {len(meta['classes'])} classes, the test data has "
                         f"{len(test.classes)}: {meta['classes']} vs {test.classes}")


# ---------------------------------------------------------------- the card


def count_flops(net: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2 FLOPs), without TTA."""
    from torch.utils.flop_counter import FlopCounterMode

    net = net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros((1, *input_shape)))
    return int(counter.get_total_flops())


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxsim
    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxsim": onnxsim.__version__,
            "numpy": np.__version__}


def make_card(run: Run, meta: dict, exported: dict, metrics: dict) -> dict:
    net = build_model(meta)
    pre = meta["preprocessing"]
    shape = (pre["channels"], *pre["size"])
    flops = count_flops(net, shape)
    served = exported["served"]
    card_metrics = {"test_accuracy": served["accuracy"], "test_macro_f1": served["macro_f1"],
                    "per_class_accuracy": served["per_class_accuracy"],
                    "confusion_matrix": served["confusion_matrix"], "test_images": served["images"],
                    "measured_with": "model.sim.onnx in onnxruntime, card preprocessing"}
    if metrics:
        card_metrics["torch_test_accuracy"] = {k: v["accuracy"] for k, v in metrics.items()}
    return {
        "schema": CARD_SCHEMA,
        "name": run.preset.model_name_in_store,
        "architecture": meta["architecture"],
        "tta_level": meta["tta_level"],
        "classes": meta["classes"],
        "preprocessing": pre,
        "dataset": meta["dataset"],
        "metrics": card_metrics,
        "training": {k: v for k, v in meta["training"].items()},
        "parameters": count_parameters(net),
        "flops_per_image": flops,
        "flops_per_image_with_tta": flops * passes(meta["tta_level"]),
        "parity": exported["parity"],
        "int8": exported.get("int8"),
        "backends": {"torch": "model.pth", "onnx": "model.sim.onnx",
                     **({"onnx_int8": "model.int8.onnx"} if exported.get("int8", {}).get("accepted") else {})},
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run.dir),
    }

