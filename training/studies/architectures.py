"""The architecture studies of the course reports, every figure over seeds (issue 10):

  architectures  FC vs CNN vs residual CNN (and the regularised residual net), MNIST and CIFAR-10
  kernels        3x3, 5x5, 7x7 and 1x1+3x3 at equal parameter counts; receptive fields, filters
  depth          2..16 conv layers, plain vs residual; per-layer gradient norms; gradient clipping
  blocks         residual block variants: basic, bottleneck, wide

Each stage is a grid of cells (training/studies/runner.py) and writes its section of the study report.
Variants are data: name -> (registry model, its kwargs, training settings beyond the common recipe).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from training.studies.common import (Section, Spread, StudyContext, compare, curves_figure, grid, group, plt,
                                     train_cell)
from training.studies.runner import Cell, GridSpec

RECIPE = "study_sgd"   # one optimizer and schedule for every architecture (training/recipes.py)

ARCHITECTURES = {
    "fc":           dict(model="mlp", kwargs=dict(hidden=(512, 256))),
    "cnn":          dict(model="simple_cnn", kwargs=dict(n_layers=3)),
    "residual":     dict(model="resnet_small", kwargs={}),
    "residual_reg": dict(model="resnet_small_reg", kwargs={},
                         train=dict(weight_decay=5e-4, translate=2, flip=True)),  # + BN and dropout in the net
}
KERNELS = {k: dict(model="kernel_cnn", kwargs=dict(kernel=k)) for k in ("3x3", "5x5", "7x7", "1x1+3x3")}
DEPTHS = (2, 4, 6, 8, 16)
DEPTH = {f"{'residual' if res else 'plain'}_{d}": dict(model="depth_cnn", kwargs=dict(depth=d, residual=res))
         for res in (False, True) for d in DEPTHS}
CLIP_NORM = 1.0
DEPTH.update({f"{v}_{DEPTHS[-1]}_clip": dict(model="depth_cnn", kwargs=dict(depth=DEPTHS[-1], residual=v == "residual"),
                                             train=dict(grad_clip=CLIP_NORM)) for v in ("plain", "residual")})
BLOCKS = {b: dict(model="resblock_net", kwargs=dict(block=b)) for b in ("basic", "bottleneck", "wide")}


def _grid(ctx: StudyContext, stage: str, datasets: tuple[str, ...], variants: dict, probe=None, inspect=None):
    """Run (or resume) the grid of a stage; returns cell id -> record."""
    widen = {"quick": 2, "smoke": 2}.get(ctx.preset.name)  # the wide block at half width on a CPU
    variants = {k: (dict(v, kwargs={**v["kwargs"], "widen": widen}) if k == "wide" and widen else v)
                for k, v in variants.items()}

    def run_cell(cell: Cell) -> dict:
        v = variants[cell.variant]
        hook = probe() if probe else None
        look = None
        if inspect is not None and cell.seed == ctx.preset.seeds[0]:  # pictures: the first seed's nets only
            look = lambda net, test: inspect(net, _first_image(ctx, cell.dataset))  # noqa: E731
        rec = train_cell(ctx, cell.dataset, v["model"], v["kwargs"], cell.seed, recipe=RECIPE, train=v.get("train"),
                         stage=stage, after_backward=hook, inspect=look)
        if hook is not None:
            rec["grad_norms"] = hook.result()
        rec["variant"] = cell.variant
        return rec

    cells = [Cell(d, v, s) for d in datasets for v in variants for s in ctx.preset.seeds]
    config = {"stage": stage, "recipe": RECIPE, "variants": variants, "preset": ctx.preset.name,
              "train_limit": ctx.preset.train_limit, "test_limit": ctx.preset.test_limit,
              "epochs": ctx.preset.epochs_for(stage), "batch_size": ctx.preset.batch_size, "data_seed": ctx.data_seed}
    return grid(ctx, GridSpec(stage, cells, config, run_cell))


def _row(name: str, recs: list[dict]) -> list:
    acc, gap = Spread.of(r["test_acc"] for r in recs), Spread.of(r["gap"] for r in recs)
    return [name, f"{recs[0]['params']:,}", acc.pct(), f"{100 * acc.min:.1f} / {100 * acc.max:.1f}",
            Spread.of(r["train_eval_acc"] for r in recs).pct(), f"{100 * gap.mean:+.1f} ± {100 * gap.std:.1f}",
            Spread.of(r["train_seconds"] for r in recs).fmt(".1f", " s"),
            f"{Spread.of(r['infer_ms_b1'] for r in recs).mean:.2f} / {Spread.of(r['infer_ms_b256'] for r in recs).mean:.3f}"]


HEADER = ["variant", "parameters", "test accuracy", "min / max", "train accuracy (eval)", "overfitting gap, points",
          "training time", "inference ms/image, batch 1 / 256"]


def _accs(recs: list[dict]) -> list[float]:
    return [r["test_acc"] for r in recs]


# ---------------------------------------------------------------- 1. FC vs CNN vs residual


def architectures(ctx: StudyContext, command: str) -> Section:
    t0 = time.perf_counter()
    recs = _grid(ctx, "architectures", ("mnist", "cifar10"), ARCHITECTURES)
    sec = Section("architectures", "1. Fully connected vs CNN vs residual CNN", command)
    sec.add(f"Every variant trains with the same recipe (`{RECIPE}`: SGD with Nesterov momentum, one-cycle LR, "
            f"{ctx.preset.epochs_for('architectures'):g} epoch(s), batch {ctx.preset.batch_size}); the regularised "
            "residual net adds BatchNorm and dropout (in the model) and weight decay 5e-4 with flip and translate "
            "augmentation (in training). Accuracy is mean ± standard deviation over seeds; the gap is training "
            "accuracy (eval mode, as many training images as test images) minus test accuracy.", "")
    by = group(recs, "dataset", "variant")
    for ds in ("mnist", "cifar10"):
        sec.add(f"### {ds}", "")
        sec.table(HEADER, [_row(v, by[(ds, v)]) for v in ARCHITECTURES if (ds, v) in by])
        png = curves_figure({v: by[(ds, v)] for v in ARCHITECTURES if (ds, v) in by},
                            ctx.stage_dir("architectures") / f"curves_{ds}.png", f"{ds}: learning curves")
        sec.image(png, f"{ds} learning curves")
        a = {v: _accs(by[(ds, v)]) for v in ARCHITECTURES if (ds, v) in by}
        sec.add("Conclusions, with their numbers:", "",
                "- " + compare("CNN", a["cnn"], "FC", a["fc"]),
                "- " + compare("residual", a["residual"], "CNN", a["cnn"]),
                "- " + compare("regularised residual", a["residual_reg"], "plain residual", a["residual"]),
                "- Overfitting gap: " + "; ".join(
                    f"{v} {100 * Spread.of(r['gap'] for r in by[(ds, v)]).mean:+.1f} points" for v in a) + ".", "")
        best = max(a, key=lambda v: Spread.of(a[v]).mean)
        median = sorted(by[(ds, best)], key=lambda r: r["test_acc"])[len(by[(ds, best)]) // 2]
        png = _confusion(median, ctx.stage_dir("architectures") / f"confusion_{ds}.png",
                         f"{ds}: {best}, seed {median['seed']} (the median seed), {100 * median['test_acc']:.1f}%")
        sec.image(png, f"confusion matrix of the best variant on {ds}")
        if ds == "cifar10":  # the winner goes to the model store, to be served beside the default model
            from training.studies.common import publish_model

            v = ARCHITECTURES[best]
            pub = publish_model(ctx, f"cifar10-{v['model'].replace('_', '-')}-study", ds, v["model"], v["kwargs"],
                                recipe=RECIPE, train={**v.get("train", {}), "epochs": ctx.preset.epochs_for(
                                    "architectures"), "seed": median["seed"]},
                                description=f"the best architecture of the study ({best}), seed {median['seed']}")
            sec.add(f"The best CIFAR-10 variant ({best}) was retrained with seed {median['seed']} through the model "
                    f"pipeline (export with its parity gate) and published as `{pub['tag']}`: served accuracy "
                    f"{100 * pub['served_accuracy']:.2f}% on the whole test set (`bentoml models list`).", "")
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

    t0 = time.perf_counter()
    recs = _grid(ctx, "kernels", ("cifar10",), KERNELS, inspect=_first_layer)
    sec = Section("kernels", "2. Kernel size at equal parameter counts", command)
    rows = kernel_variants()
    sec.add("The four variants are one 4-layer CNN (Conv-BN-ReLU, a 2x2 max-pool after every second layer) whose "
            "width is solved per kernel so that the parameter counts agree within 5% "
            "(target 150,000: " + ", ".join(f"{k} {r['params']:,} ({100 * r['rel_error']:+.1f}%)"
                                             for k, r in rows.items()) + ").",
            "")
    by = group(recs, "variant")
    sec.table(HEADER, [_row(v, by[(v,)]) for v in KERNELS if (v,) in by])
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
    png = curves_figure({v: by[(v,)] for v in KERNELS if (v,) in by}, ctx.stage_dir("kernels") / "curves.png",
                        "kernel size: learning curves (CIFAR-10)")
    sec.image(png, "kernel size learning curves")
    png = _draw_first_layers({v: next((r for r in by[(v,)] if r.get("inspect")), None) for v in KERNELS if (v,) in by},
                             ctx.stage_dir("kernels") / "first_layer.png")
    sec.image(png, "first-layer filters and activations")
    a = {v: _accs(by[(v,)]) for v in KERNELS if (v,) in by}
    best = max(a, key=lambda v: Spread.of(a[v]).mean)
    sec.add("Conclusions, with their numbers:", "")
    sec.add(*[f"- {compare(best, a[best], v, a[v])}" for v in a if v != best], "")
    sec.add(f"- Time: " + "; ".join(f"{v} trains in {Spread.of(r['train_seconds'] for r in by[(v,)]).mean:.0f} s and "
                                      f"infers {Spread.of(r['infer_ms_b256'] for r in by[(v,)]).mean:.3f} ms/image"
                                      for v in a) + " (same parameter budget, different compute).", "")
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
    recs = _grid(ctx, "depth", ("cifar10",), DEPTH, probe=GradProbe, inspect=_feature_maps)
    deepest = DEPTHS[-1]
    sec = Section("depth", "3. Depth and gradients: plain vs residual", command)
    sec.add("`depth_cnn`: `depth` 3x3 conv layers of width 32 (a 2x2 max-pool after the first, global average "
            "pooling before the head), no BatchNorm and PyTorch's default initialisation, so that nothing but the "
            "identity skips of the residual variant keeps the gradient alive. Same recipe for all; the `_clip` "
            f"variants clip the global gradient norm to {CLIP_NORM} with `torch.nn.utils.clip_grad_norm_`.", "")
    by = group(recs, "variant")
    sec.table(HEADER, [_row(v, by[(v,)]) for v in DEPTH if (v,) in by])
    d = ctx.stage_dir("depth")
    sec.image(_depth_plot(by, d / "accuracy_vs_depth.png"), "accuracy against depth")
    sec.image(_grad_plot(by, deepest, d / "gradient_norms.png"), "per-layer gradient norms")
    sec.image(_feature_plot(by, 8 if 8 in DEPTHS else deepest, d / "feature_maps.png"), "feature maps")
    sec.add("Conclusions, with their numbers:", "")
    for dep in DEPTHS:
        p, r = by.get((f"plain_{dep}",)), by.get((f"residual_{dep}",))
        if p and r:
            sec.add(f"- depth {dep}: " + compare("residual", _accs(r), "plain", _accs(p)))
    for v in ("plain", "residual"):
        recs_v = by.get((f"{v}_{deepest}",))
        if recs_v:
            first = [np.mean([s["layers"][0] for s in r["grad_norms"]["samples"]]) for r in recs_v]
            last = [np.mean([s["layers"][-1] for s in r["grad_norms"]["samples"]]) for r in recs_v]
            ratio = Spread.of([f / max(l, 1e-30) for f, l in zip(first, last)])
            sec.add(f"- {v}, {deepest} layers: the first layer's gradient norm averages {ratio.mean:.2g} x the last "
                    f"layer's (seed range {ratio.min:.2g}..{ratio.max:.2g}; mean over training, {ratio.n} seeds)"
                    + (": its early layers starve." if ratio.max < 0.1 else "."))
    for v in ("plain", "residual"):
        a, b = by.get((f"{v}_{deepest}_clip",)), by.get((f"{v}_{deepest}",))
        if a and b:
            clipped = Spread.of([np.mean([s["total"] > CLIP_NORM for s in r["grad_norms"]["samples"]]) for r in a])
            sec.add(f"- clipping, {v} {deepest}: " + compare("with clip_grad_norm_", _accs(a), "without", _accs(b))
                    + f" The total norm exceeded {CLIP_NORM} in {100 * clipped.mean:.0f}% of the sampled steps.")
    sec.add("")
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


def _depth_plot(by: dict, path):
    p = plt()
    fig, ax = p.subplots(figsize=(6.5, 4))
    for v, style in (("plain", "o-"), ("residual", "s-")):
        xs, means, lo, hi = [], [], [], []
        for dep in DEPTHS:
            recs = by.get((f"{v}_{dep}",))
            if recs:
                s = Spread.of(_accs(recs))
                # seeds that all land on one value give a mean a rounding error off it: clamp the bars at 0
                xs.append(dep), means.append(100 * s.mean)
                lo.append(max(0.0, 100 * (s.mean - s.min))), hi.append(max(0.0, 100 * (s.max - s.mean)))
        ax.errorbar(xs, means, yerr=[lo, hi], fmt=style, capsize=4, label=f"{v} (mean, min-max over seeds)")
    ax.set(xlabel="conv layers", ylabel="test accuracy, %", title="accuracy against depth (CIFAR-10)")
    ax.set_xticks(list(DEPTHS))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


def _grad_plot(by: dict, dep: int, path):
    """Per-layer gradient norm (log) at the start, middle and end of training, plain vs residual, mean over seeds."""
    p = plt()
    fig, axes = p.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, v in zip(axes, ("plain", "residual")):
        recs = by.get((f"{v}_{dep}",))
        if not recs:
            continue
        n = min(len(r["grad_norms"]["samples"]) for r in recs)
        for frac, label in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
            i = min(n - 1, int(frac * (n - 1)))
            norms = np.array([r["grad_norms"]["samples"][i]["layers"] for r in recs])
            ax.semilogy(np.arange(1, norms.shape[1] + 1), norms.mean(0), "o-", ms=3,
                        label=f"{label} of training (step {recs[0]['grad_norms']['samples'][i]['step']})")
            ax.fill_between(np.arange(1, norms.shape[1] + 1), norms.min(0), norms.max(0), alpha=0.15)
        ax.set(xlabel="conv layer (1 = input side)", title=f"{v}, {dep} layers: gradient norm per layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("||dL/dW|| (mean over seeds, min-max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


def _feature_plot(by: dict, dep: int, path):
    p = plt()
    cols = [(v, next((r for r in by.get((f"{v}_{dep}",), []) if r.get("inspect")), None)) for v in ("plain", "residual")]
    cols = [(v, r) for v, r in cols if r]
    n = max((len(r["inspect"]["feature_maps"]) for _, r in cols), default=0)
    fig, axes = p.subplots(len(cols), n, figsize=(1.6 * n, 1.9 * len(cols)), squeeze=False)
    for row, (v, r) in zip(axes, cols):
        for i, ax in enumerate(row):
            ax.axis("off")
            if i < len(r["inspect"]["feature_maps"]):
                ax.imshow(np.asarray(r["inspect"]["feature_maps"][i]), cmap="magma")
                ax.set_title(f"{v} L{i + 1}", fontsize=8)
    fig.suptitle(f"mean |activation| after each layer, one test image ({dep} layers; same image for both)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


# ---------------------------------------------------------------- 4. residual block variants


def blocks(ctx: StudyContext, command: str) -> Section:
    from models import create_model
    from training.pipeline import count_flops

    t0 = time.perf_counter()
    recs = _grid(ctx, "blocks", ("cifar10",), BLOCKS)
    by = group(recs, "variant")
    sec = Section("blocks", "4. Residual block variants: basic, bottleneck, wide", command)
    widen = next((r["kwargs"].get("widen") for r in recs.values() if r["variant"] == "wide"), None)
    sec.add("One CIFAR ResNet (2 blocks per stage, widths 16/32/64, BatchNorm) with three blocks: basic (two 3x3 "
            "convs), bottleneck (1x1 reduce, 3x3, 1x1 expand x4) and wide (the basic block "
            f"{widen or 4}x wider, after Zagoruyko & Komodakis). Stability is the spread over seeds.", "")
    rows = []
    for v in BLOCKS:
        if (v,) not in by:
            continue
        r0 = by[(v,)][0]
        flops = count_flops(create_model(r0["model"], **r0["kwargs"]), (3, 32, 32))
        acc = Spread.of(_accs(by[(v,)]))
        rows.append([v, f"{r0['params']:,}", f"{flops / 1e6:.1f}", acc.pct(), f"{100 * acc.std:.2f}",
                     f"{100 * (acc.max - acc.min):.2f}", Spread.of(r["train_seconds"] for r in by[(v,)]).fmt(".1f", " s")])
    sec.table(["block", "parameters", "MFLOPs/image", "test accuracy", "std over seeds, points",
               "max - min, points", "training time"], rows)
    png = curves_figure({v: by[(v,)] for v in BLOCKS if (v,) in by}, ctx.stage_dir("blocks") / "curves.png",
                        "residual block variants: learning curves (CIFAR-10)")
    sec.image(png, "block variants learning curves")
    a = {v: _accs(by[(v,)]) for v in BLOCKS if (v,) in by}
    sec.add("Conclusions, with their numbers:", "",
            *[f"- {compare(x, a[x], y, a[y])}" for x, y in (("bottleneck", "basic"), ("wide", "basic")) if x in a and y in a],
            "")
    sec.write(ctx, time.perf_counter() - t0, recs)
    return sec


STAGES = {"architectures": architectures, "kernels": kernels, "depth": depth, "blocks": blocks}
