"""Optimizer convergence (issue 11): SGD, SGD with momentum, Adam, AdamW, RMSprop, Rprop and Adamax on
the seeds' CNN, on MNIST and CIFAR-10, each at its own learning rate, over seeds.

How each LR is chosen: a short sweep per optimizer (LR_GRID, one seed, half the epochs) scored on
held-out training images (never the test set); the best LR then trains with every seed. All optimizers
use a constant LR, no weight decay (AdamW: its decoupled decay 0.01, which is what it is for), the same
model, data and number of passes over the data.

Rprop is a full-batch method (it adapts a step per weight from the sign of successive gradients, which
mini-batch noise scrambles): it runs full-batch here, one step per pass over the training images, so
with E passes it takes E steps where the mini-batch methods take E x (images / batch). Its figures
are per pass (equal compute) and per second.
"""
from __future__ import annotations

import math
import time

from training.studies.common import Section, Spread, StudyContext, compare, grid, group, plt, train_cell
from training.studies.runner import Cell, GridSpec

RECIPE = "study_sgd"
MODEL = dict(model="simple_cnn", kwargs=dict(n_layers=2))
OPTIMIZERS = {                       # name -> TrainConfig settings besides the LR
    "sgd":          dict(optimizer="sgd", momentum=0.0, nesterov=False),
    "sgd_momentum": dict(optimizer="sgd", momentum=0.9, nesterov=False),
    "adam":         dict(optimizer="adam"),
    "adamw":        dict(optimizer="adamw", weight_decay=0.01),
    "rmsprop":      dict(optimizer="rmsprop", momentum=0.0),
    "rprop":        dict(optimizer="rprop", full_batch=True),
    "adamax":       dict(optimizer="adamax"),
}
LR_GRID = {                          # candidates of the sweep, around each optimizer's usual default
    "sgd": (0.3, 0.1, 0.03, 0.01),
    "sgd_momentum": (0.1, 0.03, 0.01, 0.003),
    "adam": (3e-3, 1e-3, 3e-4, 1e-4),
    "adamw": (3e-3, 1e-3, 3e-4, 1e-4),
    "rmsprop": (1e-3, 3e-4, 1e-4, 3e-5),
    "rprop": (3e-2, 1e-2, 3e-3, 1e-3),   # Rprop's initial step size
    "adamax": (1e-2, 3e-3, 1e-3, 3e-4),
}
CLAIMS = (("adam", "sgd"), ("rmsprop", "sgd"), ("rprop", "sgd"), ("adamax", "adam"))  # the seeds' pairs
DATASETS = ("mnist", "cifar10")


def _settings(ctx: StudyContext, opt: str, lr: float, dataset: str) -> dict:
    s = {k: v for k, v in OPTIMIZERS[opt].items() if k != "full_batch"}
    s.update(lr=lr, schedule="constant", warmup=0.0)
    if OPTIMIZERS[opt].get("full_batch"):
        s["batch_size"] = len(ctx.data(dataset)[0])
    return s


def _sweep(ctx: StudyContext) -> tuple[dict[tuple[str, str], float], dict[str, dict]]:
    """(dataset, optimizer) -> the LR with the best held-out accuracy; and the sweep's records."""
    def run_cell(cell: Cell) -> dict:
        opt, lr = cell.variant.split("@")
        rec = train_cell(ctx, cell.dataset, MODEL["model"], MODEL["kwargs"], cell.seed, recipe=RECIPE,
                         train={**_settings(ctx, opt, float(lr), cell.dataset),
                                "epochs": max(1, ctx.preset.epochs_for("optimizers") / 2)},
                         stage="optimizers", evaluate_on="val")
        return dict(rec, optimizer=opt, lr=float(lr))

    grid_of = {o: LR_GRID[o][1:3] if ctx.preset.name == "smoke" else LR_GRID[o] for o in OPTIMIZERS}  # smoke: 2 LRs
    cells = [Cell(d, f"{o}@{lr:g}", ctx.preset.seeds[0]) for d in DATASETS for o in OPTIMIZERS for lr in grid_of[o]]
    config = {"stage": "optimizer LR sweep", "optimizers": OPTIMIZERS, "grid": grid_of, "model": MODEL,
              "preset": ctx.preset.name, "epochs": max(1, ctx.preset.epochs_for("optimizers") / 2),
              "train_limit": ctx.preset.train_limit, "val_images": ctx.preset.val_images, "data_seed": ctx.data_seed}
    recs = grid(ctx, GridSpec("optimizers-lr-sweep", cells, config, run_cell))
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in recs.values():
        key = (r["dataset"], r["optimizer"])
        acc = r["test_acc"] if math.isfinite(r.get("test_loss", 0.0)) else 0.0
        if key not in best or acc > best[key][1]:
            best[key] = (r["lr"], acc)
    return {k: v[0] for k, v in best.items()}, recs


def optimizers(ctx: StudyContext, command: str) -> Section:
    t0 = time.perf_counter()
    lrs, sweep = _sweep(ctx)

    def run_cell(cell: Cell) -> dict:
        lr = lrs[(cell.dataset, cell.variant)]
        rec = train_cell(ctx, cell.dataset, MODEL["model"], MODEL["kwargs"], cell.seed, recipe=RECIPE,
                         train=_settings(ctx, cell.variant, lr, cell.dataset), stage="optimizers")
        return dict(rec, optimizer=cell.variant, lr=lr, variant=cell.variant)

    cells = [Cell(d, o, s) for d in DATASETS for o in OPTIMIZERS for s in ctx.preset.seeds]
    config = {"stage": "optimizers", "lrs": {f"{d}/{o}": lr for (d, o), lr in sorted(lrs.items())},
              "optimizers": OPTIMIZERS, "model": MODEL, "preset": ctx.preset.name,
              "epochs": ctx.preset.epochs_for("optimizers"), "batch_size": ctx.preset.batch_size,
              "train_limit": ctx.preset.train_limit, "test_limit": ctx.preset.test_limit, "data_seed": ctx.data_seed}
    recs = grid(ctx, GridSpec("optimizers", cells, config, run_cell))
    by = group(recs, "dataset", "variant")
    sec = Section("optimizers", "5. Optimizer convergence", command)
    sec.add(__doc__.split("\n\n", 1)[1].strip(), "",
            f"Model: the seeds' CNN (`simple_cnn`, 2 conv layers); {ctx.preset.epochs_for('optimizers'):g} passes over "
            f"the training images, batch {ctx.preset.batch_size} (Rprop: all of them).", "")
    sec.add("LR sweep (one seed, half the passes, accuracy on held-out training images):", "")
    rows = []
    for d in DATASETS:
        for o in OPTIMIZERS:
            tried = sorted((r["lr"], r["test_acc"]) for r in sweep.values() if r["dataset"] == d and r["optimizer"] == o)
            rows.append([d, o, ", ".join(f"{lr:g}: {100 * a:.1f}%" for lr, a in tried), f"**{lrs[(d, o)]:g}**"])
    sec.table(["dataset", "optimizer", "held-out accuracy per LR", "chosen LR"], rows)
    for d in DATASETS:
        got = {o: by[(d, o)] for o in OPTIMIZERS if (d, o) in by}
        if not got:
            continue
        best_mean = max(Spread.of(r["test_acc"] for r in v).mean for v in got.values())
        target = math.floor(90 * best_mean) / 100  # 90% of the best mean final accuracy, rounded down to 1%
        sec.add(f"### {d}", "", f"Target accuracy for the time columns: {100 * target:.0f}% (90% of the best "
                                f"optimizer's mean final accuracy).", "")
        rows = []
        for o, v in got.items():
            acc = Spread.of(r["test_acc"] for r in v)
            reach = [_to_target(r, target) for r in v]
            hit = [x for x in reach if x is not None]
            rows.append([o, f"{v[0]['lr']:g}", acc.pct(), f"{100 * acc.min:.1f} / {100 * acc.max:.1f}",
                         Spread.of(r["history"][-1]["train_loss"] for r in v).fmt(".3f"),
                         f"{len(hit)}/{len(v)}",
                         Spread.of(x[0] for x in hit).fmt(".1f") if hit else "not reached",
                         Spread.of(x[1] for x in hit).fmt(".1f", " s") if hit else "not reached",
                         Spread.of(r["train_seconds"] for r in v).fmt(".1f", " s")])
        sec.table(["optimizer", "LR", "final test accuracy", "min / max", "final training loss",
                   "seeds reaching target", "passes to target", "seconds to target", "training time"], rows)
        png = _curves(got, ctx.stage_dir("optimizers") / f"curves_{d}.png", d)
        sec.image(png, f"{d}: loss and accuracy per pass")
        sec.add("The course reports' pairwise claims, with our numbers:", "")
        for a, b in CLAIMS:
            if a in got and b in got:
                sec.add("- " + compare(a, [r["test_acc"] for r in got[a]], b, [r["test_acc"] for r in got[b]]))
        sec.add("")
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def _to_target(rec: dict, target: float) -> tuple[int, float] | None:
    """(passes, training seconds) until the test accuracy first reaches target, or None."""
    for h in rec["history"]:
        if h["test_acc"] >= target:
            return h["epoch"], h["train_seconds"]
    return None


def _curves(got: dict, path, dataset: str):
    from training.studies.common import band

    p = plt()
    fig, (a1, a2) = p.subplots(1, 2, figsize=(11, 4))
    for o, recs in got.items():
        line = band(a1, [[h["train_loss"] for h in r["history"]] for r in recs], o)
        band(a2, [[h["test_acc"] for h in r["history"]] for r in recs], o, scale=100, color=line.get_color())
    a1.set(xlabel="pass over the training images", ylabel="training loss", title="training loss (mean, min-max band)")
    a1.set_yscale("log")
    a2.set(xlabel="pass over the training images", ylabel="test accuracy, %", title="test accuracy (mean, min-max band)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: optimizers, each at its swept LR")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


STAGES = {"optimizers": optimizers}
