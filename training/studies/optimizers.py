"""Optimizer convergence on CIFAR-10: SGD, SGD with momentum, Adam, AdamW, RMSprop, Rprop and Adamax on the
seeds' CNN, and Adamax vs Adam on a BatchNorm ResNet, each at its own learning rate, over seeds.

How each LR is chosen: a sweep per optimizer over a grid around its usual default (LR_GRID, spaced
about 3x), on a sweep seed that no evaluation cell uses, for a quarter of the passes, scored on held-out
training images (never the test set); a best LR at the edge of the grid extends it by one step until
it is bracketed (training/studies/sweep.py). The chosen LR then trains with every seed. All optimizers
use a constant LR and no weight decay (AdamW: its decoupled decay 0.01, which is what it is for), the
same data and the same number of passes over it.

Rprop adapts one step per weight from the signs of successive gradients, which mini-batch noise
scrambles, so it gets two fair settings: `rprop` with batches of RPROP_BATCH images at equal compute
(the same passes as everyone, fewer updates), and `rprop_full`, full-batch, given as many updates as
`rprop` makes (one update per pass: more passes, so more compute). Curves are drawn per pass (compute)
and per update.
"""
from __future__ import annotations

import math
import time

from training.studies.common import Section, Spread, StudyContext, grid, plt, train_cell
from training.studies.runner import Cell, GridSpec

RECIPE = "study_sgd"
CNN = dict(model="simple_cnn", kwargs=dict(n_layers=2))
RESNET = dict(model="resnet_small", kwargs=dict(norm=True))       # CIFAR ResNet-20 with BatchNorm
RPROP_BATCH = 1000
OPTIMIZERS = {                       # name -> the net and the TrainConfig settings besides the LR
    "sgd":           dict(CNN, train=dict(optimizer="sgd", momentum=0.0, nesterov=False)),
    "sgd_momentum":  dict(CNN, train=dict(optimizer="sgd", momentum=0.9, nesterov=False)),
    "adam":          dict(CNN, train=dict(optimizer="adam")),
    "adamw":         dict(CNN, train=dict(optimizer="adamw", weight_decay=0.01)),
    "rmsprop":       dict(CNN, train=dict(optimizer="rmsprop", momentum=0.0)),
    "rprop":         dict(CNN, train=dict(optimizer="rprop", batch_size=RPROP_BATCH)),
    "rprop_full":    dict(CNN, train=dict(optimizer="rprop"), full_batch=True),
    "adamax":        dict(CNN, train=dict(optimizer="adamax")),
    "adam_resnet":   dict(RESNET, train=dict(optimizer="adam")),
    "adamax_resnet": dict(RESNET, train=dict(optimizer="adamax")),
}
LR_GRID = {                          # where each sweep starts: around the optimizer's usual default
    "sgd": (0.3, 0.1, 0.03, 0.01),
    "sgd_momentum": (0.1, 0.03, 0.01, 0.003),
    "adam": (3e-3, 1e-3, 3e-4, 1e-4),
    "adamw": (3e-3, 1e-3, 3e-4, 1e-4),
    "rmsprop": (1e-3, 3e-4, 1e-4, 3e-5),
    "rprop": (3e-2, 1e-2, 3e-3, 1e-3),   # Rprop's initial step size
    "rprop_full": (3e-2, 1e-2, 3e-3),
    "adamax": (1e-2, 3e-3, 1e-3, 3e-4),
    "adam_resnet": (3e-3, 1e-3, 3e-4),
    "adamax_resnet": (1e-2, 3e-3, 1e-3),
}
GRID_STEP = 10 ** 0.5               # an extension goes one step of the grid's spacing past its edge
COMPARISONS = (                     # declared before the runs; the report's family: training/studies/family.py
    ("adam", "sgd", ""), ("rmsprop", "sgd", ""), ("rprop", "sgd", "(equal compute)"),
    ("rprop_full", "rprop", "(equal updates; full-batch Rprop spends more passes on them)"),
    ("adamax", "adam", "(the seeds' CNN)"), ("adamax_resnet", "adam_resnet", "(a BatchNorm ResNet-20)"),
)
DATASET = "cifar10"


def _batch(ctx: StudyContext, name: str) -> int:
    n = len(ctx.data(DATASET)[0])
    if OPTIMIZERS[name].get("full_batch"):
        return n
    return min(n, OPTIMIZERS[name]["train"].get("batch_size", ctx.preset.batch_size))  # smoke: 64 images


def _steps_per_pass(ctx: StudyContext, name: str) -> int:
    return math.ceil(len(ctx.data(DATASET)[0]) / _batch(ctx, name))


def _passes(ctx: StudyContext, name: str, passes: float) -> float:
    """Full-batch Rprop gets as many updates as mini-batch Rprop makes in `passes` passes."""
    return passes * _steps_per_pass(ctx, "rprop") if OPTIMIZERS[name].get("full_batch") else passes


def _settings(ctx: StudyContext, name: str, lr: float, passes: float) -> dict:
    return dict(OPTIMIZERS[name]["train"], lr=lr, schedule="constant", warmup=0.0, epochs=_passes(ctx, name, passes),
                batch_size=_batch(ctx, name))


def optimizers(ctx: StudyContext, command: str) -> Section:
    from training.studies.architectures import _by_variant, add_comparisons, budget_line
    from training.studies.sweep import sweep_epochs, sweep_lrs, sweep_table

    t0 = time.perf_counter()
    passes = ctx.preset.epochs_for("optimizers")

    def sweep_cell(name: str, lr: float, seed: int, epochs: float) -> dict:
        o = OPTIMIZERS[name]
        rec = train_cell(ctx, DATASET, o["model"], o["kwargs"], seed, recipe=RECIPE, stage="optimizers",
                         train=_settings(ctx, name, lr, epochs), evaluate_on="val")
        return dict(rec, optimizer=name, lr=lr)

    grids = {o: LR_GRID[o] for o in OPTIMIZERS}
    choices = sweep_lrs(ctx, "optimizers", DATASET, grids, sweep_cell, factor=GRID_STEP,
                        config={"optimizers": OPTIMIZERS, "rprop_batch": RPROP_BATCH})
    lrs = {o: c.chosen for o, c in choices.items()}

    def run_cell(cell: Cell) -> dict:
        o = OPTIMIZERS[cell.variant]
        rec = train_cell(ctx, DATASET, o["model"], o["kwargs"], cell.seed, recipe=RECIPE, stage="optimizers",
                         train=_settings(ctx, cell.variant, lrs[cell.variant], passes))
        return dict(rec, optimizer=cell.variant, lr=lrs[cell.variant], variant=cell.variant,
                    steps_per_pass=_steps_per_pass(ctx, cell.variant))

    cells = [Cell(DATASET, o, s) for o in OPTIMIZERS for s in ctx.preset.seeds]
    config = {"stage": "optimizers", "lrs": lrs, "optimizers": OPTIMIZERS, "preset": ctx.preset.name,
              "epochs": passes, "batch_size": ctx.preset.batch_size, "rprop_batch": RPROP_BATCH,
              "train_limit": ctx.preset.train_limit, "test_limit": ctx.preset.test_limit,
              "val_images": ctx.preset.val_images, "data_seed": ctx.data_seed}
    recs = grid(ctx, GridSpec("optimizers", cells, config, run_cell))
    by = _by_variant(recs)
    sec = Section("optimizers", "5. Optimizer convergence", command)
    sec.add(__doc__.split("\n\n", 1)[1].strip(), "",
            f"Nets: the seeds' CNN (`simple_cnn`, 2 conv layers) for the first eight, CIFAR ResNet-20 with "
            f"BatchNorm for `adam_resnet` and `adamax_resnet`; {passes:g} passes over the training images, batch "
            f"{ctx.preset.batch_size} (`rprop`: {RPROP_BATCH}, so {_steps_per_pass(ctx, 'rprop')} updates a pass; "
            f"`rprop_full`: all {len(ctx.data(DATASET)[0]):,} images, {_passes(ctx, 'rprop_full', passes):g} "
            f"passes = {_passes(ctx, 'rprop_full', passes):g} updates, as many as `rprop` makes). MNIST is left "
            "out: every optimizer reaches its ceiling there at this budget.", "", budget_line(ctx, "optimizers", recs),
            "")
    sec.add("LR sweeps (held-out accuracy; the test images are not read):", "")
    sec.table(*sweep_table(choices, sweep_epochs(passes)))
    sec.sweeps = {o: c.as_dict() for o, c in choices.items()}
    best_mean = max(Spread.of(r["val_acc"] for r in v).mean for v in by.values())
    target = math.floor(90 * best_mean) / 100  # 90% of the best mean final held-out accuracy, rounded down
    sec.add(f"Target for the columns 'to target': {100 * target:.0f}% held-out accuracy (90% of the best "
            f"optimizer's mean final held-out accuracy).", "")
    rows = []
    for o, v in by.items():
        acc = Spread.of(r["test_acc"] for r in v)
        reach = [_to_target(r, target) for r in v]
        hit = [x for x in reach if x is not None]
        rows.append([o, f"{v[0]['lr']:.3g}", f"{v[0]['steps_per_pass']}", f"{len(v[0]['history'])}",
                     f"{len(v[0]['history']) * v[0]['steps_per_pass']}", acc.pct(),
                     f"{100 * acc.min:.1f} / {100 * acc.max:.1f}",
                     Spread.of(r["history"][-1]["train_loss"] for r in v if r["history"]).fmt(".3f"),
                     f"{len(hit)}/{len(v)}",
                     Spread.of(x[0] for x in hit).fmt(".1f") if hit else "not reached",
                     Spread.of(x[0] * v[0]["steps_per_pass"] for x in hit).fmt(".0f") if hit else "not reached",
                     Spread.of(r["train_seconds"] for r in v).fmt(".1f", " s")])
    sec.table(["optimizer", "LR", "updates per pass", "passes", "updates", "final test accuracy", "min / max",
               "final training loss", "seeds reaching target", "passes to target", "updates to target",
               "training time"], rows)
    png = _curves(by, ctx.stage_dir("optimizers") / f"curves_{DATASET}.png", DATASET)
    sec.image(png, f"{DATASET}: loss and accuracy per pass and per update")
    add_comparisons(sec, ctx, by, COMPARISONS)
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def _to_target(rec: dict, target: float) -> tuple[int, float] | None:
    """(passes, training seconds) until the held-out accuracy first reaches target, or None."""
    for h in rec["history"]:
        if h["val_acc"] >= target:
            return h["epoch"], h["train_seconds"]
    return None


def _curves(by: dict, path, dataset: str):
    from training.studies.common import band

    p = plt()
    fig, (a1, a2, a3) = p.subplots(1, 3, figsize=(16, 4.2))
    for o, recs in by.items():
        recs = [r for r in recs if r["history"]]
        if not recs:
            continue
        line = band(a1, [[h["train_loss"] for h in r["history"]] for r in recs], o)
        band(a2, [[h["val_acc"] for h in r["history"]] for r in recs], o, scale=100, color=line.get_color())
        steps = recs[0]["steps_per_pass"]
        n = min(len(r["history"]) for r in recs)
        band(a3, [[h["val_acc"] for h in r["history"]] for r in recs], o, scale=100, color=line.get_color(),
             x=[steps * (i + 1) for i in range(n)])
    a1.set(xlabel="pass over the training images", ylabel="training loss", title="training loss per pass")
    a1.set_yscale("log")
    a2.set(xlabel="pass over the training images (compute)", ylabel="held-out accuracy, %",
           title="held-out accuracy per pass")
    a3.set(xlabel="updates", ylabel="held-out accuracy, %", title="held-out accuracy per update")
    a3.set_xscale("log")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{dataset}: optimizers, each at its swept LR (mean over seeds, min-max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


STAGES = {"optimizers": optimizers}
