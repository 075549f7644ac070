"""What every study stage shares: its presets, its data, one trained cell, statistics over seeds, plots,
and the report section it writes.

A cell is one training run: a registry model on a dataset with a seed, through the engine
(training/engine.py), measured the same way everywhere:
  val_acc, val_loss          on held-out training images after the last epoch (what settings are chosen on)
  test_acc, test_correct     on the study's test images, eval mode, after the last epoch; test_correct is
                             which images it got right (training/studies/stats.py: paired intervals)
  train_eval_acc             on as many training images as held-out ones, eval mode, after the last epoch:
                             the overfitting gap
  history                    per epoch: train loss/accuracy (as it trained), val loss/accuracy, seconds
  train_seconds              optimisation time (no evaluation)
  infer_ms_b1, infer_ms_b256 forward time per image at batch 1 and batch 256 (fp32, median of repeats)
  params, macro_f1, confusion, precision, threads
A cell trained to choose a setting (evaluate_on="val") never touches the test images.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models import count_parameters, create_model


@dataclass(frozen=True)
class StudyPreset:
    name: str
    seeds: tuple[int, ...]                 # every figure is over these (>= 3 that really differ)
    train_limit: dict[str, int]            # training images per dataset (0 = all)
    test_limit: int                        # test images (0 = all 10,000)
    epochs: dict[str, float]               # per stage (key "default" for the rest)
    batch_size: int = 128
    timing_reps: tuple[int, int] = (20, 3)  # forward repeats timed at batch 1 and at batch 256
    val_images: int = 2000                  # held out of training (LR sweeps, tuning); never the test set
    description: str = ""
    store_suffix: str = ""                  # after the names of the models a stage publishes ("-smoke")

    def epochs_for(self, stage: str) -> float:
        return self.epochs.get(stage, self.epochs["default"])


STUDY_PRESETS = {
    "smoke": StudyPreset("smoke", seeds=(0, 1, 2), train_limit={"cifar10": 64, "mnist": 64}, test_limit=32,
                         epochs={"default": 1}, batch_size=32, timing_reps=(1, 1), val_images=32,
                         description="seconds: 64 training and 32 test images per dataset, 1 epoch (for the tests)",
                         store_suffix="-smoke"),  # never a new version of a real study's model
    # 4 seeds: Welch's t at 3 seeds against 3 finds a 3.5-point difference with a 1-point seed spread about
    # 80 % of the time, at 4 against 4 about 97 % (tests/test_study_science.py); the 4th seed adds only
    # evaluation cells (the sweeps train on their own seeds), about 12 % of the stage's time
    "quick": StudyPreset("quick", seeds=(0, 1, 2, 3), train_limit={"cifar10": 8000, "mnist": 8000}, test_limit=0,
                         epochs={"default": 3},
                         description="this 2-core CPU: 8,000 training images per dataset (of 50,000 / 60,000), "
                                     "2,000 more held out, the whole test set (10,000 images), 3 epochs, 4 seeds; each "
                                     "variant's LR swept on the held-out images"),
    "full": StudyPreset("full", seeds=(0, 1, 2, 3, 4), train_limit={"cifar10": 0, "mnist": 0}, test_limit=0,
                        epochs={"default": 30}, batch_size=128, val_images=5000,
                        description="for a GPU: all training and test images, 30 epochs, 5 seeds"),
}


def get_study_preset(name: str) -> StudyPreset:
    try:
        return STUDY_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown study preset {name!r}; valid: {', '.join(STUDY_PRESETS)}") from None


# ---------------------------------------------------------------- the context of a stage


@dataclass
class StudyContext:
    """Where a stage reads data, keeps results and writes its section."""
    preset: StudyPreset
    data_root: Path
    out_dir: Path                          # the study report folder
    storage: str                           # the results database URL
    command: str                           # the command that reproduces the report (top of each section)
    fresh: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    data_seed: int = 0
    image_folder: Path | None = None       # the "imagefolder" dataset's root (default <data root>/cifar10-jpg)
    workers: int = 1                       # local worker processes per grid (this one included)
    is_worker: bool = False                # a helper process: runs cells, writes no report
    stage: str = ""                        # the stage running (helpers are started with it)
    join: str = ""                         # a helper's grid: it passes the stage's finished grids before it
    _data: dict = field(default_factory=dict, repr=False)

    def stage_dir(self, stage: str) -> Path:
        d = self.out_dir / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def data(self, dataset: str):
        """(train, train_eval, test, spec) of a dataset under this preset: the same images for every
        cell and seed (the split depends on data_seed only)."""
        return self._load(dataset)[:4]

    def val(self, dataset: str):
        """Held-out training images (never trained on, never the test set): for choosing LRs and trials."""
        return self._load(dataset)[4]

    def _load(self, dataset: str):
        if dataset not in self._data:
            from training import data as D
            from training.pipeline import make_spec

            root = (self.image_folder or self.data_root / "cifar10-jpg") if dataset == "imagefolder" else self.data_root
            pool = D.shuffled(D.load_dataset(dataset, "train", root, progress=self.progress), self.data_seed)
            test = D.load_dataset(dataset, "test", root, progress=self.progress)
            n_val = min(self.preset.val_images, len(pool) // 5)
            val = pool.subset(slice(len(pool) - n_val, len(pool)))     # the pool's end: held out
            limit = self.preset.train_limit.get(dataset, 0) or len(pool) - n_val
            train = pool.subset(slice(0, min(limit, len(pool) - n_val)))
            if self.preset.test_limit:
                test = D.shuffled(test, self.data_seed + 1).subset(slice(0, self.preset.test_limit))
            train_eval = train.subset(slice(0, min(len(train), len(val))))
            self._data[dataset] = (train, train_eval, test, make_spec(train), val)
        return self._data[dataset]


# ---------------------------------------------------------------- running a grid from a stage


def protocol(ctx: StudyContext) -> dict:
    """How every cell computes on this machine: the training precision and the torch threads per worker."""
    from lab.hardware import cores
    from training.engine import pick_device, resolve_precision

    precision = resolve_precision("auto", pick_device())
    return {"precision": precision, "scored_in": precision, "threads": max(1, cores() // ctx.workers)}


def protocol_line(ctx: StudyContext) -> str:
    p = protocol(ctx)
    how = "bf16 autocast (this CPU computes bf16 natively)" if p["precision"] == "bf16" else "fp32"
    return (f"Cells train and are scored in {how} with {p['threads']} torch thread(s) in each of {ctx.workers} worker "
            f"process(es); both are part of each cell's key.")


class WorkerDone(Exception):
    """Raised in a helper worker process once its grid is done: the stage's report is not its job."""


def grid(ctx: StudyContext, spec) -> dict[str, dict]:
    """Run (or resume) a stage's grid with ctx.workers processes on this machine; cell id -> record."""
    import os
    import subprocess
    import sys

    from lab.hardware import cores
    from training.studies.runner import run_grid

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cores() // ctx.workers))
    # precision and threads change what a cell computes (bf16 rounding; chaotic runs follow the order of
    # reductions): they are part of every cell's key, so results made otherwise are never mixed in
    spec.config = {**spec.config, **protocol(ctx)}
    helpers = []
    if not ctx.is_worker:
        for _ in range(ctx.workers - 1):
            cmd = [sys.executable, "-m", "training.studies.worker", ctx.stage, "--grid", spec.name,
                   "--preset", ctx.preset.name,
                   "--storage", ctx.storage, "--data-root", str(ctx.data_root), "--data-seed", str(ctx.data_seed),
                   "--workers", str(ctx.workers), "--out", str(ctx.out_dir)]
            helpers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=dict(os.environ)))
    try:
        records = run_grid(spec, ctx.storage, fresh=ctx.fresh and not ctx.is_worker, progress=ctx.progress,
                           log=ctx.log, wait_for_others=not ctx.is_worker)
    finally:
        for h in helpers:
            h.wait()
        torch.set_num_threads(threads)  # what follows the grid (timings, exports, publishing) has every core
    if ctx.is_worker and spec.name == ctx.join:
        raise WorkerDone
    return records


# ---------------------------------------------------------------- one cell


def train_cell(ctx: StudyContext, dataset: str, model: str, kwargs: dict, seed: int, *, recipe: str,
               train: dict | None = None, stage: str = "default",
               after_backward: Callable[[torch.nn.Module], None] | None = None,
               inspect: Callable[[torch.nn.Module, object], dict] | None = None,
               on_epoch: Callable[[dict], None] | None = None, evaluate_on: str = "test",
               epoch_f1: bool = False) -> dict:
    """Train one cell through the engine and measure it (see the module docstring). Every epoch is monitored
    on the held-out split (history keys val_acc / val_loss); with evaluate_on="test" the final model is then
    scored once on the test images, with evaluate_on="val" it never sees them (cells that choose settings).

    A run whose loss turns non-finite is recorded, not raised: `diverged` holds the engine's message and the
    net is scored as it stands (NaN logits predict one class: chance)."""
    from training.engine import train as run_training
    from training.evaluate import classification_metrics, predict_torch
    from training.recipes import make_config

    if evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', got {evaluate_on!r}")
    train_set, train_eval, test, spec = ctx.data(dataset)
    val = ctx.val(dataset)
    overrides = {"epochs": ctx.preset.epochs_for(stage), "batch_size": ctx.preset.batch_size,
                 **(train or {}), "seed": seed}
    cfg = make_config(recipe, dataset=dataset, **overrides)
    net = create_model(model, seed=seed, num_classes=len(train_set.classes), in_channels=train_set.channels,
                       image_size=train_set.size[0], **kwargs)

    # every score of a cell in the precision it trained in: a bf16 forward costs a third of an fp32 one
    # here, and all variants of a study are scored alike (the served models are measured in fp32 apart)
    scoring = protocol(ctx)["precision"]

    def hook(model, record):  # after each epoch's evaluation, the model in eval mode
        if epoch_f1:  # macro-F1 on the held-out images, in the epoch's record
            logits = predict_torch(model, val, spec, precision=scoring)
            record["val_macro_f1"] = classification_metrics(
                val.labels.numpy(), logits.argmax(1), val.classes)["macro_f1"]
        if on_epoch is not None:
            on_epoch(record)

    diverged, history, train_seconds, precision = "", [], 0.0, ""
    try:
        # every epoch on the held-out images only: the training-set accuracy the gap needs is measured once
        result = run_training(net, train_set, spec, cfg, eval_sets={"val": val},
                              progress=False, log=lambda *_: None, after_backward=after_backward,
                              on_epoch_end=hook)
        net, history = result.model, result.history
        train_seconds, precision = result.train_seconds, result.precision
    except FloatingPointError as e:
        diverged = str(e)
    net = net.eval()
    scored = test if evaluate_on == "test" else val
    logits = predict_torch(net, scored, spec, precision=scoring)
    pred = logits.argmax(1)
    m = classification_metrics(scored.labels.numpy(), pred, scored.classes)
    if history:
        val_acc = history[-1]["val_acc"]
    else:  # diverged before its first evaluation: score the net as it stands
        val_acc = float((predict_torch(net, val, spec, precision=scoring).argmax(1) == val.labels.numpy()).mean())
    train_eval_acc = 0.0
    if evaluate_on == "test":  # the overfitting gap: the final model on training images, as on the test ones
        train_eval_acc = float((predict_torch(net, train_eval, spec, precision=scoring).argmax(1)
                                == train_eval.labels.numpy()).mean())
    record = {
        "dataset": dataset, "model": model, "kwargs": kwargs, "seed": seed, "recipe": recipe,
        "evaluated_on": evaluate_on, "diverged": diverged,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("threads", "compile")},
        "params": count_parameters(net), "history": history,
        "val_acc": val_acc, "val_loss": history[-1]["val_loss"] if history else float("nan"),
        "train_eval_acc": train_eval_acc, "macro_f1": m["macro_f1"],
        "train_seconds": train_seconds, "precision": precision or cfg.precision, "threads": torch.get_num_threads(),
        "train_images": len(train_set), "val_images": len(val),
    }
    if evaluate_on == "test":  # a cell that only chooses a setting is not timed
        record.update(inference_ms(net, scored, spec, *ctx.preset.timing_reps))
        from training.studies.stats import pack_correct

        record.update(test_acc=m["accuracy"], test_images=len(test), gap=train_eval_acc - m["accuracy"],
                      test_correct=pack_correct(pred == test.labels.numpy()),
                      confusion=m["confusion_matrix"], per_class_accuracy=m["per_class_accuracy"])
    if inspect is not None:
        record["inspect"] = inspect(net, test)
    return record


@torch.no_grad()
def inference_ms(net: torch.nn.Module, test, spec, reps1: int = 20, reps256: int = 3) -> dict:
    """Forward time per image, fp32, at batch 1 and 256 (median of repeats, after a warm-up)."""
    from training import data as D

    x = D.to_float(test.images[:256], spec)  # fewer on a tiny test set: ms per image all the same
    net = net.eval().float()
    out = {}
    for batch, reps in ((1, reps1), (256, reps256)):
        xb = x[:batch]
        net(xb)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            net(xb)
            times.append(time.perf_counter() - t0)
        out[f"infer_ms_b{batch}"] = 1000 * statistics.median(times) / len(xb)
    return out


# ---------------------------------------------------------------- figures over seeds (comparisons: stats.py)


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values) -> "Spread":
        v = [float(x) for x in values]
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v), len(v))

    def pct(self, digits: int = 1) -> str:
        """'71.2 ± 0.4%' (mean ± sample std over seeds)."""
        return f"{100 * self.mean:.{digits}f} ± {100 * self.std:.{digits}f}%"

    def fmt(self, fmt: str = ".3g", unit: str = "") -> str:
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}{unit}"


def group(records: dict[str, dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in records.values():
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# ---------------------------------------------------------------- gradient clipping, per variant


def clips(records) -> bool:
    """Whether any of these cells clipped its global gradient norm (TrainConfig.grad_clip above 0)."""
    return any((r.get("config") or {}).get("grad_clip", 0) for r in records)


def clipped_steps(records) -> tuple[int, int] | None:
    """(clipped steps, steps) summed over these cells' histories (each epoch counts its optimizer steps, and
    those whose global gradient norm exceeded grad_clip, so that clipping changed the step); None when a
    history does not count them (a cell trained before the engine did)."""
    clipped = steps = 0
    for r in records:
        for h in r.get("history", []):
            if "steps" not in h or "clipped_steps" not in h:
                return None
            clipped, steps = clipped + h["clipped_steps"], steps + h["steps"]
    return clipped, steps


def clipped_share(records) -> float | None:
    counted = clipped_steps(records)
    return None if counted is None or not counted[1] else counted[0] / counted[1]


def clipped_text(records) -> str:
    """A table cell: '12.3 % (70 of 567 steps)'."""
    counted = clipped_steps(records)
    if counted is None:
        return "not counted (trained before the engine counted clipped steps)"
    clipped, steps = counted
    return f"{100 * clipped / steps:.1f} % ({clipped:,} of {steps:,} steps)" if steps else "no steps"


CLIPPED_HEADER = "clipped steps, all seeds"


def variant_summary(records: dict) -> dict[str, dict]:
    """variant -> what the results files keep of it as a whole: its seeds, mean test accuracy, the clipping
    threshold and the share of its steps that clipping changed (over every seed's history)."""
    by: dict[str, list[dict]] = {}
    for r in records.values():
        if isinstance(r, dict) and "test_acc" in r:
            by.setdefault(str(cell_row(r)["variant"] or r.get("model")), []).append(r)
    out = {}
    for v, recs in by.items():
        counted = clipped_steps(recs)
        out[v] = {"seeds": len(recs), "test_acc": statistics.fmean(r["test_acc"] for r in recs),
                  "grad_clip": max((r.get("config") or {}).get("grad_clip", 0.0) for r in recs),
                  "steps": counted[1] if counted else None, "clipped_steps": counted[0] if counted else None,
                  "clipped_share": clipped_share(recs)}
    return out


# ---------------------------------------------------------------- plots


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def band(ax, curves: list[list[float]], label: str, x=None, scale: float = 1.0, color=None):
    """Mean curve over seeds with a min-max band."""
    n = min(len(c) for c in curves)
    a = np.array([c[:n] for c in curves], dtype=float) * scale
    x = np.arange(1, n + 1) if x is None else np.asarray(x)[:n]
    line, = ax.plot(x, a.mean(0), "o-", ms=3, label=f"{label} ({len(curves)} seeds)", color=color)
    ax.fill_between(x, a.min(0), a.max(0), alpha=0.2, color=line.get_color())
    return line


def curves_figure(groups: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Held-out accuracy and training loss per epoch, mean over seeds with a min-max band, per group."""
    p = plt()
    fig, (a1, a2) = p.subplots(1, 2, figsize=(11, 4))
    for label, recs in groups.items():
        recs = [r for r in recs if r["history"]]  # a run that diverged in its first epoch has no curve
        if not recs:
            continue
        line = band(a1, [[h["val_acc"] for h in r["history"]] for r in recs], label, scale=100)
        band(a2, [[h["train_loss"] for h in r["history"]] for r in recs], label, color=line.get_color())
    a1.set(xlabel="epoch", ylabel="held-out accuracy, %", title="held-out accuracy (mean, min-max band)")
    a2.set(xlabel="epoch", ylabel="training loss", title="training loss (mean, min-max band)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


# ---------------------------------------------------------------- the report section


@dataclass
class Section:
    """A stage's part of the report. A comparison's sentence (stats.Comparison.sentence) added to it is
    kept with its comparison: `write` corrects it over the report's family (training/studies/family.py;
    outside the study report, as training/tune.py writes it, over the section's own comparisons), writes
    its verdict, and puts it in the stage's raw results beside the section."""
    stage: str
    title: str
    command: str
    lines: list[str] = field(default_factory=list)
    sweeps: dict = field(default_factory=dict)       # variant -> its LR sweep (sweep.LRChoice.as_dict())
    compared: list = field(default_factory=list)     # (line index, stats.Sentence) of every comparison
    derived: list = field(default_factory=list)      # (line index, "module:function", data): text judged from
                                                     # the corrected comparisons (`derive`)
    extra: dict = field(default_factory=dict)        # more raw results for results.json (per-seed measures)
    _said_no_clipping: bool = field(default=False, repr=False)

    def add(self, *lines: str) -> "Section":
        from training.studies.stats import Sentence

        for line in lines:
            if isinstance(line, Sentence):
                self.compared.append((len(self.lines), line))
            self.lines.append(line)
        return self

    def derive(self, fn: str, data: dict) -> "Section":
        """A block of text that `fn(comparisons, data)` (a "module:function" path) writes from the section's
        comparisons once they are corrected over the report's family, and writes again whenever the report's
        assembly corrects them anew (training/studies/family.py): a verdict drawn from verdicts."""
        self.derived.append((len(self.lines), fn, data))
        self.lines.append("")
        return self

    def clipping(self, by: dict[str, list[dict]]) -> dict[str, str] | None:
        """variant -> its share of clipped steps, for a column of a table of these variants; None when no
        cell of them clips (grad_clip 0), which the section then says once instead of a column of zeros."""
        if clips(r for recs in by.values() for r in recs):
            return {v: clipped_text(recs) for v, recs in by.items()}
        if not self._said_no_clipping:
            self._said_no_clipping = True
            self.add("No cell of this stage clips its gradients (grad_clip 0): every step is the optimizer's own, so "
                     "its tables have no clipped-share column.", "")
        return None

    def table(self, header: list[str], rows: list[list]) -> "Section":
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")
        return self

    def image(self, path: Path, alt: str) -> "Section":
        self.lines += [f"![{alt}]({self.stage}/{path.name})", ""]
        return self

    def write(self, ctx: StudyContext, seconds: float, records: dict | None = None) -> Path:
        from lab.report_html import command_line

        timing = f"Wall time of this stage: {seconds:.0f} s"
        cells = [r for r in (records or {}).values() if isinstance(r, dict) and "cell_seconds" in r]
        if cells:  # a rerun finds cells done earlier: their own time says what the grid cost
            timing += (f" in this run; its {len(cells)} cells took {sum(r['cell_seconds'] for r in cells):.0f} s "
                       f"of worker time in all, whichever run trained them")
        head = [f"## {self.title}", "", command_line(self.command), "",
                f"Preset **{ctx.preset.name}**: {ctx.preset.description}. {timing}. {protocol_line(ctx)}", ""]
        d = ctx.stage_dir(self.stage)
        comparisons = self._correct(ctx)
        path = d / "section.md"
        path.write_text("\n".join(head + self.lines) + "\n")
        if records is not None:
            (d / "cells.json").write_text(json.dumps(records, indent=1, default=float))
        results = {"stage": self.stage, "title": self.title, "preset": ctx.preset.name, "command": self.command,
                   "cells": [cell_row(r) for r in (records or {}).values() if isinstance(r, dict) and "test_acc" in r],
                   "variants": variant_summary(records or {}), "sweeps": self.sweeps, "comparisons": comparisons,
                   "derived": [{"fn": fn, "data": data, "text": self.lines[i]} for i, fn, data in self.derived],
                   **self.extra}
        (d / "results.json").write_text(json.dumps(results, indent=1, default=float))
        write_results_csv(d / "results.csv", [results])
        return path

    def _correct(self, ctx: StudyContext) -> list[dict]:
        """Correct the section's comparisons over the report's family (the other stages' p-values as they
        stand) and write each one's verdict into its line; returns them as results rows."""
        from training.studies.family import correct
        from training.studies.stats import as_family

        found = [s.comparison for _, s in self.compared]
        if not found:
            fixed = []
        elif ctx.stage:  # a stage of the study report (run_all.py names the stage it runs): the report's family
            fixed = correct(ctx.out_dir, ctx.preset.name, {self.stage: found})[self.stage]
        else:            # a report of its own (training/tune.py): its comparisons are its family
            fixed = as_family(found, "this report's comparisons")
        for i, fn, data in self.derived:
            self.lines[i] = derived_text(fn, fixed, data)
        rows = []
        for (i, old), c in zip(self.compared, fixed):
            self.lines[i] = c.sentence(prefix=old.prefix)
            rows.append({**c.row(), "prefix": old.prefix, "sentence": str(self.lines[i])})
        return rows


def derived_text(fn: str, comparisons: list, data: dict) -> str:
    """The text a Section.derive block's function writes from these (corrected) comparisons."""
    import importlib

    module, name = fn.split(":")
    return getattr(importlib.import_module(module), name)(comparisons, data)


# ---------------------------------------------------------------- the raw results beside the report

RESULT_COLUMNS = ["kind", "stage", "variant", "seed", "lr", "test_acc", "val_acc", "train_eval_acc", "diverged",
                  "test_images", "grad_clip", "steps", "clipped_steps", "clipped_share", "seeds", "chosen",
                  "bracketed", "a", "b", "measure", "mean_a", "mean_b", "diff", "ci_lo", "ci_hi", "se", "df", "test",
                  "p", "p_holm", "established", "unbracketed", "family_size", "seeds_a", "seeds_b", "images", "note"]


def cell_row(rec: dict) -> dict:
    """One evaluation cell as the results files hold it: its variant, seed, LR, accuracies, and its steps and
    how many of them clipping changed (None when its history does not count them)."""
    cfg = rec.get("config") or {}
    counted = clipped_steps([rec])
    return {"cell": rec.get("cell"), "variant": rec.get("variant", rec.get("optimizer")), "seed": rec.get("seed"),
            "lr": rec.get("lr", cfg.get("lr")), "test_acc": rec["test_acc"], "val_acc": rec.get("val_acc"),
            "train_eval_acc": rec.get("train_eval_acc"), "diverged": bool(rec.get("diverged")),
            "test_images": rec.get("test_images"), "grad_clip": cfg.get("grad_clip", 0.0),
            "steps": counted[1] if counted else None, "clipped_steps": counted[0] if counted else None}


def write_results_csv(path: Path, stages: list[dict]) -> Path:
    """Stages' results (as results.json holds them) as one table: a row per cell ("cell"), per variant over its
    seeds ("variant": mean test accuracy, clipped share), per LR tried in a sweep ("sweep") and per comparison
    ("comparison"); accuracies and differences as fractions."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, RESULT_COLUMNS, extrasaction="ignore", restval="")
        w.writeheader()
        for res in stages:
            stage = res["stage"]
            for c in res.get("cells", []):
                w.writerow({"kind": "cell", "stage": stage, **c})
            for v, summary in res.get("variants", {}).items():
                w.writerow({"kind": "variant", "stage": stage, "variant": v, **summary})
            for v, sw in res.get("sweeps", {}).items():
                for lr, acc in sw["tried"].items():  # each sweep seed's held-out accuracy, then their mean
                    row = {"kind": "sweep", "stage": stage, "variant": v, "lr": lr,
                           "diverged": float(lr) in sw["diverged"], "chosen": float(lr) == sw["chosen"],
                           "bracketed": sw["bracketed"]}
                    for seed, seed_acc in sw["per_seed"][lr].items():
                        w.writerow({**row, "seed": seed, "val_acc": seed_acc})
                    w.writerow({**row, "seed": "mean", "val_acc": acc})
            for c in res.get("comparisons", []):
                w.writerow({"kind": "comparison", "stage": stage, **c})
    return path


# ---------------------------------------------------------------- publishing a model a study found


def publish_model(ctx: StudyContext, store_name: str, dataset: str, model: str, kwargs: dict, *, recipe: str,
                  train: dict, description: str, before_publish: Callable[[], None] | None = None) -> dict:
    """Train `model` with these settings on the study's training images through the model pipeline (train,
    evaluate, export with its parity gate, publish) and put it in the BentoML store as `store_name`.

    The run folder, <out>/published/<timestamp>-<host>-<pid>-<store name>/, is made new by this process: two
    processes never write into the same one. `before_publish()` runs just before the store is written (it
    raises to stop: a claim this process no longer holds).

    Returns {"tag", "served_accuracy", "epochs", "run_dir"}. The test split is the whole test set."""
    from lab.paths import new_run_dir
    from lab.store import clean_staging, store_lock
    from training import pipeline as P
    from training.presets import Preset

    store_name += ctx.preset.store_suffix
    preset = Preset(name=f"study-{ctx.preset.name}", dataset=dataset, model=model, model_kwargs=dict(kwargs),
                    recipe=recipe, overrides={"batch_size": ctx.preset.batch_size, **train},
                    data_seed=ctx.data_seed, train_limit=ctx.preset.train_limit.get(dataset, 0), test_limit=0,
                    store_name=store_name, description=description,
                    calibration_images=min(512, ctx.preset.train_limit.get(dataset, 0) or 512))
    run_dir = new_run_dir(ctx.out_dir / "published", store_name)
    run = P.Run(dir=run_dir, preset=preset, data_root=ctx.data_root, progress=ctx.progress)
    ctx.log(f"  publishing {store_name}: {model} {kwargs} {train} (run folder {run_dir})")
    for stage in ("train", "evaluate", "export"):
        getattr(P, f"stage_{stage}")(run)
    if before_publish is not None:
        before_publish()
    with store_lock():
        clean_staging()
        tag = P.stage_publish(run)
    served = run.files.export().served["accuracy"]
    ctx.log(f"  published {tag}: served accuracy {100 * served:.2f}%")
    return {"tag": tag, "served_accuracy": served, "epochs": preset.config().epochs, "run_dir": str(run_dir)}
