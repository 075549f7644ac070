"""The architecture studies of the course reports, each variant at its own learning rate, on CIFAR-10:

  architectures  FC vs CNN vs residual CNN, and the regularised residual net as an ablation (BatchNorm,
                 dropout, weight decay, augmentation: each added alone to the residual net, and all four)
  kernels        3x3, 5x5, 7x7 and 1x1+3x3 at equal parameter counts; receptive fields, filters
  depth          2, 8 and 16 conv layers, plain vs residual, x initialisation: PyTorch's default, He,
                 default + BatchNorm; per-layer gradient norms
  blocks         residual block variants: basic, bottleneck at the basic block's parameter count, wide
                 (more parameters: labelled so)

The protocol, the same in every stage (one factor changes between the variants a comparison names):
  - every variant trains with the `study_sgd` recipe (SGD, Nesterov momentum, one-cycle schedule) at
    ITS OWN peak LR, chosen on held-out training images by a bracketed sweep as long as its cells, on two
    seeds no evaluation cell uses (training/studies/sweep.py); the sweep table shows the shared LR 0.05
    among the tried ones, and a comparison naming a variant whose sweep did not bracket its choice is
    "not established (LR not bracketed)";
  - every cell clips the global gradient norm at 1.0: nets without normalisation need it to live through
    their first steps, and applying it to all keeps it out of the comparisons;
  - per-epoch monitoring is on the held-out split; the final model of each seed is scored once on the
    test images, and every comparison is a difference with a 95 % t-interval over seeds and test images,
    Holm-corrected over every comparison the report declares up front (training/studies/stats.py,
    family.py);
  - anything chosen (the published best architecture and its seed) is chosen on held-out accuracy.

Each stage is a grid of cells (training/studies/runner.py) and writes its section of the study report.
Variants are data: name -> (registry model, its kwargs, training settings beyond the common recipe).
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch

from training.studies.common import (CLIPPED_HEADER, Section, Spread, StudyContext, curves_figure, grid, group,
                                     plt, train_cell)
from training.studies.runner import Cell, GridSpec

RECIPE = "study_sgd"
CLIP_NORM = 1.0            # max global gradient norm, every cell
CHANCE_MARGIN = 0.02       # a final accuracy within 2 points of chance (1 / classes) is a collapse


def variant(model: str, train: dict | None = None, **kwargs) -> dict:
    return dict(model=model, kwargs=kwargs, train=train or {})


ARCHITECTURES = {
    "fc":               variant("mlp", hidden=(512, 256)),
    "cnn":              variant("simple_cnn", n_layers=3),
    "residual":         variant("resnet_small"),                    # CIFAR ResNet-20, no normalisation
    "residual_bn":      variant("resnet_small", norm=True),
    "residual_dropout": variant("resnet_small", dropout=0.2),
    "residual_wd":      variant("resnet_small", train=dict(weight_decay=5e-4)),
    "residual_aug":     variant("resnet_small", train=dict(translate=2, flip=True)),
    "residual_all":     variant("resnet_small", norm=True, dropout=0.2,
                                train=dict(weight_decay=5e-4, translate=2, flip=True)),
}
# CNN vs FC on MNIST as well, as the seeds compared them: the same two nets, on one input channel; they share
# the stage's grids (a variant's "dataset" says where it trains)
MNIST_ARCHITECTURES = {"mnist_fc": dict(ARCHITECTURES["fc"], dataset="mnist"),
                       "mnist_cnn": dict(ARCHITECTURES["cnn"], dataset="mnist")}
ARCHITECTURE_COMPARISONS = (   # declared before any cell runs; the report's family: training/studies/family.py
    ("cnn", "fc", "(CIFAR-10)"), ("mnist_cnn", "mnist_fc", "(MNIST)"), ("residual", "cnn", ""),
    ("residual_bn", "cnn", "(the headline: CNN vs a BN residual net)"),
    ("residual_bn", "residual", ""), ("residual_dropout", "residual", ""), ("residual_wd", "residual", ""),
    ("residual_aug", "residual", ""), ("residual_all", "residual", ""),
)
KERNELS = {k: variant("kernel_cnn", kernel=k) for k in ("3x3", "5x5", "7x7", "1x1+3x3")}
KERNEL_COMPARISONS = (("5x5", "3x3", ""), ("7x7", "3x3", ""),
                      ("1x1+3x3", "3x3", "(not one factor: each of its layers is a 1x1 and a 3x3 conv, so the net "
                                         "is twice as deep, and its FLOPs differ: see above)"))
DEPTHS = (2, 16)
INITS = {"default": dict(init="torch"), "he": dict(init="kaiming"), "bn": dict(init="torch", norm=True)}
INIT_WORDS = {"default": "PyTorch's default init", "he": "He init", "bn": "default init + BatchNorm"}


def depth_variant(kind: str, depth: int, init: str) -> dict:
    """`plain` or `residual` conv layers, `depth` of them, with an init of INITS."""
    return variant("depth_cnn", depth=depth, residual=kind == "residual", **INITS[init])


DEPTH = {f"{kind}_{d}_{i}": depth_variant(kind, d, i) for i in INITS for kind in ("plain", "residual") for d in DEPTHS}
DEPTH_COMPARISONS = tuple((f"residual_{d}_{i}", f"plain_{d}_{i}", "") for i in INITS for d in DEPTHS) + (
    (f"plain_{DEPTHS[-1]}_he", f"plain_{DEPTHS[-1]}_default", "(init alone)"),
    (f"plain_{DEPTHS[-1]}_bn", f"plain_{DEPTHS[-1]}_default", "(BatchNorm alone)"))
BLOCKS = {"basic": variant("resblock_net", block="basic"),
          "bottleneck": variant("resblock_net", block="bottleneck"),   # widths matched in _blocks_variants
          "wide": variant("resblock_net", block="wide")}
BLOCK_COMPARISONS = (("bottleneck", "basic", "(matched parameters)"), ("wide", "basic", ""))


# ---------------------------------------------------------------- running a stage: sweep, then seeds


def base_lr(recipe: str = RECIPE) -> float:
    """The recipe's peak LR at the study's batch size of 128 (LRs scale with the batch: recipes.py)."""
    from training.recipes import make_config

    return make_config(recipe, batch_size=128).lr


def _run(ctx: StudyContext, stage: str, variants: dict, dataset: str = "cifar10", probe=None, inspect=None,
         recipe: str = RECIPE):
    """Sweep each variant's LR on held-out images, then train it with every seed at its chosen LR.
    Returns (variant -> LRChoice, cell id -> record)."""
    from training.studies.sweep import sweep_lrs

    def sweep_cell(v: str, lr: float, seed: int, epochs: float) -> dict:
        s = variants[v]
        rec = train_cell(ctx, s.get("dataset", dataset), s["model"], s["kwargs"], seed, recipe=recipe, stage=stage,
                         train={**s["train"], "lr": lr, "epochs": epochs, "grad_clip": CLIP_NORM},
                         evaluate_on="val")
        return dict(rec, variant=v, lr=lr)

    choices = sweep_lrs(ctx, stage, {v: s.get("dataset", dataset) for v, s in variants.items()},
                        {v: base_lr(recipe) for v in variants}, sweep_cell,
                        config={"recipe": recipe, "variants": variants, "grad_clip": CLIP_NORM})
    lrs = {v: c.chosen for v, c in choices.items()}

    def run_cell(cell: Cell) -> dict:
        s = variants[cell.variant]
        hook = probe() if probe else None
        look = None
        if inspect is not None and cell.seed == ctx.preset.seeds[0]:  # pictures: the first seed's nets only
            look = lambda net, test: inspect(net, _first_image(ctx, cell.dataset))  # noqa: E731
        rec = train_cell(ctx, cell.dataset, s["model"], s["kwargs"], cell.seed, recipe=recipe, stage=stage,
                         train={**s["train"], "lr": lrs[cell.variant], "grad_clip": CLIP_NORM},
                         after_backward=hook, inspect=look)
        if hook is not None:
            rec["grad_norms"] = hook.result()
        return dict(rec, variant=cell.variant, lr=lrs[cell.variant])

    cells = [Cell(spec.get("dataset", dataset), v, s) for v, spec in variants.items() for s in ctx.preset.seeds]
    config = {"stage": stage, "recipe": recipe, "variants": variants, "lrs": lrs, "grad_clip": CLIP_NORM,
              "preset": ctx.preset.name, "train_limit": ctx.preset.train_limit, "test_limit": ctx.preset.test_limit,
              "val_images": ctx.preset.val_images, "epochs": ctx.preset.epochs_for(stage),
              "batch_size": ctx.preset.batch_size, "data_seed": ctx.data_seed}
    return choices, grid(ctx, GridSpec(stage, cells, config, run_cell))


def _by_variant(recs: dict) -> dict[str, list[dict]]:
    return {k[0]: v for k, v in group(recs, "variant").items()}


def collapsed(rec: dict) -> bool:
    return bool(rec.get("diverged")) or rec["test_acc"] <= 1 / len(rec["per_class_accuracy"]) + CHANCE_MARGIN


def _last_epoch_gain(recs: list[dict]) -> float | None:
    """Mean held-out accuracy gained in the last epoch: clearly above 0 means still improving."""
    gains = [r["history"][-1]["val_acc"] - r["history"][-2]["val_acc"] for r in recs if len(r["history"]) >= 2]
    return statistics.fmean(gains) if gains else None


HEADER = ["variant", "parameters", "its LR", "test accuracy", "median / min / max", "collapsed seeds",
          "held-out gain in the last epoch, points", "train accuracy (eval)", "overfitting gap, points",
          "training time", "inference ms/image, batch 1 / 256"]


def _row(name: str, recs: list[dict]) -> list:
    acc, gap = Spread.of(r["test_acc"] for r in recs), Spread.of(r["gap"] for r in recs)
    gain = _last_epoch_gain(recs)
    n_coll = sum(collapsed(r) for r in recs)
    return [name, f"{recs[0]['params']:,}", f"{recs[0]['lr']:.3g}", acc.pct(),
            f"{100 * statistics.median(r['test_acc'] for r in recs):.1f} / {100 * acc.min:.1f} / {100 * acc.max:.1f}",
            f"**{n_coll} of {len(recs)}**" if n_coll else f"0 of {len(recs)}",
            "n/a" if gain is None else (f"{100 * gain:+.1f}" + (" (still improving)" if gain > 0.005 else "")),
            Spread.of(r["train_eval_acc"] for r in recs).pct(), f"{100 * gap.mean:+.1f} ± {100 * gap.std:.1f}",
            Spread.of(r["train_seconds"] for r in recs).fmt(".1f", " s"),
            f"{Spread.of(r['infer_ms_b1'] for r in recs).mean:.2f} / {Spread.of(r['infer_ms_b256'] for r in recs).mean:.3f}"]


def _table(sec: Section, by: dict[str, list[dict]], names) -> None:
    """The stage's table of these variants (HEADER), with each one's share of clipped steps after its
    accuracy when its cells clip (Section.clipping)."""
    names = [v for v in names if v in by]
    clipped = sec.clipping({v: by[v] for v in names})
    header, rows = list(HEADER), [_row(v, by[v]) for v in names]
    if clipped is not None:
        at = HEADER.index("collapsed seeds") + 1
        header.insert(at, CLIPPED_HEADER)
        for v, row in zip(names, rows):
            row.insert(at, clipped[v])
    sec.table(header, rows)


def budget_line(ctx: StudyContext, stage: str, recs: dict) -> str:
    from training.studies.sweep import sweep_epochs

    r = next(iter(recs.values()))
    epochs = ctx.preset.epochs_for(stage)
    steps = math.ceil(r["train_images"] / ctx.preset.batch_size) * epochs
    return (f"Budget per cell: {r['train_images']:,} training images x {epochs:g} epochs = {steps:.0f} steps of "
            f"{ctx.preset.batch_size} images; monitored on {r['val_images']:,} held-out images, scored on "
            f"{r['test_images']:,} test images; sweeps: {sweep_epochs(epochs):g} epoch(s) per LR and seed, as the "
            "cells train. At this budget the "
            "nets are not converged: a variant whose held-out accuracy still rose in the last epoch (its column in "
            "the table) is measured before convergence, and so are its gap and its rank.")


def add_sweep(sec: Section, ctx: StudyContext, stage: str, choices: dict) -> None:
    from training.studies.sweep import sweep_epochs, sweep_table

    sec.add("Learning rates: each variant's own, from its sweep (held-out accuracy; the test images are not "
            f"read; the shared recipe's LR is {base_lr():g}):", "")
    sec.table(*sweep_table(choices, sweep_epochs(ctx.preset.epochs_for(stage))))
    sec.sweeps = {v: c.as_dict() for v, c in choices.items()}


def add_comparisons(sec: Section, ctx: StudyContext, by: dict[str, list[dict]], declared) -> list:
    """The declared comparisons whose variants both ran, each a difference with its interval and verdict
    (corrected over the report's family when the section is written: training/studies/family.py)."""
    from dataclasses import replace

    from training.studies.family import size
    from training.studies.stats import compare_pair, correct_matrix
    from training.studies.sweep import unbracketed

    out = [replace(compare_pair(a, correct_matrix(by[a]), b, correct_matrix(by[b]), note),
                   unbracketed=unbracketed(sec.sweeps, a, b)) for a, b, note in declared if a in by and b in by]
    sec.add(f"Comparisons, declared before the runs (test accuracy of the first minus the second; 95 % t-interval "
            f"over seeds, with the test images' share paired per image; Holm over the report's one family of "
            f"{size(ctx.preset.name)} declared comparisons, of which this stage makes {len(out)}: "
            "training/studies/stats.py, family.py):", "")
    sec.add(*[c.sentence(prefix="- ") for c in out], "")
    return out


# ---------------------------------------------------------------- 1. FC vs CNN vs residual


def architectures(ctx: StudyContext, command: str) -> Section:
    t0 = time.perf_counter()
    choices, recs = _run(ctx, "architectures", {**ARCHITECTURES, **MNIST_ARCHITECTURES})
    both = _by_variant(recs)
    by = {v: r for v, r in both.items() if v in ARCHITECTURES}           # CIFAR-10
    mnist = {v: r for v, r in both.items() if v in MNIST_ARCHITECTURES}
    sec = Section("architectures", "1. Fully connected vs CNN vs residual CNN, and what regularises the residual net",
                  command)
    sec.add("CIFAR-10, and the seeds' CNN vs the fully connected net on MNIST too (`mnist_cnn`, `mnist_fc`: the same "
            "two nets on one input channel, each at its own LR; both near their ceiling there, so expect a small "
            "difference). `fc`: an MLP 512-256; `cnn`: the seeds' 3-layer CNN; `residual`: CIFAR "
            "ResNet-20 without normalisation. The regularised residual net is taken apart: BatchNorm after every "
            "conv (`_bn`), dropout 0.2 before the head (`_dropout`), weight decay 5e-4 (`_wd`), flip and 2-pixel "
            "translation (`_aug`), each added alone to `residual`, and all four (`_all`). Every variant at its own "
            "LR; accuracy is mean ± standard deviation over seeds; the gap is training accuracy (eval mode) minus "
            "test accuracy.", "", budget_line(ctx, "architectures", recs), "")
    add_sweep(sec, ctx, "architectures", choices)
    _table(sec, by, ARCHITECTURES)
    png = curves_figure({v: by[v] for v in ARCHITECTURES if v in by},
                        ctx.stage_dir("architectures") / "curves_cifar10.png", "cifar10: learning curves")
    sec.image(png, "cifar10 learning curves")
    sec.add("MNIST, the seeds' CNN and the fully connected net (their LRs are in the sweep table above):", "")
    _table(sec, mnist, MNIST_ARCHITECTURES)
    png = curves_figure({v: mnist[v] for v in MNIST_ARCHITECTURES if v in mnist},
                        ctx.stage_dir("architectures") / "curves_mnist.png", "mnist: learning curves")
    sec.image(png, "mnist learning curves")
    add_comparisons(sec, ctx, both, ARCHITECTURE_COMPARISONS)
    # the best, chosen on held-out accuracy (never on the test images), and its median seed by the same
    best = max(by, key=lambda v: statistics.fmean(r["val_acc"] for r in by[v]))
    median = sorted(by[best], key=lambda r: r["val_acc"])[len(by[best]) // 2]
    png = _confusion(median, ctx.stage_dir("architectures") / "confusion_cifar10.png",
                     f"cifar10: {best}, seed {median['seed']} (median held-out seed), {100 * median['test_acc']:.1f}%")
    sec.image(png, "confusion matrix of the best variant on cifar10")
    from training.studies.common import publish_model

    v = ARCHITECTURES[best]
    pub = publish_model(ctx, f"cifar10-{v['model'].replace('_', '-')}-study", "cifar10", v["model"], v["kwargs"],
                        recipe=RECIPE, train={**v["train"], "lr": median["lr"], "grad_clip": CLIP_NORM,
                                              "epochs": ctx.preset.epochs_for("architectures"), "seed": median["seed"]},
                        description=f"the best architecture of the study on held-out accuracy ({best}), "
                                    f"seed {median['seed']}")
    sec.add(f"The best variant on held-out accuracy ({best}, mean {100 * statistics.fmean(r['val_acc'] for r in by[best]):.1f} "
            f"% held-out) was retrained with its median held-out seed ({median['seed']}) through the model pipeline "
            f"(export with its parity gate) and published as `{pub['tag']}`: served accuracy "
            f"{100 * pub['served_accuracy']:.2f}% on the whole test set, which played no part in choosing it.", "")
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def _confusion(rec: dict, path, title: str):
    p = plt()
    cm = np.asarray(rec["confusion"])
    classes = list(rec["per_class_accuracy"])
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = p.subplots(figsize=(6.5, 5.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


# ---------------------------------------------------------------- 2. kernel size


def _first_image(ctx: StudyContext, dataset: str) -> torch.Tensor:
    """The first test image of the stage, normalised as in training: (1, C, H, W)."""
    from training import data as D

    *_, test, spec = ctx.data(dataset)
    return D.to_float(test.images[:1], spec)


def _first_layer(net, x: torch.Tensor) -> dict:
    """The first conv's filters (16) and its activations on one test image, for drawing."""
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    acts = {}
    handle = conv.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        net.eval()(x)
    handle.remove()
    return {"filters": conv.weight.detach()[:16].float().tolist(), "activation": acts["a"][0, :16].float().tolist()}


def kernels(ctx: StudyContext, command: str) -> Section:
    from models import create_model
    from models.kernel_cnn import kernel_variants
    from models.receptive_field import analytic_receptive_field, empirical_receptive_field
    from training.pipeline import count_flops

    t0 = time.perf_counter()
    choices, recs = _run(ctx, "kernels", KERNELS, inspect=_first_layer)
    sec = Section("kernels", "2. Kernel size at equal parameter counts", command)
    rows = kernel_variants()
    flops = {k: count_flops(create_model("kernel_cnn", kernel=k), (3, 32, 32)) for k in KERNELS}
    sec.add("The four variants are one 4-layer CNN (Conv-BN-ReLU, a 2x2 max-pool after every second layer) whose "
            "width is solved per kernel so that the parameter counts agree within 5% "
            "(target 150,000: " + ", ".join(f"{k} {r['params']:,} ({100 * r['rel_error']:+.1f}%)"
                                             for k, r in rows.items()) + "). At equal parameters the compute is "
            "about equal too: " + ", ".join(f"{k} {flops[k] / 1e6:.0f}" for k in KERNELS) + " MFLOPs per image.",
            "", budget_line(ctx, "kernels", recs), "")
    add_sweep(sec, ctx, "kernels", choices)
    by = _by_variant(recs)
    _table(sec, by, KERNELS)
    # receptive fields: computed, then checked by the gradient support of one output unit
    rf_rows = []
    for k in KERNELS:
        net = create_model("kernel_cnn", kernel=k)
        layers = [layer for layer in analytic_receptive_field(net)]
        measured = [empirical_receptive_field(net, layer.name, image_size=96)[0] for layer in layers]
        ok = all(a.rf == m for a, m in zip(layers, measured))
        rf_rows.append([k, " ".join(f"{a.rf}" for a in layers), " ".join(str(m) for m in measured),
                        "yes" if ok else "**NO**"])
    sec.add("Receptive field after each conv/pool layer, in input pixels: computed by the recurrence "
            "rf += (k - 1) x jump, jump x= stride, and measured as the nonzero support of the gradient of the centre "
            "unit of that layer with respect to the input (models/receptive_field.py).", "")
    sec.table(["kernel", "computed, per layer", "measured, per layer", "equal"], rf_rows)
    png = curves_figure({v: by[v] for v in KERNELS if v in by}, ctx.stage_dir("kernels") / "curves.png",
                        "kernel size: learning curves (CIFAR-10)")
    sec.image(png, "kernel size learning curves")
    png = _draw_first_layers({v: next((r for r in by[v] if r.get("inspect")), None) for v in KERNELS if v in by},
                             ctx.stage_dir("kernels") / "first_layer.png")
    sec.image(png, "first-layer filters and activations")
    add_comparisons(sec, ctx, by, KERNEL_COMPARISONS)
    sec.add("- Time: " + "; ".join(f"{v} trains in {Spread.of(r['train_seconds'] for r in by[v]).mean:.0f} s and "
                                     f"infers {Spread.of(r['infer_ms_b256'] for r in by[v]).mean:.3f} ms/image"
                                     for v in KERNELS if v in by) + ".", "")
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def _draw_first_layers(recs: dict, path):
    p = plt()
    names = [v for v, r in recs.items() if r and r.get("inspect")]
    fig, axes = p.subplots(len(names), 2, figsize=(10, 2.6 * len(names)), squeeze=False)
    for row, v in zip(axes, names):
        ins = recs[v]["inspect"]
        w = np.asarray(ins["filters"])          # out, in, k, k
        row[0].imshow(_tile(_filters_rgb(w)), interpolation="nearest")
        row[0].set_title(f"{v}: first-layer filters (16 of them)", fontsize=9)
        act = np.asarray(ins["activation"])     # c, h, w
        act = (act - act.min()) / max(act.max() - act.min(), 1e-9)
        row[1].imshow(_tile(act[..., None].repeat(3, -1)), interpolation="nearest")
        row[1].set_title(f"{v}: their activations on one test image", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


def _filters_rgb(w: np.ndarray) -> np.ndarray:
    """(out, in, k, k) -> (out, k, k, 3), each filter scaled to 0..1 (grey when it has one input channel)."""
    w = w.transpose(0, 2, 3, 1)
    if w.shape[-1] != 3:
        w = w.mean(-1, keepdims=True).repeat(3, -1)
    lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
    return (w - lo) / np.maximum(hi - lo, 1e-9)


def _tile(images: np.ndarray, cols: int = 8, pad: int = 1) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c))
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return out


# ---------------------------------------------------------------- 3. depth and gradients


class GradProbe:
    """Called after every backward pass: every `every` steps, the gradient norm of each conv layer's weight
    (input side first) and of all parameters together (what clip_grad_norm_ would see)."""

    def __init__(self, every: int = 5):
        self.every, self.step, self.samples = every, 0, []

    def __call__(self, model) -> None:
        self.step += 1
        if (self.step - 1) % self.every:
            return
        convs = model.conv_layers()
        norms = [float(c.weight.grad.norm()) for c in convs]
        total = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                            if p.grad is not None])))
        self.samples.append({"step": self.step, "layers": norms, "total": total})

    def result(self) -> dict:
        return {"every": self.every, "samples": self.samples}


def _feature_maps(net, x: torch.Tensor) -> dict:
    """Each conv layer's output on one test image, as the mean |activation| over channels."""
    maps = []
    handles = [layer.register_forward_hook(lambda m, i, o: maps.append(o.detach()[0].abs().mean(0).tolist()))
               for layer in net.features.layers]
    with torch.no_grad():
        net.eval()(x)
    for h in handles:
        h.remove()
    return {"feature_maps": maps}


def depth(ctx: StudyContext, command: str) -> Section:
    t0 = time.perf_counter()
    choices, recs = _run(ctx, "depth", DEPTH, probe=GradProbe, inspect=_feature_maps)
    deepest = DEPTHS[-1]
    by = _by_variant(recs)
    sec = Section("depth", "3. Depth and gradients: plain vs residual, and the initialisation", command)
    sec.add("`depth_cnn`: `depth` 3x3 conv layers of width 32 (a 2x2 max-pool after the first, global average "
            "pooling before the head). Two factors besides depth, one at a time: the identity skips (`plain` vs "
            "`residual`) and the initialisation, **`default`** (PyTorch's conv init: a third of He's variance, so "
            "the signal and the gradient shrink at every plain layer), **`he`** (He / Kaiming fan-in init) and "
            "**`bn`** (the default init with BatchNorm after every conv). Every cell clips the global gradient "
            f"norm at {CLIP_NORM:g} (as every study cell does), each variant at its own LR.", "",
            budget_line(ctx, "depth", recs), "")
    add_sweep(sec, ctx, "depth", choices)
    _table(sec, by, DEPTH)
    d = ctx.stage_dir("depth")
    sec.image(_depth_plot(by, d / "accuracy_vs_depth.png"), "accuracy against depth")
    sec.image(_grad_plot(by, deepest, d / "gradient_norms.png"), "per-layer gradient norms")
    sec.image(_feature_plot(by, 8 if 8 in DEPTHS else deepest, d / "feature_maps.png"), "feature maps")
    add_comparisons(sec, ctx, by, DEPTH_COMPARISONS)
    sec.add("Gradient flow at the deepest setting (the first conv layer's gradient norm over the last one's, mean "
            "over the sampled steps of training):", "")
    for init in INITS:
        for kind in ("plain", "residual"):
            recs_v = by.get(f"{kind}_{deepest}_{init}")
            if recs_v:
                first = [np.mean([s["layers"][0] for s in r["grad_norms"]["samples"]]) for r in recs_v]
                last = [np.mean([s["layers"][-1] for s in r["grad_norms"]["samples"]]) for r in recs_v]
                ratio = Spread.of([f / max(la, 1e-30) for f, la in zip(first, last)])
                sec.add(f"- {kind}, {deepest} layers, {INIT_WORDS[init]}: {ratio.mean:.2g} (seed range "
                        f"{ratio.min:.2g}..{ratio.max:.2g}, {ratio.n} seeds)"
                        + ("; its early layers starve." if ratio.max < 0.1 else "."))
    sec.add("")
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def _depth_plot(by: dict, path):
    p = plt()
    fig, axes = p.subplots(1, len(INITS), figsize=(5 * len(INITS), 4), sharey=True, squeeze=False)
    for ax, init in zip(axes[0], INITS):
        for kind, style in (("plain", "o-"), ("residual", "s-")):
            xs, meds, lo, hi = [], [], [], []
            for dep in DEPTHS:
                recs = by.get(f"{kind}_{dep}_{init}")
                if recs:
                    accs = [100 * r["test_acc"] for r in recs]
                    med = statistics.median(accs)  # the median: a collapsed seed drags a mean half-way
                    xs.append(dep), meds.append(med)
                    lo.append(max(0.0, med - min(accs))), hi.append(max(0.0, max(accs) - med))
            ax.errorbar(xs, meds, yerr=[lo, hi], fmt=style, capsize=4, label=f"{kind} (median, min-max)")
        ax.set(xlabel="conv layers", title=INIT_WORDS[init])
        ax.set_xticks(list(DEPTHS))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy, %")
    fig.suptitle("accuracy against depth (CIFAR-10), each variant at its own LR")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


def _grad_plot(by: dict, dep: int, path):
    """Per-layer gradient norm (log) at the start, middle and end of training, per init, plain vs residual."""
    p = plt()
    fig, axes = p.subplots(len(INITS), 2, figsize=(11, 3.4 * len(INITS)), sharey=True, squeeze=False)
    for row, init in zip(axes, INITS):
        for ax, kind in zip(row, ("plain", "residual")):
            recs = by.get(f"{kind}_{dep}_{init}")
            if not recs:
                continue
            n = min(len(r["grad_norms"]["samples"]) for r in recs)
            for frac, label in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
                i = min(n - 1, int(frac * (n - 1)))
                norms = np.array([r["grad_norms"]["samples"][i]["layers"] for r in recs])
                ax.semilogy(np.arange(1, norms.shape[1] + 1), norms.mean(0), "o-", ms=3,
                            label=f"{label} of training (step {recs[0]['grad_norms']['samples'][i]['step']})")
                ax.fill_between(np.arange(1, norms.shape[1] + 1), norms.min(0), norms.max(0), alpha=0.15)
            ax.set(xlabel="conv layer (1 = input side)", title=f"{kind}, {dep} layers, {INIT_WORDS[init]}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        row[0].set_ylabel("||dL/dW|| (mean, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


def _feature_plot(by: dict, dep: int, path):
    p = plt()
    cols = [(v, next((r for r in by.get(f"{v}_{dep}_default", []) if r.get("inspect")), None))
            for v in ("plain", "residual")]
    cols = [(v, r) for v, r in cols if r]
    n = max((len(r["inspect"]["feature_maps"]) for _, r in cols), default=0)
    fig, axes = p.subplots(len(cols), n, figsize=(1.6 * n, 1.9 * len(cols)), squeeze=False)
    for row, (v, r) in zip(axes, cols):
        for i, ax in enumerate(row):
            ax.axis("off")
            if i < len(r["inspect"]["feature_maps"]):
                ax.imshow(np.asarray(r["inspect"]["feature_maps"][i]), cmap="magma")
                ax.set_title(f"{v} L{i + 1}", fontsize=8)
    fig.suptitle(f"mean |activation| after each layer, one test image ({dep} layers, default init; same image)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


# ---------------------------------------------------------------- 4. residual block variants


def _blocks_variants(ctx: StudyContext) -> dict:
    """The block variants with the bottleneck's widths solved to the basic block's parameter count and the
    wide block at the preset's widening (half width on a CPU)."""
    from models import count_parameters, create_model

    target = count_parameters(create_model("resblock_net", block="basic"))
    w = min(range(4, 33), key=lambda w: abs(count_parameters(create_model(
        "resblock_net", block="bottleneck", widths=(w, 2 * w, 4 * w))) - target))
    widen = {"quick": 2, "smoke": 2}.get(ctx.preset.name, 4)
    return {"basic": BLOCKS["basic"],
            "bottleneck": variant("resblock_net", block="bottleneck", widths=(w, 2 * w, 4 * w)),
            "wide": variant("resblock_net", block="wide", widen=widen)}


def blocks(ctx: StudyContext, command: str) -> Section:
    from models import create_model
    from training.pipeline import count_flops

    t0 = time.perf_counter()
    variants = _blocks_variants(ctx)
    choices, recs = _run(ctx, "blocks", variants)
    by = _by_variant(recs)
    sec = Section("blocks", "4. Residual block variants: basic, bottleneck, wide", command)
    size = {v: (by[v][0]["params"], count_flops(create_model(s["model"], **s["kwargs"]), (3, 32, 32)))
            for v, s in variants.items() if v in by}
    note = {}
    if "wide" in size and "basic" in size:
        note["wide"] = (f"(not matched: the wide net has {size['wide'][0] / size['basic'][0]:.1f}x the parameters "
                        f"and {size['wide'][1] / size['basic'][1]:.1f}x the FLOPs of the basic one)")
    sec.add("One CIFAR ResNet (2 blocks per stage, BatchNorm) with three blocks: basic (two 3x3 convs, widths "
            "16/32/64), bottleneck (1x1 reduce, 3x3, 1x1 expand x4; its widths "
            f"{'/'.join(map(str, variants['bottleneck']['kwargs']['widths']))} solved so that it has the basic "
            "net's parameter count) and wide (the basic block "
            f"{variants['wide']['kwargs']['widen']}x wider, after Zagoruyko & Komodakis: **more parameters and "
            "compute, not a matched comparison**). Stability is the spread over seeds.", "",
            budget_line(ctx, "blocks", recs), "")
    add_sweep(sec, ctx, "blocks", choices)
    rows = []
    clipped = sec.clipping({v: by[v] for v in variants if v in by})
    for v in variants:
        if v not in by:
            continue
        acc = Spread.of(r["test_acc"] for r in by[v])
        rows.append([v, f"{size[v][0]:,}", f"{size[v][1] / 1e6:.1f}", f"{by[v][0]['lr']:.3g}", acc.pct(),
                     f"{100 * acc.std:.2f}", f"{100 * (acc.max - acc.min):.2f}"]
                    + ([clipped[v]] if clipped is not None else [])
                    + [Spread.of(r["train_seconds"] for r in by[v]).fmt(".1f", " s")])
    sec.table(["block", "parameters", "MFLOPs/image", "its LR", "test accuracy", "std over seeds, points",
               "max - min, points"] + ([CLIPPED_HEADER] if clipped is not None else []) + ["training time"], rows)
    _table(sec, by, variants)
    png = curves_figure({v: by[v] for v in variants if v in by}, ctx.stage_dir("blocks") / "curves.png",
                        "residual block variants: learning curves (CIFAR-10)")
    sec.image(png, "block variants learning curves")
    add_comparisons(sec, ctx, by, tuple((a, b, note.get(a, n)) for a, b, n in BLOCK_COMPARISONS))
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


# ---------------------------------------------------------------- the headline comparisons, near convergence

HEADLINE_RECIPE = "sgd_onecycle"   # Nesterov SGD, one-cycle, weight decay 5e-4, flip + translate: a BN recipe
HEADLINE = {"cnn": ARCHITECTURES["cnn"], "residual_bn": ARCHITECTURES["residual_bn"],
            f"plain_{DEPTHS[-1]}_bn": DEPTH[f"plain_{DEPTHS[-1]}_bn"],
            f"residual_{DEPTHS[-1]}_bn": DEPTH[f"residual_{DEPTHS[-1]}_bn"]}
HEADLINE_COMPARISONS = (("residual_bn", "cnn", "(near convergence)"),
                        (f"residual_{DEPTHS[-1]}_bn", f"plain_{DEPTHS[-1]}_bn", "(near convergence)"))
HEADLINE_EPOCHS = {"smoke": 1, "quick": 15, "full": 40}


def headline(ctx: StudyContext, command: str) -> Section:
    """The two comparisons the report leads with, trained on the whole training set for many epochs with a
    recipe for BatchNorm nets: the other stages' budgets leave the nets short of convergence. Hours on a
    2-core CPU, so it runs only when named (--only headline)."""
    from dataclasses import replace

    epochs = HEADLINE_EPOCHS.get(ctx.preset.name, HEADLINE_EPOCHS["quick"])
    full = replace(ctx, _data={}, preset=replace(
        ctx.preset, train_limit={**ctx.preset.train_limit, "cifar10": 0} if ctx.preset.name != "smoke"
        else ctx.preset.train_limit, epochs={"default": epochs},
        description=f"{ctx.preset.description}; this stage: every training image but the held-out ones, "
                    f"{epochs} epochs"))
    t0 = time.perf_counter()
    choices, recs = _run(full, "headline", HEADLINE, recipe=HEADLINE_RECIPE)
    by = _by_variant(recs)
    sec = Section("headline", "0. The headline comparisons, near convergence", command)
    sec.add(f"CNN vs a BatchNorm residual net, and residual vs plain at {DEPTHS[-1]} layers (both with BatchNorm), "
            f"on every training image but the held-out ones, {epochs} epochs of `{HEADLINE_RECIPE}` (Nesterov SGD, "
            "one-cycle, weight decay 5e-4, flips and 2-pixel shifts), each variant at its own swept LR.", "",
            budget_line(full, "headline", recs), "")
    add_sweep(sec, full, "headline", choices)
    _table(sec, by, HEADLINE)
    png = curves_figure({v: by[v] for v in HEADLINE if v in by}, ctx.stage_dir("headline") / "curves.png",
                        "headline comparisons: learning curves (CIFAR-10)")
    sec.image(png, "headline learning curves")
    add_comparisons(sec, ctx, by, HEADLINE_COMPARISONS)
    sec.write(full, time.perf_counter() - t0, recs)
    return sec


STAGES = {"architectures": architectures, "kernels": kernels, "depth": depth, "blocks": blocks}
