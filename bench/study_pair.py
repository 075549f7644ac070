"""Two study variants compared at a budget you choose, in minutes: the same cells, statistics and verdict
as the study report, without the report's whole grid.

    python bench/study_pair.py cnn fc --images 2000 --epochs 3
    python bench/study_pair.py plain_8_he plain_8_default --images 2000 --epochs 3 --lr 0.05

Variants are the study's (training/studies/architectures.py: ARCHITECTURES, DEPTH, KERNELS, headline);
both train with the `study_sgd` recipe, gradient clipping at 1.0 and the same LR (--lr; default the
recipe's), on --images CIFAR-10 training images, seeds 0..--seeds-1, and are scored on --test images of the
test set. Prints each variant's accuracy over seeds and "a − b: diff, 95 % CI [lo, hi]; established or not".
A shared LR, unlike the report: use it to see how a comparison moves with the budget, not as a finding.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def variants() -> dict:
    from training.studies import architectures as A

    depth = {f"{k}_{d}_{i}": A.depth_variant(k, d, i) for k in ("plain", "residual") for d in (2, 4, 8, 16, 32)
             for i in A.INITS}  # any depth, not only the study's
    return {**A.ARCHITECTURES, **depth, **A.DEPTH, **A.KERNELS, **A.HEADLINE}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--images", type=int, default=2000, help="training images")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--test", type=int, default=2000, help="test images (0 = all 10,000)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR for both (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data-root", type=Path, default=None)
    args = ap.parse_args(argv)

    from training.data import default_data_root
    from training.studies import stats
    from training.studies.architectures import CLIP_NORM, RECIPE
    from training.studies.common import Spread, StudyContext, StudyPreset, protocol, train_cell

    known = variants()
    for v in (args.a, args.b):
        if v not in known:
            print(f"error: unknown variant {v!r}; valid: {', '.join(known)}", file=sys.stderr)
            return 2
    preset = StudyPreset("pair", seeds=tuple(range(args.seeds)), train_limit={"cifar10": args.images},
                         test_limit=args.test, epochs={"default": args.epochs},
                         batch_size=min(args.batch_size, args.images),  # a batch is never larger than the data
                         timing_reps=(1, 1), val_images=500)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StudyContext(preset, args.data_root or default_data_root(), Path(tmp), "sqlite://", "",
                           progress=False)
        print(f"{args.images:,} training images, {args.epochs:g} epochs, batch {preset.batch_size}, {args.seeds} seeds, "
              f"LR {args.lr if args.lr is not None else 'the recipe'}'s; {protocol(ctx)}", flush=True)
        cells = {}
        for v in (args.a, args.b):
            s = known[v]
            train = {**s["train"], "grad_clip": CLIP_NORM, **({"lr": args.lr} if args.lr is not None else {})}
            cells[v] = [train_cell(ctx, "cifar10", s["model"], s["kwargs"], seed, recipe=RECIPE, train=train)
                        for seed in preset.seeds]
            per_seed = ", ".join(f"{100 * r['test_acc']:.1f}" for r in cells[v])
            print(f"{v}: test accuracy {Spread.of(r['test_acc'] for r in cells[v]).pct()} (per seed: {per_seed})",
                  flush=True)
    (c,) = stats.compare_all([(args.a, stats.correct_matrix(cells[args.a]), args.b,
                               stats.correct_matrix(cells[args.b]), "")])
    print(c.sentence(1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
