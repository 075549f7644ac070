"""Students: networks cheaper than the served one, trained to reproduce it, each a model-level rung.

The served network runs the card's test-time augmentation (6 views per image for the default model); a
student runs one view, so it costs at most a sixth of the work before it is made any narrower. Each
learns from the teacher's cached six-view outputs on the training images (training/compress/teacher.py)
plus the labels (training.engine.distillation_loss):

    distilled  the served architecture, one view: the TTA distilled into the network
    narrow80   every layer at 0.8 of the served widths (about 1.6x fewer MACs than one view), distilled
    narrow60   every layer at 0.6 of the served widths (about 2.8x fewer MACs), distilled
    finetuned  the served network itself, starting from its trained weights, fine-tuned with one view on
               its own six-view outputs at a tenth of the recipe's learning rates for a fifth of its
               epochs: the TTA distilled into the weights that already hold most of it
    pruned     the trained served network pruned to half its one-view MACs (torch-pruning, DepGraph),
               then a short distillation fine-tune (training/compress/prune.py)

The students stage (run_all.py) trains the preset's students into <run>/students/ (a folder per student
with its weights, history and checkpoint; students.json lists them); the export hook `students` turns
each into an ONNX graph and its INT8 graph, verified like the served one, and the ladder measures them
beside the runtime rungs. Distillation settings are fixed from the literature (Hinton et al. 2015: a soft
target weight near 1 and a temperature of a few units), not tuned here; each student trains with the
served model's recipe (its learning rate was chosen for this architecture), one view, no TTA.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lab.backends.students import STUDENTS as RUNGS

DISTILL_WEIGHT = 0.8        # share of the loss from the teacher's outputs (the rest: the labels)
DISTILL_TEMPERATURE = 2.0   # softens both distributions; the loss is scaled by T^2


@dataclass(frozen=True)
class Student:
    name: str
    method: str               # distillation | pruning
    width: float = 1.0        # distillation: each layer's channels as a share of the served network's
    macs: float = 0.0         # pruning: the MAC budget as a share of the served network's one view
    epochs: float = 1.0       # training epochs as a share of the served model's recipe
    init: str = "scratch"     # scratch: new weights (the recipe's seed) | served: the trained served weights
    lr_scale: float = 1.0     # every learning rate of the recipe times this (a fine-tune takes a fraction)
    description: str = ""


# what each student is (its method and description) is the backend registry's (lab/backends/students.py);
# here, how it is trained
_TRAINING = {
    "distilled": dict(width=1.0),
    "narrow80": dict(width=0.8),
    "narrow60": dict(width=0.6),
    "pruned": dict(macs=0.5, epochs=0.3),
    # a tenth of the LRs is the usual fine-tuning convention, not tuned here: the served model trains on
    # every training image, so no image the teacher has not seen is left to choose it on
    "finetuned": dict(init="served", epochs=0.2, lr_scale=0.1),
}
STUDENTS: dict[str, Student] = {name: Student(name, RUNGS[name][0], description=RUNGS[name][1], **kw)
                                for name, kw in _TRAINING.items()}


class StudentError(ValueError):
    """A student that cannot be made for this model: one line."""


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


# how a narrower network of an architecture is built: its kwargs at a width factor
NARROW = {
    "airbench": lambda kw, f: {**kw, "widths": [_round8(w * f) for w in kw.get("widths", (64, 256, 256))]},
}


def student_architecture(student: Student, arch: dict) -> dict:
    """The registry architecture ({"name", "kwargs"}) of a distilled student of `arch`."""
    if student.width == 1.0:
        return {"name": arch["name"], "kwargs": dict(arch["kwargs"])}
    if arch["name"] not in NARROW:
        raise StudentError(f"no narrower {arch['name']} is defined (students narrow: {', '.join(NARROW)})")
    return {"name": arch["name"], "kwargs": NARROW[arch["name"]](dict(arch["kwargs"]), student.width)}


def scaled_lrs(cfg, factor: float) -> dict:
    """The recipe's learning rates (the shared one and each role's own) times `factor`, as TrainConfig fields."""
    out = {"lr": cfg.lr * factor}
    for role in ("head_lr", "bias_lr"):
        if getattr(cfg, role) is not None:
            out[role] = getattr(cfg, role) * factor
    return out


def get_students(names) -> list[Student]:
    unknown = [n for n in names if n not in STUDENTS]
    if unknown:
        raise StudentError(f"unknown student(s) {', '.join(unknown)}; valid: {', '.join(STUDENTS)}")
    return [STUDENTS[n] for n in names]


def predict_seconds(students: list[Student], teacher_macs: int, student_macs: dict[str, int], images: int,
                    epochs: float, train_images_per_s: float, tta_views: int, cached: bool,
                    teacher_images_per_s: float = 0.0) -> dict[str, float]:
    """A prediction of each part's time from the served model's measured training speed, scaled by MACs
    (training a network costs about 3 forward passes). The teacher's pass (every view, in fp32) is timed
    from `teacher_images_per_s`, the evaluate stage's measured speed at the served TTA level, when given:
    training may run in bf16 where the teacher's fp32 pass does not, so the training speed alone puts
    it at half its time on such a CPU. Small networks run below their MAC share on a CPU, so this is a
    lower bound for narrow students."""
    teacher_s = images / teacher_images_per_s if teacher_images_per_s else images * tta_views / (3 * train_images_per_s)
    out = {"teacher outputs": 0.0 if cached else teacher_s}
    for s in students:
        share = student_macs[s.name] / teacher_macs
        out[s.name] = math.ceil(epochs * s.epochs) * images / (train_images_per_s / max(share, 1e-3))
    return out


def evaluated_images_per_s(run, tta_level: int) -> float:
    """The evaluate stage's measured speed of the trained model at this TTA level (images/s), 0 if unknown."""
    metrics = run.files.metrics()
    m = (metrics.levels.get(f"tta{tta_level}") if metrics else None) or {}
    return m["images"] / m["seconds"] if m.get("images") and m.get("seconds") else 0.0


def stage_students(run) -> None:
    """Train the preset's students of the run's trained model into <run>/students/ (resumable)."""
    from lab.paths import default_cache_dir
    from lab.preprocess import Preprocessing
    from lab.runfiles import write_json_atomic
    from models import count_parameters, create_model
    from models.tta import passes
    from training.compress.prune import macs as count_macs
    from training.compress.prune import REBUILD, prune_to_macs
    from training.compress.teacher import sha256_file, teacher_logits
    from training.engine import evaluate_loss_acc, pick_device, train
    from training.data import BatchLoader
    from training.pipeline import load_splits, load_trained

    p = run.preset
    students = get_students(p.students)
    net, meta = load_trained(run)
    spec = Preprocessing.from_dict(meta.preprocessing)
    shape = (spec.channels, *spec.size)
    train_set, val_set, test = load_splits(run)
    arch = meta.architecture
    cfg = p.config()
    teacher_macs = count_macs(net, shape)
    # each student's architecture first: a bad one is refused before any training
    plans = {}
    for s in list(students):
        why = ("" if s.method != "pruning" or type(net) in REBUILD else f"only {', '.join(r.name for r in REBUILD.values())}"
               f" can be pruned and rebuilt") or ("" if s.width == 1.0 or arch["name"] in NARROW
                                                  else f"no narrower {arch['name']} is defined")
        if why:  # a student this architecture cannot have: the others are still made
            run.log(f"students: {s.name} skipped for {arch['name']}: {why}")
            students.remove(s)
            continue
        if s.method == "pruning":
            pruned = prune_to_macs(net, shape, int((p.prune_macs or s.macs) * teacher_macs), log=run.log)
            plans[s.name] = ({"name": arch["name"], "kwargs": pruned.kwargs}, pruned)
        else:
            plans[s.name] = (student_architecture(s, arch), None)
    if not students:
        run.log("students: none for this preset and model")
        return
    student_macs = {n: (pl[1].macs_after if pl[1] else count_macs(create_model(pl[0]["name"], **pl[0]["kwargs"]),
                                                                  shape)) for n, pl in plans.items()}
    out_dir = run.path("students")
    weights_sha = sha256_file(run.path("trained.pth"))
    cache_dir = default_cache_dir() / "teachers"
    speed = float(meta.training.get("images_per_second") or 0)
    if speed:
        from training.compress.teacher import cache_key, cache_path, data_digest

        cached = cache_path(cache_key(weights_sha, meta.tta_level, data_digest(train_set, spec)), cache_dir).is_file()
        pred = predict_seconds(students, teacher_macs, student_macs, len(train_set), cfg.epochs, speed,
                               passes(meta.tta_level), cached, evaluated_images_per_s(run, meta.tta_level))
        run.log(f"students: predicted {sum(pred.values()) / 60:.1f} min from the served model's training speed "
                f"({speed:.0f} images/s) scaled by MACs: "
                + ", ".join(f"{k} {v / 60:.1f} min" for k, v in pred.items()))
    t0 = time.perf_counter()
    teacher, key = teacher_logits(net, weights_sha, meta.tta_level, train_set, spec, cache_dir=cache_dir,
                                  progress=run.progress, log=run.log)
    teacher_seconds = time.perf_counter() - t0
    records_path = run.path("students.json")
    import json

    records = json.loads(records_path.read_text()) if records_path.exists() else {}
    device = pick_device()
    for s in students:
        folder = out_dir / s.name
        done = records.get(s.name)
        if done and done.get("teacher") == key and (folder / "weights.pth").is_file():
            run.log(f"students: {s.name} already trained ({100 * done['test_accuracy_1view']:.2f}%)")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        student_arch, pruned = plans[s.name]
        if pruned is not None:
            student = pruned.net
        elif s.init == "served":
            student = copy.deepcopy(net)  # its data-fitted layers are fitted again to the same images: unchanged
        else:
            student = create_model(student_arch["name"], seed=cfg.seed, **student_arch["kwargs"])
        scfg = replace(cfg, epochs=cfg.epochs * s.epochs, tta_level=0, distill_weight=DISTILL_WEIGHT,
                       distill_temperature=DISTILL_TEMPERATURE, **scaled_lrs(cfg, s.lr_scale))
        run.log(f"students: {s.name} ({s.description}): {student_macs[s.name] / 1e6:.1f} M MACs per image "
                f"(the served network: {teacher_macs / 1e6:.1f} M x {passes(meta.tta_level)} views), "
                f"{count_parameters(student):,} parameters, {scfg.epochs:g} epochs")
        eval_sets = {"val": val_set} if val_set is not None else {}
        result = train(student, train_set, spec, scfg, eval_sets={**eval_sets, "test": test}, run_dir=folder,
                       progress=run.progress, log=run.log, teacher=teacher,
                       context={"student": s.name, "architecture": student_arch, "teacher": key,
                                "pruned_from": weights_sha if pruned is not None else ""})
        from training.checkpoint import save_atomic

        save_atomic({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
                    folder / "weights.pth")
        loader = BatchLoader(test, spec, 1000, train=False)
        _, acc = evaluate_loss_acc(result.model, loader, device, "fp32")
        records[s.name] = {
            **asdict(s), "architecture": student_arch, "macs_per_image": student_macs[s.name],
            "parameters": count_parameters(result.model), "epochs": scfg.epochs, "train_images": len(train_set),
            "train_seconds": round(result.train_seconds, 3), "images_per_second": round(result.images_per_second, 1),
            "test_accuracy_1view": acc, "teacher": key, "teacher_seconds": round(teacher_seconds, 1),
            "distill_weight": DISTILL_WEIGHT, "distill_temperature": DISTILL_TEMPERATURE,
            "pruning": ({"macs_before": pruned.macs_before, "macs_after": pruned.macs_after,
                         "channels": pruned.channels, "importance": pruned.importance} if pruned else None),
            "history": result.history}
        write_json_atomic(records_path, records)
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        run.log(f"students: {s.name} trained in {result.train_seconds:.0f} s: test accuracy {100 * acc:.2f}% "
                f"with one view (torch fp32)")


def load_student(run_dir: Path, record: dict) -> torch.nn.Module:
    """A trained student of a run folder, from its record in students.json."""
    from models import create_model

    arch = record["architecture"]
    net = create_model(arch["name"], **arch["kwargs"])
    net.load_state_dict(torch.load(Path(run_dir) / "students" / record["name"] / "weights.pth",
                                   map_location="cpu", weights_only=True))
    return net.eval()
