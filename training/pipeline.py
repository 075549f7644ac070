"""The stages of run_all.py. Each reads its inputs from, and writes its outputs to, one run folder
(lab/runfiles.py lists the files), so a stage can run alone on an earlier run folder
(run_all.py --only export --run-dir runs/...):

  train     trained.pth, trained.json, history.json, learning_curves.png (checkpoint.pt while running)
  evaluate  metrics.json, confusion.png, per-class accuracy in the log
  students  students/<name>/ (weights.pth, history.json) and students.json: cheaper networks distilled from
            the trained one (training/compress/students.py), exported beside it as model-level rungs
  export    export/model.pth, model.onnx, model.sim.onnx (+ each export hook's file), export/export.json
  publish   the BentoML model (the exported files plus card.json), published.json
"""
from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lab.card import Architecture, Card
from lab.preprocess import Preprocessing
from lab.runfiles import (EvalRecord, ExportRecord, MissingArtifact, PublishedRecord, RunFiles, TrainedRecord,
                          write_json_atomic)
from models import count_parameters, create_model, with_tta
from models.tta import passes
from training import data as D
from training.checkpoint import CheckpointError, save_atomic
from training.checkpoint import write_atomic as _write_atomic
from training.engine import train
from training.optim import ConfigError
from training.presets import Preset

STAGES = ("train", "evaluate", "students", "export", "publish")


@dataclass
class Run:
    """Where a run lives and what it was asked to do."""

    dir: Path
    preset: Preset
    data_root: Path
    download: bool = False
    progress: bool = True
    rank: int = 0                    # under torchrun: this process's rank; only rank 0 logs and writes
    world_size: int = 1

    def log(self, msg: str = "") -> None:
        if self.rank:
            return
        print(msg, flush=True)
        with open(self.dir / "run.log", "a") as f:
            f.write(msg + "\n")

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def stages_done(self) -> list[str]:
        import json

        p = self.path("stages.json")
        return json.loads(p.read_text()) if p.exists() else []

    def mark_done(self, stage: str) -> None:
        done = self.stages_done()
        if stage not in done:
            write_json_atomic(self.path("stages.json"), done + [stage])


# ---------------------------------------------------------------- data


def load_splits(run: Run) -> tuple[D.ArrayDataset, D.ArrayDataset | None, D.ArrayDataset]:
    """The training, validation and test splits: a function of the data and `data_seed` only, never of
    the training seed, so runs with different seeds see the same images."""
    p = run.preset
    train_all = D.load_dataset(p.dataset, "train", run.data_root, image_size=p.image_size,
                               download=run.download, progress=run.progress)
    test = D.load_dataset(p.dataset, "test", run.data_root, image_size=p.image_size,
                          download=run.download, progress=run.progress)
    train_set, val_set = D.train_val_split(D.shuffled(train_all, p.data_seed), p.val_size, p.data_seed)
    if p.train_limit:
        train_set = train_set.subset(slice(0, p.train_limit))
    if p.test_limit:
        test = D.shuffled(test, p.data_seed + 1).subset(slice(0, p.test_limit))
    return train_set, val_set, test


def make_spec(train_set: D.ArrayDataset) -> Preprocessing:
    mean, std = train_set.mean_std()
    return Preprocessing(size=train_set.size, channels=train_set.channels,
                         mean=tuple(round(m, 4) for m in mean), std=tuple(round(s, 4) for s in std))


def build_model(arch: dict) -> torch.nn.Module:
    return create_model(arch["name"], **arch["kwargs"])


def load_trained(run: Run) -> tuple[torch.nn.Module, TrainedRecord]:
    meta = run.files.trained()
    net = build_model(meta.architecture)
    path = run.path("trained.pth")
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: run the train stage first") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {meta.architecture['name']}: "
                              f"{str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable state_dict: {type(e).__name__}: {e}") from None
    return net.eval(), meta


# ---------------------------------------------------------------- stages


def stage_train(run: Run) -> None:
    """Train on this process, or with the others of a torchrun group (training/distributed.py): then every
    process trains on its slice of each batch, and only the main one (rank 0) writes the run folder."""
    from training import distributed as dist
    from training.evaluate import plot_learning_curves

    p, cfg = run.preset, run.preset.config()
    world = dist.current()
    with main_rank_first(world):  # one process decodes the data into the cache, the others read it
        train_set, val_set, test = load_splits(run)
    spec = make_spec(train_set)
    if p.model_kwargs.get("num_classes", len(train_set.classes)) != len(train_set.classes):
        raise ValueError(f"the model is asked for {p.model_kwargs['num_classes']} classes but "
                         f"{p.dataset} has {len(train_set.classes)}")
    kwargs = dict(p.model_kwargs, num_classes=len(train_set.classes), in_channels=train_set.channels)
    kwargs.setdefault("image_size", train_set.size[0])
    try:
        net = create_model(p.model, seed=cfg.seed, **kwargs)
    except TypeError as e:  # an argument the architecture does not take
        raise ConfigError(str(e)) from None
    except ValueError as e:  # a knob out of range, an input size it cannot take
        raise ConfigError(f"model {p.model!r} cannot be built for {p.dataset} with {kwargs}: {e}") from None
    run.log(f"data: {p.dataset} from {run.data_root}: {len(train_set)} train, "
            f"{len(val_set) if val_set else 0} validation, {len(test)} test images, "
            f"{len(train_set.classes)} classes (data seed {p.data_seed})")
    run.log(f"model: {p.model} {kwargs}: {count_parameters(net):,} parameters (seed {cfg.seed})")
    run.log(f"recipe: {cfg.recipe}: optimizer {cfg.optimizer}, lr {cfg.lr:g}, batch {cfg.batch_size}, "
            f"{cfg.epochs:g} epochs")
    eval_sets = {"val": val_set} if val_set is not None else {}
    eval_sets["test"] = test
    result = train(net, train_set, spec, cfg, eval_sets=eval_sets, run_dir=run.dir,
                   progress=run.progress and world.main, log=run.log,
                   context={"dataset": p.dataset, "model": p.model, "kwargs": kwargs, "val_size": p.val_size,
                            "data_seed": p.data_seed})
    _debug_state_hash(result.model, world.rank)
    if not world.main:
        return
    save_atomic({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
                run.path("trained.pth"))
    run.files.write(TrainedRecord(
        architecture={"name": p.model, "kwargs": kwargs},
        tta_level=cfg.tta_level,
        classes=train_set.classes,
        preprocessing=spec.to_dict(),
        dataset={"name": p.dataset, "root": str(run.data_root), "train_images": len(train_set),
                 "val_images": len(val_set) if val_set else 0, "test_images": len(test),
                 "data_seed": p.data_seed},
        training={"preset": p.name, "recipe": cfg.recipe, "config": asdict(cfg), "epochs": len(result.history),
                  "train_seconds": round(result.train_seconds, 2), "wall_seconds": round(result.wall_seconds, 2),
                  "images_per_second": round(result.images_per_second, 1), "device": result.device,
                  "precision": result.precision, "resumed_from_epoch": result.resumed_from_epoch,
                  "world_size": result.world_size, "batch_per_process": cfg.batch_size // result.world_size},
        history=result.history))
    _write_atomic(run.path("learning_curves.png"),
                  lambda tmp: plot_learning_curves(result.history, tmp, f"{p.model} on {p.dataset}"))
    run.path("checkpoint.pt").unlink(missing_ok=True)
    run.log(f"trained in {result.train_seconds:.1f} s ({result.images_per_second:.0f} images/s, "
            f"{result.precision} on {result.device})")


@contextmanager
def main_rank_first(world):
    """The body runs on the main rank first, then on the others (a no-op in a single process)."""
    from training import distributed as dist

    if world.distributed and not world.main:
        dist.barrier()
    yield
    if world.distributed and world.main:
        dist.barrier()


def _debug_state_hash(model: torch.nn.Module, rank: int) -> None:
    """LAB_DEBUG_STATE_HASH_DIR=DIR: each process writes DIR/rank<r>.sha256, the hash of its trained
    state_dict (the test that every rank of a data-parallel run ends with the same weights)."""
    import hashlib

    folder = os.environ.get("LAB_DEBUG_STATE_HASH_DIR")
    if not folder:
        return
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{rank}.sha256").write_text(h.hexdigest())


def stage_evaluate(run: Run) -> None:
    from training.evaluate import classification_metrics, per_class_lines, plot_confusion, predict_torch

    from training.engine import has_conv, pick_device, synchronize
    from training.evaluate import eval_precision

    net, meta = load_trained(run)
    spec = Preprocessing.from_dict(meta.preprocessing)
    *_, test = load_splits(run)
    _check_classes(meta, test)
    # on the training device (the GPU when there is one), in bf16 there, batched large
    device = pick_device()
    precision = eval_precision(device)
    net = net.to(device)
    if has_conv(net):
        net = net.to(memory_format=torch.channels_last)
    where = f"torch {precision}" + (f" on {device.type}" if device.type != "cpu" else "")
    out = {}
    for level in sorted({0, meta.tta_level}):
        t0 = time.perf_counter()
        logits = predict_torch(with_tta(net, level), test, spec, precision=precision, device=device)
        synchronize(device)
        m = classification_metrics(test.labels.numpy(), logits.argmax(1), test.classes)
        m["seconds"] = round(time.perf_counter() - t0, 2)
        m["precision"], m["device"] = precision, device.type
        out[f"tta{level}"] = m
        run.log(f"test accuracy ({where}, TTA level {level}): {100 * m['accuracy']:.2f}% "
                f"macro-F1 {m['macro_f1']:.4f} ({m['seconds']:.1f} s)")
    record = EvalRecord(out)
    for line in per_class_lines(record.final(meta.tta_level)):
        run.log(line)
    run.files.write(record)
    plot_confusion(record.final(meta.tta_level), test.classes, run.path("confusion.png"),
                   f"{meta.architecture['name']}: test accuracy {100 * record.final(meta.tta_level)['accuracy']:.2f}%")


def stage_export(run: Run) -> None:
    import training.export_hooks  # noqa: F401  (registers the hooks)
    from lab.backends.onnx import OnnxBackend
    from training.evaluate import classification_metrics, predict_backend
    from training.export import EXPORT_HOOKS, ExportContext, export_verified

    net, meta = load_trained(run)
    spec = Preprocessing.from_dict(meta.preprocessing)
    train_set, _, test = load_splits(run)
    _check_classes(meta, test)
    run.path(ExportRecord.FILE).unlink(missing_ok=True)  # a failed export must not leave the last record
    # the parity batch: real test images, never seen in training
    held_out = D.shuffled(test, 1234).subset(slice(0, run.preset.parity_images))
    batch = D.to_float(held_out.images, spec).numpy()
    out_dir = run.path("export")
    result = export_verified(net, meta.tta_level, batch, out_dir)
    for name, par in result["parity"].items():
        run.log(f"parity {name}: max |logit diff| {par['max_abs_diff']:.2e} (atol {par['atol']:g}), "
                f"top-1 agreement {100 * par['top1_agreement']:.1f}% on {par['images']} images")
    # the accuracy as served: the simplified ONNX through the card's preprocessing
    t0 = time.perf_counter()
    fp32 = OnnxBackend(out_dir / OnnxBackend.file)
    logits = predict_backend(fp32, test, spec)
    served = classification_metrics(test.labels.numpy(), logits.argmax(1), test.classes)
    served["seconds"] = round(time.perf_counter() - t0, 2)
    run.log(f"test accuracy as served (model.sim.onnx, onnxruntime): {100 * served['accuracy']:.2f}%")
    files = list(result["files"])
    ctx = ExportContext(net=net, tta_level=meta.tta_level, out_dir=out_dir, spec=spec, train_set=train_set,
                        test=test, parity_batch=batch, fp32=fp32, fp32_logits=logits, log=run.log,
                        settings={"calibration_images": run.preset.calibration_images,
                                  "int8_max_drop": run.preset.int8_max_drop, "int8_recipes": run.preset.int8_recipes,
                                  "ladder_skip": run.preset.ladder_skip, "run_dir": run.dir,
                                  "students": trained_students(run), "train_config": run.preset.config(),
                                  "qat_above_drop": run.preset.qat_above_drop,
                                  "qat_epochs": run.preset.qat_epochs})
    ctx.files, ctx.architecture = files, meta.architecture
    hooks = {}
    for name, hook in EXPORT_HOOKS.items():
        made, hooks[name] = hook(ctx)
        ctx.previous[name] = hooks[name]
        files.extend([made] if isinstance(made, str) else made or [])
    run.files.write(ExportRecord(parity=result["parity"], served=served, files=files, hooks=hooks))


def stage_students(run: Run) -> None:
    from training.compress.students import stage_students as train_students

    train_students(run)


def trained_students(run: Run) -> dict:
    """The records of the preset's students trained for this run's model (students.json), in the preset's
    order; a student trained for an earlier model of the folder is left out."""
    import json

    from training.compress.teacher import sha256_file

    path = run.path("students.json")
    if not path.exists() or not run.preset.students:
        return {}
    records, weights = json.loads(path.read_text()), sha256_file(run.path("trained.pth"))
    return {n: records[n] for n in run.preset.students
            if n in records and records[n]["teacher"]["weights_sha256"] == weights}


def stage_publish(run: Run) -> str:
    from lab.store import models_dir, publish

    meta, exported = run.files.trained(), run.files.export()
    card = make_card(run, meta, exported, run.files.metrics())
    files = {name: run.path(f"export/{name}") for name in exported.files}
    missing = [n for n, p in files.items() if not p.is_file()]
    if missing:
        raise MissingArtifact(f"export/{', export/'.join(missing)} missing: rerun the export stage")
    tag = publish(run.preset.model_name_in_store, files, card,
                  labels={"preset": run.preset.name, "dataset": meta.dataset["name"],
                          "architecture": meta.architecture["name"]})
    run.files.write(PublishedRecord(tag))
    run.log(f"published {tag} to the BentoML model store ({models_dir()})")
    return tag


def _check_classes(meta: TrainedRecord, test: D.ArrayDataset) -> None:
    if list(meta.classes) != list(test.classes):
        raise ValueError(f"the trained model knows {len(meta.classes)} classes, the test data has "
                         f"{len(test.classes)}: {meta.classes} vs {test.classes}")


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
    import torchvision

    out = {"python": platform.python_version(), "torch": str(torch.__version__),
           "torchvision": str(torchvision.__version__), "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import onnxsim

        out["onnxsim"] = onnxsim.__version__
    except ImportError:
        pass
    return out


def make_card(run: Run, meta: TrainedRecord, exported: ExportRecord, metrics: EvalRecord | None) -> Card:
    net = build_model(meta.architecture)
    pre = Preprocessing.from_dict(meta.preprocessing)
    flops = count_flops(net, (pre.channels, *pre.size))
    served = exported.served
    card_metrics = {"test_accuracy": served["accuracy"], "test_macro_f1": served["macro_f1"],
                    "per_class_accuracy": served["per_class_accuracy"],
                    "confusion_matrix": served["confusion_matrix"], "test_images": served["images"],
                    "measured_with": "model.sim.onnx in onnxruntime, card preprocessing"}
    if metrics:
        card_metrics["torch_test_accuracy"] = {k: v["accuracy"] for k, v in metrics.levels.items()}
    return Card(
        name=run.preset.model_name_in_store,
        architecture=Architecture(meta.architecture["name"], meta.architecture["kwargs"]),
        classes=list(meta.classes), preprocessing=pre, tta_level=meta.tta_level,
        backends={},  # filled in by lab.store.publish from the files it publishes
        metrics=card_metrics, dataset=meta.dataset, training=meta.training,
        parameters=count_parameters(net), flops_per_image=flops,
        flops_per_image_with_tta=flops * passes(meta.tta_level), parity=exported.parity,
        int8=exported.hooks.get("int8"), rungs=(exported.hooks.get("ladder") or {}).get("rungs"),
        best_rung=(exported.hooks.get("ladder") or {}).get("best"), golden=exported.hooks.get("golden"),
        versions=versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), run_dir=str(run.dir))
