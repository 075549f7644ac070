"""How long the study stages will take on this machine, before running them: each stage's planned cells
(sweep cells: LRs x sweep seeds x the cells' epochs; evaluation cells: seeds x epochs) times each net's
measured cost per training image and per evaluated image, on random images of the dataset's shape.

    python bench/study_budget.py                      # the quick preset, every stage it can estimate
    python bench/study_budget.py --preset quick --images 512 --stages depth,blocks
    python bench/study_budget.py --workers 1,2                 # one 2-thread worker vs two 1-thread ones

It prints, per stage, the cell-epochs planned and the predicted minutes, the part of them its LR sweeps
take, and the measured cost per net. The sweeps train as long as the cells they choose for, on
the SWEEP_SEEDS (training/studies/sweep.py; one on smoke): that multiplies their cost by the seeds x the
epochs over what sweeps of a quarter of the epochs (at least one) on one seed cost, 6x on quick (2 seeds,
3 epochs), and each stage prints what it comes to.
Not counted: the sweep's extension rounds (each adds at most one LR, on every sweep seed, per unbracketed
variant), the published models (architectures, tuning, scratch), the tuning and scratch stages themselves,
and loading the data (which this script does once, for the sizes). MNIST cells (the architectures stage's CNN
vs FC) are timed on MNIST-shaped images and counted at CIFAR-10's image counts, which are equal on quick.
Costs are measured with the threads and precision a study cell uses here: with N workers (the studies'
default: one per core), N processes of cores/N threads each time the same net at once, so that what they
cost each other is in the figure, and a stage's cells are shared among them. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


SHAPES = {"cifar10": (3, 32), "mnist": (1, 28)}   # a dataset's channels and image size


def _costs(model: str, kwargs: dict, batch: int, images: int, dataset: str = "cifar10") -> tuple[float, float]:
    """(seconds per training image, seconds per evaluated image) of one net at this batch size, on random
    images of the dataset's shape."""
    from models import create_model
    from training.data import ArrayDataset
    from training.engine import train
    from training.evaluate import predict_torch
    from training.pipeline import make_spec
    from training.recipes import make_config

    channels, size = SHAPES[dataset]
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (images, channels, size, size), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (images,), generator=g), [str(i) for i in range(10)], "random")
    spec = make_spec(ds)
    net = create_model(model, seed=0, num_classes=10, in_channels=channels, image_size=size, **kwargs)
    cfg = make_config("study_sgd", epochs=1, batch_size=min(batch, images), grad_clip=1.0)
    train(net, ds.subset(slice(0, min(batch, images))), spec, cfg, progress=False, log=lambda *_: None)  # warm-up
    t0 = time.perf_counter()
    res = train(net, ds, spec, cfg, progress=False, log=lambda *_: None)
    per_train = res.train_seconds / images if res.train_seconds else (time.perf_counter() - t0) / images
    t0 = time.perf_counter()
    predict_torch(res.model, ds, spec, precision=res.precision)  # cells are scored as they train
    return per_train, (time.perf_counter() - t0) / images


def plans(ctx) -> dict[str, list[tuple[str, dict, int, float, int]]]:
    """stage -> [(variant, net, batch, epochs, evaluation seeds or 0 for a sweep cell)], one row per cell."""
    from training.studies import architectures as A
    from training.studies import optimizers as O
    from training.studies.sweep import START, sweep_epochs, sweep_seeds

    smoke = ctx.preset.name == "smoke"  # its sweeps try two LRs (training/studies/sweep.py)
    seeds = len(sweep_seeds(ctx))

    def stage(name: str, variants: dict, epochs: float) -> list:
        rows = []
        for v, s in variants.items():
            net = dict(model=s["model"], kwargs=s["kwargs"], dataset=s.get("dataset", "cifar10"))
            rows += [(v, net, ctx.preset.batch_size, sweep_epochs(epochs), 0)] * ((2 if smoke else len(START)) * seeds)
            rows += [(v, net, ctx.preset.batch_size, epochs, 1)] * len(ctx.preset.seeds)
        return rows

    out = {n: stage(n, v, ctx.preset.epochs_for(n)) for n, v in (
        ("architectures", {**A.ARCHITECTURES, **A.MNIST_ARCHITECTURES}), ("kernels", A.KERNELS), ("depth", A.DEPTH))}
    out["blocks"] = stage("blocks", A._blocks_variants(ctx), ctx.preset.epochs_for("blocks"))
    passes = ctx.preset.epochs_for("optimizers")
    rows = []
    for o, s in O.OPTIMIZERS.items():
        net = dict(model=s["model"], kwargs=s["kwargs"])
        batch = O._batch(ctx, o)
        rows += [(o, net, batch, O._passes(ctx, o, sweep_epochs(passes)), 0)] * (
            (2 if smoke else len(O.LR_GRID[o])) * seeds)
        rows += [(o, net, batch, O._passes(ctx, o, passes), 1)] * len(ctx.preset.seeds)
    out["optimizers"] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--images", type=int, default=1024, help="random images each net trains on to be timed")
    ap.add_argument("--stages", default="", help="comma-separated (default: all it can estimate)")
    ap.add_argument("--data-root", type=Path, default=None, help="where CIFAR-10 is (default: the lab's data root)")
    ap.add_argument("--workers", default="", help="worker processes per grid, or a list to compare, e.g. 1,2 "
                                                  "(default: what run_all.py uses, one per core)")
    args = ap.parse_args(argv)

    from training.data import default_data_root
    from training.run_all import study_workers
    from training.studies.common import StudyContext, get_study_preset
    from training.studies.sweep import sweep_seeds

    ctx = StudyContext(get_study_preset(args.preset), args.data_root or default_data_root(), Path("/tmp"), "sqlite://", "",
                       progress=True)
    counts = [int(w) for w in args.workers.split(",")] if args.workers else [study_workers(None, args.preset)]
    train, _, test, _ = ctx.data("cifar10")  # the sizes a cell sees (Rprop's full batch is all of them)
    n_train, n_val, n_test = len(train), len(ctx.val("cifar10")), len(test)
    stages = plans(ctx)
    if args.stages:
        stages = {k: v for k, v in stages.items() if k in args.stages.split(",")}
    print(f"preset {args.preset}: {n_train:,} training, {n_val:,} held-out and {n_test:,} test images a cell")
    totals = {}
    for workers in counts:
        totals[workers] = predict(stages, workers, min(args.images, n_train), n_train, n_val, n_test,
                                  len(sweep_seeds(ctx)))
    if len(totals) > 1:
        best = min(totals, key=totals.get)
        print("; ".join(f"{w} worker(s): {t / 60:.0f} min = {t / totals[best]:.2f}x the fastest"
                        for w, t in totals.items()))
    return 0


SWEEP_COST = "every LR on each sweep seed for the cells' epochs"


def sweep_factor(rows, seeds: int) -> float:
    """What the stage's sweeps cost over sweeps of a quarter of the epochs (at least one) on one seed, when
    they train every LR on `seeds` seeds for the cells' epochs."""
    sweep = [epochs for *_, epochs, evaluated in rows if not evaluated]
    if not sweep:
        return 0.0
    e = min(sweep)  # the stage's epochs (full-batch Rprop's are a multiple of them, and scale alike)
    return seeds * e / max(1.0, e / 4)


def predict(stages: dict, workers: int, images: int, n_train: int, n_val: int, n_test: int,
            sweep_seed_count: int) -> float:
    """Print each net's costs and each stage's predicted minutes with `workers` processes; the total seconds."""
    import multiprocessing

    from lab.hardware import cores

    threads = max(1, cores() // workers)
    print(f"{workers} worker process(es) of {threads} torch thread(s):")
    pool = multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (threads,)) if workers > 1 \
        else None
    torch.set_num_threads(threads)
    costs: dict[str, tuple[float, float]] = {}
    total = 0.0
    try:
        for name, rows in stages.items():
            seconds, cell_epochs, sweeping = 0.0, 0.0, 0.0
            for v, net, batch, epochs, evaluated in rows:
                dataset = net.get("dataset", "cifar10")
                key = f"{net['model']} {net['kwargs']} batch {batch}" + ("" if dataset == "cifar10" else f" {dataset}")
                if key not in costs:
                    job = (net["model"], net["kwargs"], batch, images, dataset)
                    each = pool.starmap(_costs, [job] * workers) if pool else [_costs(*job)]  # all at once
                    costs[key] = tuple(sum(c[i] for c in each) / len(each) for i in (0, 1))
                    print(f"  {key}: {1e3 * costs[key][0]:.2f} ms per training image, {1e3 * costs[key][1]:.2f} ms "
                          f"per evaluated image", flush=True)
                per_train, per_eval = costs[key]
                cell = epochs * (n_train * per_train + n_val * per_eval)  # held-out images every epoch
                cell += (n_test + min(n_train, n_val) if evaluated else n_val) * per_eval  # test (+ train) once
                seconds += cell
                sweeping += 0.0 if evaluated else cell
                cell_epochs += epochs
            seconds, sweeping = seconds / workers, sweeping / workers  # the cells are shared among the workers
            total += seconds
            print(f"{name}: {len(rows)} cells, {cell_epochs:.0f} cell-epochs, predicted {seconds / 60:.0f} min, of "
                  f"which the LR sweeps {sweeping / 60:.0f} min ({100 * sweeping / max(seconds, 1e-9):.0f} %: "
                  f"{SWEEP_COST}, {sweep_factor(rows, sweep_seed_count):.1f}x sweeps of a quarter of the epochs "
                  "on one seed)",
                  flush=True)
    finally:
        if pool:
            pool.close()
    print(f"total of these stages with {workers} worker(s): predicted {total / 60:.0f} min (sweep extensions, "
          f"publishing, data loading, tuning and scratch not included)")
    return total


if __name__ == "__main__":
    sys.exit(main())
