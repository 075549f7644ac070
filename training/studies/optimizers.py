"""Optimizer convergence on CIFAR-10: SGD, SGD with momentum, Adam, AdamW, RMSprop, Rprop and Adamax on the
seeds' CNN, and Adamax vs Adam on a BatchNorm ResNet, each at its own learning rate, over seeds.

How each LR is chosen: a sweep per optimizer over a grid around its usual default (LR_GRID, spaced
about 3x), on two sweep seeds that no evaluation cell uses, for as many passes as the cells train, scored
by the mean held-out accuracy over those seeds (never the test set); a best LR at the edge of the grid
extends it by one step until it is bracketed (training/studies/sweep.py), and a comparison naming an
optimizer whose best LR stayed at the edge is "not established (LR not bracketed)". The chosen LR then
trains with every seed. All optimizers
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

from training.studies.common import CLIPPED_HEADER, Section, Spread, StudyContext, grid, plt, train_cell
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
SETTINGS = {                         # what each name is, as the tables say it: "SGD" alone is ambiguous
    "sgd": "SGD, no momentum",
    "sgd_momentum": "SGD, momentum 0.9 (no Nesterov)",
    "adam": "Adam",
    "adamw": "AdamW, decoupled weight decay 0.01",
    "rmsprop": "RMSprop, no momentum",
    "rprop": f"Rprop, batches of {RPROP_BATCH} (equal compute)",
    "rprop_full": "Rprop, full batch (as many updates as `rprop`)",
    "adamax": "AdaMax",
    "adam_resnet": "Adam, BatchNorm ResNet-20",
    "adamax_resnet": "AdaMax, BatchNorm ResNet-20",
}
COMPARISONS = (                     # declared before the runs; the report's family: training/studies/family.py
    ("adam", "sgd", "(`sgd`: SGD without momentum)"),
    ("adam", "sgd_momentum", "(`sgd_momentum`: SGD with momentum 0.9)"),
    ("rmsprop", "sgd", ""), ("rprop", "sgd", "(equal compute)"),
    ("rprop_full", "rprop", "(equal updates; full-batch Rprop spends more passes on them)"),
    ("adamax", "adam", "(the seeds' CNN)"), ("adamax_resnet", "adam_resnet", "(a BatchNorm ResNet-20)"),
)
DATASET = "cifar10"

# Stability, as the seeds' claims use the word, measured on each cell's training-loss curve. The engine's
# history holds the training loss once per pass (its mean over the pass's updates), not per update, so
# the curve has one point a pass: `rprop_full`, one update a pass, is averaged over as many updates as
# `rprop` makes in a pass, so that every curve has as many points. Lower is more stable for both.
STABILITY_MEASURES = {
    "training-loss rises": "passes whose mean training loss rose above the pass before's (a diverged run "
                           "counts its last pass as one more)",
    "training-loss waviness": "the loss's up-and-down movement: its total change from pass to pass beyond the net "
                              "change from the first pass to the last, over the first pass's loss (0 for a curve "
                              "that only falls)",
}
STABILITY_BASELINE = "sgd"
STABILITY_COMPARISONS = tuple((o, STABILITY_BASELINE) for o, v in OPTIMIZERS.items()   # on the seeds' CNN
                              if v["model"] == CNN["model"] and o != STABILITY_BASELINE)
# The seeds' words, each tested by the declared stability comparisons it names:
# (claim, [(optimizer compared with sgd, measures)], what the claim expects of them)
CLAIMS = (
    ("SGD stable and consistent", [(o, tuple(STABILITY_MEASURES)) for o, _ in STABILITY_COMPARISONS], "sgd_best"),
    ("Rprop unstable", [("rprop", tuple(STABILITY_MEASURES)), ("rprop_full", tuple(STABILITY_MEASURES))],
     "less stable"),
    ("Adam more stable", [("adam", tuple(STABILITY_MEASURES))], "more stable"),
    ("SGD wavier", [("adam", ("training-loss waviness",))], "more stable"),  # wavier than Adam, its foil
)


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
    clipped = sec.clipping(by)
    for o, v in by.items():
        acc = Spread.of(r["test_acc"] for r in v)
        reach = [_to_target(r, target) for r in v]
        hit = [x for x in reach if x is not None]
        rows.append([o, SETTINGS[o], f"{v[0]['lr']:.3g}", f"{v[0]['steps_per_pass']}", f"{len(v[0]['history'])}",
                     f"{len(v[0]['history']) * v[0]['steps_per_pass']}", acc.pct(),
                     f"{100 * acc.min:.1f} / {100 * acc.max:.1f}"] + ([clipped[o]] if clipped is not None else [])
                    + [Spread.of(r["history"][-1]["train_loss"] for r in v if r["history"]).fmt(".3f"),
                       f"{len(hit)}/{len(v)}",
                       Spread.of(x[0] for x in hit).fmt(".1f") if hit else "not reached",
                       Spread.of(x[0] * v[0]["steps_per_pass"] for x in hit).fmt(".0f") if hit else "not reached",
                       Spread.of(r["train_seconds"] for r in v).fmt(".1f", " s")])
    sec.table(["optimizer", "settings", "LR", "updates per pass", "passes", "updates", "final test accuracy",
               "min / max"] + ([CLIPPED_HEADER] if clipped is not None else [])
              + ["final training loss", "seeds reaching target", "passes to target", "updates to target",
                 "training time"], rows)
    png = _curves(by, ctx.stage_dir("optimizers") / f"curves_{DATASET}.png", DATASET)
    sec.image(png, f"{DATASET}: loss and accuracy per pass and per update")
    add_comparisons(sec, ctx, by, COMPARISONS)
    _stability(sec, ctx, by)
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def loss_curve(rec: dict, updates_per_point: int = 1) -> list[float]:
    """The cell's training loss once per pass; with updates_per_point > 1 (full-batch Rprop, one update an
    epoch), the mean over each run of that many epochs."""
    losses = [h["train_loss"] for h in rec["history"]]
    k = max(1, updates_per_point)
    return [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)]


def stability(curve: list[float], diverged: bool = False) -> dict[str, float]:
    """The STABILITY_MEASURES of one loss curve."""
    rises = sum(b > a for a, b in zip(curve, curve[1:])) + (1 if diverged else 0)
    moved = sum(abs(b - a) for a, b in zip(curve, curve[1:]))
    wavy = (moved - abs(curve[-1] - curve[0])) / curve[0] if len(curve) >= 2 and curve[0] > 0 else 0.0
    return {"training-loss rises": float(rises), "training-loss waviness": max(0.0, float(wavy))}


def _cell_stability(ctx: StudyContext, rec: dict) -> dict[str, float]:
    per = _steps_per_pass(ctx, "rprop") if OPTIMIZERS[rec["variant"]].get("full_batch") else 1
    return stability(loss_curve(rec, per), bool(rec.get("diverged")))


def _stability(sec: Section, ctx: StudyContext, by: dict[str, list[dict]]) -> None:
    """Each optimizer's stability measures (mean ± std over seeds), each compared with SGD's by Welch's t over
    the seeds in the report's family, and what that says of the seeds' claims."""
    from dataclasses import replace

    from training.studies.stats import compare_values
    from training.studies.sweep import unbracketed

    measures = {o: [_cell_stability(ctx, r) for r in recs] for o, recs in by.items()}
    sec.add("### Stability", "",
            "The seeds' reports call SGD \"stable and consistent\" but \"wavier\", Rprop \"unstable\" and Adam \"more "
            "stable\". Measured here on each cell's training-loss curve, **one point per pass** (the history keeps the "
            "mean training loss of each pass, not the loss of each update, so what happens between updates within a "
            "pass is averaged away; `rprop_full`'s one-update passes are averaged "
            f"{_steps_per_pass(ctx, 'rprop')} at a time, as many updates as `rprop` makes in a pass): " + "; ".join(
                f"**{m}**: {what}" for m, what in STABILITY_MEASURES.items()) + ". Lower is more stable for both. "
            f"Each optimizer on the seeds' CNN is compared with `{STABILITY_BASELINE}` "
            f"({SETTINGS[STABILITY_BASELINE]}) by Welch's t over the seeds, each comparison declared in the report's "
            "one family (the ResNet-20 pair trains another net: its measures are shown, not compared).", "")
    rows = []
    for o, vals in measures.items():
        points = len(loss_curve(by[o][0], _steps_per_pass(ctx, "rprop") if OPTIMIZERS[o].get("full_batch") else 1))
        rows.append([o, SETTINGS[o]] + [Spread.of(v[m] for v in vals).fmt(".3g") for m in STABILITY_MEASURES]
                    + [f"{points}"])
    sec.table(["optimizer", "settings"] + [f"{m} (mean ± std over seeds)" for m in STABILITY_MEASURES]
              + ["points in its loss curve"], rows)
    found = [replace(compare_values(a, [v[m] for v in measures[a]], b, [v[m] for v in measures[b]], measure=m,
                                    lower="more stable", higher="less stable"),
                     unbracketed=unbracketed(sec.sweeps, a, b))
             for a, b in STABILITY_COMPARISONS if a in measures and b in measures for m in STABILITY_MEASURES]
    sec.add(f"Stability against `{STABILITY_BASELINE}` (the first minus `{STABILITY_BASELINE}`; negative: fewer "
            "rises, less waviness; 95 % t-interval over seeds; Holm over the report's one family):", "")
    sec.add(*[c.sentence(prefix="- ") for c in found], "")
    spread = {o: Spread.of(r["test_acc"] for r in recs).std for o, recs in by.items()
              if OPTIMIZERS[o]["model"] == CNN["model"]}
    others = [v for o, v in spread.items() if o != STABILITY_BASELINE]
    sec.add("The seeds' claims, each tested by the stability comparisons it names (verdicts over the report's "
            "family; \"cannot settle\" where none of them is established):", "")
    sec.derive("training.studies.optimizers:claims_block", {
        "sgd_spread": [100 * spread[STABILITY_BASELINE], 100 * sum(others) / len(others)]
        if STABILITY_BASELINE in spread and others else None})
    sec.add("")
    sec.extra["stability"] = {o: [dict(v, seed=r["seed"]) for v, r in zip(vals, by[o])]
                              for o, vals in measures.items()}


def claims_block(comparisons, data: dict) -> str:
    """The seeds' claims as a table, judged from the stage's stability comparisons as corrected over the
    report's family (Section.derive: written again whenever the family's correction changes)."""
    by = {(c.a.split(" (")[0], c.measure): c for c in comparisons if c.measure}
    lines = ["| the seeds' claim | tested by | verdict | why |", "|---|---|---|---|"]
    for claim, tested, expects in CLAIMS:
        verdict, why = judge_claim(tested, expects, by, data.get("sgd_spread"))
        if len(tested) == len(STABILITY_COMPARISONS) and all(len(ms) == len(STABILITY_MEASURES) for _, ms in tested):
            how = f"each of the {len(tested)} other optimizers on the CNN − {STABILITY_BASELINE}: both measures"
        else:
            how = "; ".join(f"{o} − {STABILITY_BASELINE}: {', '.join(ms)}" for o, ms in tested)
        lines.append(f"| {claim} | {how} | **{verdict}** | {why} |")
    return "\n".join(lines)


def judge_claim(tested, expects: str, comparisons: dict, sgd_spread=None) -> tuple[str, str]:
    """(verdict, why) of one seed claim from the stability comparisons it names, as corrected over the family.

    "more stable" / "less stable": the claim is confirmed when at least one named comparison is established in
    that direction and none in the other; contradicted when one is established in the other direction and
    none in the claim's; otherwise the screen cannot settle it. "sgd_best" (SGD stable): contradicted when
    some optimizer is established more stable than SGD; otherwise it cannot be settled by comparisons, which
    can only find differences; and consistency (the seed spread) is not tested here."""
    said = {}
    for o, measures in tested:
        for m in measures:
            c = comparisons.get((o, m))
            if c is not None and c.established:
                said[(o, m)] = c.lower if c.diff < 0 else c.higher
    named = ", ".join(f"{o} − {STABILITY_BASELINE} {m}: {w}" for (o, m), w in said.items())
    if not [1 for o, ms in tested for m in ms if (o, m) in comparisons]:
        return "cannot settle", "its comparisons were not measured"
    if expects == "sgd_best":
        better = [k for k, w in said.items() if w == "more stable"]
        if better:
            return "contradicted", f"established: {named}"
        return "cannot settle", ("no optimizer is established more stable than SGD, but comparisons can only find "
                                 "differences, not prove SGD's stability; consistency over seeds is not tested"
                                 + (f" (SGD's test accuracy has a standard deviation of {sgd_spread[0]:.1f} points "
                                    f"over seeds, the others' {sgd_spread[1]:.1f} on average)" if sgd_spread else ""))
    other = "less stable" if expects == "more stable" else "more stable"
    if any(w == expects for w in said.values()) and not any(w == other for w in said.values()):
        return "confirmed", f"established: {named}"
    if any(w == other for w in said.values()) and not any(w == expects for w in said.values()):
        return "contradicted", f"established: {named}"
    if said:
        return "cannot settle", f"established both ways: {named}"
    return "cannot settle", "no comparison it names is established"


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
