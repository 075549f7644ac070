"""From scratch, proven against PyTorch (issue 12): the NumPy CNN on MNIST, the gradient checks, the
custom autograd layers, the hand-written Adam and AdaMax, and ResNet-50 trained with AdaMax vs Adam.

One run_all.py stage, "scratch", writes this section of the study report:
  a) the NumPy CNN (training/scratch/numpy_cnn.py, NumPy only) trained on real MNIST over seeds, its
     loss curve, and its speed against the same architecture in torch on the same batches
  b) every NumPy layer's forward and backward against torch autograd in float64
  c) the four torch.autograd.Function layers (models/custom_layers.py): gradcheck, agreement with the
     torch.nn composition they replace, and `custom_cnn` (which uses all four) trained on CIFAR-10
     over seeds, exported through the verified export and published
  d) the hand-written Adam and AdaMax (training/scratch/optimizers.py) against torch.optim, 100 steps
  e) the hand-written ResNet-50 on an image-folder dataset with the hand-written AdaMax and with
     torch's Adam: loss and macro-F1 per epoch, per-epoch time. On a CPU preset this is a demonstration
     that the hand-written parts train together (one seed, a few hundred updates); the comparison of
     AdaMax with Adam is made where it can be answered: in the optimizers stage, on a ResNet that trains
     at that budget, and here on the `full` preset (all images, the CIFAR stem, every seed)
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from training.studies.common import (CLIPPED_HEADER, Section, Spread, StudyContext, band, grid, group, plt,
                                     publish_model, train_cell)
from training.studies.runner import Cell, GridSpec

NUMPY_CNN = {  # epochs and training images (0 = all 60,000) of the NumPy CNN per preset
    "smoke": dict(epochs=1, train_limit=300, speed_batches=2),
    "quick": dict(epochs=3, train_limit=0, speed_batches=30),
    "full": dict(epochs=3, train_limit=0, speed_batches=30),
}
RESNET50 = {  # the CPU schedule is reduced: the ImageNet stem (8x8 after it) and a subset; "full" for a GPU
    "smoke": dict(stem="imagenet", train_limit=32, test_limit=16, epochs=1, batch_size=16),
    "quick": dict(stem="imagenet", train_limit=3000, test_limit=1000, epochs=4, batch_size=64),
    "full": dict(stem="cifar", train_limit=0, test_limit=0, epochs=30, batch_size=128),
}
RESNET_OPTIMIZERS = {  # variant -> settings (constant LR, as the course ran them; each at its usual default)
    "adamax (hand-written)": dict(optimizer="adamax_scratch", lr=2e-3),
    "adam (torch)": dict(optimizer="adam", lr=1e-3),
}


def compares_resnet50(preset: str) -> bool:
    """Whether this preset compares the hand-written ResNet-50's AdaMax with Adam (over every seed) or only
    demonstrates that they train (a CPU preset: one seed)."""
    return preset == "full"


def scratch(ctx: StudyContext, command: str) -> Section:
    from training.studies.common import WorkerDone

    if ctx.is_worker:  # its parts run one after the other in the stage's own process
        raise WorkerDone
    ctx = replace(ctx, workers=1)  # so its grids' cells get every core
    t0 = time.perf_counter()
    sec = Section("scratch", "7. From scratch, proven against PyTorch", command)
    sec.add(__doc__.split("\n\n", 1)[1].split("\n\nOne run_all")[0].strip(), "")
    _numpy_cnn(ctx, sec)
    _gradcheck(sec)
    _custom_layers(ctx, sec)
    _optimizers(sec, (0,) if ctx.preset.name == "smoke" else (0, 1, 2))
    _resnet50(ctx, sec)
    sec.write(ctx, time.perf_counter() - t0)
    return sec


# ---------------------------------------------------------------- a) the NumPy CNN


def _numpy_cnn(ctx: StudyContext, sec: Section) -> None:
    from training.scratch.numpy_cnn_run import run_numpy_cnn
    from training.scratch.torch_twin import format_speed

    s = NUMPY_CNN.get(ctx.preset.name, NUMPY_CNN["quick"])
    out = ctx.stage_dir("scratch")
    runs = {}
    for seed in ctx.preset.seeds:
        folder = out / f"numpy_cnn_seed{seed}"
        runs[seed] = run_numpy_cnn(ctx.data_root, folder, epochs=s["epochs"], train_limit=s["train_limit"] or None,
                                   seed=seed, speed=seed == ctx.preset.seeds[0], speed_batches=s["speed_batches"],
                                   progress=ctx.progress)
        ctx.log(f"  numpy_cnn seed {seed}: test accuracy {100 * runs[seed]['test_accuracy']:.2f}% in "
                f"{runs[seed]['train_seconds']:.0f} s")
    acc = Spread.of(r["test_accuracy"] for r in runs.values())
    secs = Spread.of(r["train_seconds"] for r in runs.values())
    first = runs[ctx.preset.seeds[0]]
    verdict = "met by every seed" if acc.min >= 0.98 else "NOT met by every seed"
    sec.add("### a) The NumPy CNN on MNIST", "",
            f"`training/scratch/numpy_cnn.py` (no torch anywhere in it): {first['architecture']}, "
            f"{first['parameters']:,} parameters, Adam lr {first['lr']:g}, batch {first['batch_size']}, "
            f"{first['epochs']} epochs over {first['train_images']:,} training images, float32.", "",
            f"- test accuracy on the {first['test_images']:,} MNIST test images: **{acc.pct(2)}** "
            f"(min {100 * acc.min:.2f}%, max {100 * acc.max:.2f}%, seeds {', '.join(map(str, runs))}); "
            f"the 98% target is {verdict}",
            f"- training time: {secs.fmt('.0f', ' s')} on this CPU ({first['train_blas_threads']} BLAS threads)",
            "- weights: `numpy_cnn.npz` in each seed's folder (`training.scratch.numpy_cnn.load(path).predict(images)`)",
            "")
    sec.image(_copy(out / f"numpy_cnn_seed{ctx.preset.seeds[0]}" / "numpy_cnn_loss.png", out / "numpy_cnn_loss.png"),
              "NumPy CNN loss curve")
    if "speed" in first:
        sec.add("Speed: the same architecture and weights in torch (`training/scratch/torch_twin.py`), both timed on "
                "the same batches (best of 3 interleaved runs):", "", "```", format_speed(first["speed"]),
                format_speed(first["speed_1_thread"]), "```", "")


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


# ---------------------------------------------------------------- b) gradient checks


def _gradcheck(sec: Section) -> None:
    from training.scratch.gradcheck import check_layers, format_table, worst

    rows = check_layers(seed=0)
    sec.add("### b) Every NumPy layer against torch autograd (float64, random inputs)", "",
            "Relative error of the forward output and of every backward gradient "
            "(`python -m training.scratch.gradcheck`; also a test):", "", "```", format_table(rows), "```", "",
            f"Worst relative error {worst(rows):.2e} (tolerance 1e-6).", "")


# ---------------------------------------------------------------- c) custom autograd layers


def _custom_layers(ctx: StudyContext, sec: Section) -> None:
    import models.custom_layers as L

    torch.manual_seed(0)
    rows = []
    cases = [
        ("WSConv2dFunction", L.WSConv2dFunction, L.ws_conv2d_reference,
         lambda: (torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.rand(4) + 0.5, torch.randn(4)), (1, 1, 1e-5)),
        ("SqueezeExciteFunction", L.SqueezeExciteFunction, L.squeeze_excite_reference,
         lambda: (torch.randn(2, 4, 5, 5), torch.randn(2, 4), torch.randn(2), torch.randn(4, 2), torch.randn(4)), ()),
        ("SwishFunction", L.SwishFunction, L.swish_reference, lambda: (torch.randn(3, 7),), ()),
        ("SoftPoolFunction", L.SoftPoolFunction, L.soft_pool2d_reference, lambda: (torch.randn(2, 3, 6, 6),), (2,)),
    ]
    for name, fn, ref, make, extra in cases:
        inputs = tuple(t.double().requires_grad_() for t in make())
        ok = torch.autograd.gradcheck(lambda *a: fn.apply(*a, *extra), inputs, eps=1e-6, atol=1e-7)
        out_f = fn.apply(*inputs, *extra)
        out_r = ref(*inputs, *extra)
        g = torch.randn_like(out_f)
        grads_f = torch.autograd.grad(out_f, inputs, g)
        grads_r = torch.autograd.grad(out_r, inputs, g)
        rows.append([name, "passes" if ok else "**FAILS**", f"{(out_f - out_r).abs().max().item():.1e}",
                     f"{max((a - b).abs().max().item() for a, b in zip(grads_f, grads_r)):.1e}"])
    sec.add("### c) Custom layers as torch.autograd.Function with hand-written backward", "",
            "Each Function against `torch.autograd.gradcheck` (float64) and against the plain torch composition it "
            "replaces (max |difference| of outputs and of input/parameter gradients, float64):", "")
    sec.table(["Function", "gradcheck", "output vs composition", "gradients vs composition"], rows)
    sec.add("Export: in eval mode each module runs its composition of standard torch ops, which the ONNX export "
            "traces (models/custom_layers.py lists the ONNX ops each becomes); tests prove both paths agree.", "")
    recs = grid(ctx, GridSpec("scratch-custom-cnn", [Cell("cifar10", "custom_cnn", s) for s in ctx.preset.seeds],
                              {"stage": "scratch custom_cnn", "preset": ctx.preset.name,
                               "epochs": ctx.preset.epochs_for("scratch"), "train_limit": ctx.preset.train_limit,
                               "test_limit": ctx.preset.test_limit, "data_seed": ctx.data_seed},
                              lambda cell: train_cell(ctx, "cifar10", "custom_cnn", {}, cell.seed, recipe="study_sgd",
                                                      stage="scratch")))
    acc = Spread.of(r["test_acc"] for r in recs.values())
    clipped = sec.clipping({"custom_cnn": list(recs.values())})
    sec.add(f"`custom_cnn` (WSConv2d, SqueezeExcite, Swish, SoftPool2d) trained on CIFAR-10 with the study recipe: "
            f"test accuracy {acc.pct()} (min {100 * acc.min:.1f}%, max {100 * acc.max:.1f}%, {acc.n} seeds"
            + (f"; clipped steps {clipped['custom_cnn']}" if clipped is not None else "") + "), "
            f"{next(iter(recs.values()))['params']:,} parameters.")
    published = publish_model(ctx, "cifar10-custom-cnn", "cifar10", "custom_cnn", {}, recipe="study_sgd",
                              train={"epochs": ctx.preset.epochs_for("scratch"), "seed": ctx.preset.seeds[0]},
                              description="the custom autograd layers' model (issue 12)")
    from lab.runfiles import RunFiles
    from pathlib import Path

    parity = RunFiles(Path(published["run_dir"])).export().parity
    sec.add(f"Exported through the verified export and published as `{published['tag']}`: parity of the simplified "
            f"ONNX graph against torch, max |logit difference| {parity['onnx_simplified']['max_abs_diff']:.1e}, "
            f"top-1 agreement {100 * parity['onnx_simplified']['top1_agreement']:.0f}% on "
            f"{parity['onnx_simplified']['images']} held-out images; served accuracy "
            f"{100 * published['served_accuracy']:.2f}% on the whole test set.", "")


# ---------------------------------------------------------------- d) hand-written optimizers


def _optimizers(sec: Section, seeds: tuple[int, ...]) -> None:
    from models import create_model
    from training.scratch.optimizers import AdaMax, Adam

    rows = []
    for name, mine_cls, ref_cls, lr in (("Adam", Adam, torch.optim.Adam, 1e-3), ("AdaMax", AdaMax, torch.optim.Adamax, 2e-3)):
        diffs = []
        for seed in seeds:
            nets = [create_model("simple_cnn", num_classes=10, image_size=16, width=8, hidden=16, seed=seed)
                    for _ in range(2)]
            opts = [mine_cls(nets[0].parameters(), lr=lr, weight_decay=1e-4),
                    ref_cls(nets[1].parameters(), lr=lr, weight_decay=1e-4, foreach=False)]
            g = torch.Generator().manual_seed(seed)
            for _ in range(100):
                x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
                for net, opt in zip(nets, opts):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    opt.step()
            diffs.append(max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), nets[1].parameters())))
        rows.append([name, f"torch.optim.{ref_cls.__name__}", f"{lr:g}", ", ".join(f"{d:.1e}" for d in diffs),
                     "yes" if max(diffs) <= 1e-6 else "**NO**"])
    sec.add("### d) Hand-written Adam and AdaMax against torch.optim", "",
            "Same model (`simple_cnn`), same seed and batches, 100 steps, weight decay 1e-4; the largest |parameter "
            "difference| after the 100 steps, one figure per seed:", "")
    sec.table(["optimizer", "reference", "lr", f"max |difference| (seeds {', '.join(map(str, seeds))})", "<= 1e-6"],
              rows)


# ---------------------------------------------------------------- e) ResNet-50, AdaMax vs Adam


def _resnet50(ctx: StudyContext, sec: Section) -> None:
    from dataclasses import replace

    s = RESNET50.get(ctx.preset.name, RESNET50["quick"])
    sub = replace(ctx, preset=replace(ctx.preset, train_limit={"imagefolder": s["train_limit"]},
                                      test_limit=s["test_limit"], epochs={"default": s["epochs"]},
                                      batch_size=s["batch_size"]), _data={})
    folder = ctx.image_folder or ctx.data_root / "cifar10-jpg"

    def run_cell(cell: Cell) -> dict:
        rec = train_cell(sub, "imagefolder", "resnet50", {"stem": s["stem"]}, cell.seed, recipe="study_sgd",
                         train={**RESNET_OPTIMIZERS[cell.variant], "schedule": "constant", "warmup": 0.0,
                                "momentum": 0.0, "weight_decay": 0.0}, stage="scratch", epoch_f1=True)
        return dict(rec, variant=cell.variant)

    demo = not compares_resnet50(ctx.preset.name)  # a CPU preset: one seed, a demonstration, no comparison
    seeds = ctx.preset.seeds[:1] if demo else ctx.preset.seeds
    cells = [Cell("imagefolder", v, seed) for v in RESNET_OPTIMIZERS for seed in seeds]
    config = {"stage": "resnet50 adamax vs adam", "folder": str(folder), "schedule": s,
              "optimizers": RESNET_OPTIMIZERS, "data_seed": ctx.data_seed, "seeds": list(seeds)}
    recs = grid(sub, GridSpec("scratch-resnet50", cells, config, run_cell))
    by = group(recs, "variant")
    r0 = next(iter(recs.values()))
    steps = -(-r0["train_images"] // s["batch_size"]) * s["epochs"]
    sec.add("### e) ResNet-50 (written by hand) with AdaMax vs Adam" + (": a demonstration" if demo else ""), "",
            f"`resnet50` ({r0['params']:,} parameters; torchvision's resnet50 for the same classes has exactly as many "
            f"with the ImageNet stem) on the image folder `{folder.name}` ({r0['train_images']:,} training images, "
            f"{r0['test_images']:,} test images, {s['epochs']} epochs = {steps} updates, batch {s['batch_size']}, "
            f"{s['stem']} stem, constant LR at each optimizer's usual default, {len(seeds)} seed(s)). "
            "Stanford Cars (or any `<root>/{train,test}/<class>/` tree): pass `--image-folder DIR`.", "")
    if demo:
        sec.add(f"**A demonstration, not a comparison**: {steps} updates of a 23-million-parameter net whose ImageNet "
                "stem leaves 8x8 feature maps of a 32-pixel image, at untuned LRs and one seed, shows that the "
                "hand-written ResNet-50 and AdaMax train end to end (the loss falls); it cannot rank the optimizers. "
                "AdaMax vs Adam is compared on a ResNet that trains at this budget, each at its swept LR, in the "
                "optimizers stage; `--preset full` runs this comparison with every seed, all images and the CIFAR "
                "stem.", "")
    rows = []
    clipped = sec.clipping({v: by[(v,)] for v in RESNET_OPTIMIZERS if (v,) in by})
    for v in RESNET_OPTIMIZERS:
        if (v,) not in by:
            continue
        rs = by[(v,)]
        rows.append([v, f"{RESNET_OPTIMIZERS[v]['lr']:g}", Spread.of(r["test_acc"] for r in rs).pct()]
                    + ([clipped[v]] if clipped is not None else [])
                    + [Spread.of(r["macro_f1"] for r in rs).fmt(".3f"),
                       Spread.of(r["history"][-1]["train_loss"] for r in rs).fmt(".3f"),
                       Spread.of(np.mean([h["seconds"] for h in r["history"]]) for r in rs).fmt(".1f", " s")])
    sec.table(["optimizer", "lr", "test accuracy"] + ([CLIPPED_HEADER] if clipped is not None else [])
              + ["test macro-F1", "final training loss", "seconds per epoch"], rows)
    sec.image(_resnet_curves(by, ctx.stage_dir("scratch") / "resnet50_adamax_vs_adam.png"), "ResNet-50 curves")
    a, b = list(RESNET_OPTIMIZERS)
    if not demo and (a,) in by and (b,) in by:
        from training.studies.stats import compare_all, correct_matrix

        (c,) = compare_all([(a, correct_matrix(by[(a,)]), b, correct_matrix(by[(b,)]), "")])
        sec.add(c.sentence(prefix="- "), "")  # corrected over the report's family when the section is written


def _resnet_curves(by: dict, path):
    p = plt()
    fig, (a1, a2, a3) = p.subplots(1, 3, figsize=(14, 4))
    for v in RESNET_OPTIMIZERS:
        rs = by.get((v,))
        if not rs:
            continue
        line = band(a1, [[h["train_loss"] for h in r["history"]] for r in rs], f"{v} train")
        band(a1, [[h["val_loss"] for h in r["history"]] for r in rs], f"{v} held-out", color=line.get_color())
        a1.lines[-1].set_linestyle("--")
        band(a2, [[h["val_macro_f1"] for h in r["history"]] for r in rs], v, color=line.get_color())
        band(a3, [[h["seconds"] for h in r["history"]] for r in rs], v, color=line.get_color())
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss (solid: train, dashed: held-out)")
    a2.set(xlabel="epoch", ylabel="macro-F1", title="held-out macro-F1")
    a3.set(xlabel="epoch", ylabel="seconds", title="time per epoch")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ResNet-50: hand-written AdaMax vs Adam (mean over seeds, min-max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    p.close(fig)
    return path


STAGES = {"scratch": scratch}
