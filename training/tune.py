#!/usr/bin/env python
"""Optuna tuning from the command line: one study, any number of workers, the best trial compared with the
untuned baseline on the test set and published.

    python training/tune.py --preset quick --search-space cnn --n-trials 24
    python training/tune.py --preset quick --storage postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        --study-name cnn-pg --n-trials 24 --n-workers 2          # 2 processes here; start more anywhere
    optuna-dashboard sqlite:///runs/tuning/tuning.db             # watch it (same URL as --storage)

Every worker started with the same --storage and --study-name joins the study; together they finish
exactly --n-trials trials. Restarting after a kill continues to that count. The process that creates the
study queues the untuned baseline as trial 0. Once the study is complete, one process of all those on it
claims (in the study's database) the comparison, the report and the published model; the others print
which process publishes and exit 0. See training/tuning.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def parse_args(argv=None):
    from lab.paths import default_runs_dir
    from training.tuning import SPACES, TUNE_PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", help=f"data sizes, evaluation seeds, epochs and default trial "
                                                      f"count: {', '.join(TUNE_PRESETS)} (default quick)")
    ap.add_argument("--search-space", default="cnn", help=f"one of: {', '.join(SPACES)}")
    ap.add_argument("--storage", default=None,
                    help="database URL (default sqlite:///<runs>/tuning/tuning.db); PostgreSQL for many machines")
    ap.add_argument("--study-name", default=None, help="default: <space>-<preset>")
    ap.add_argument("--n-trials", type=int, default=None, help="trials the whole study should finish")
    ap.add_argument("--n-workers", type=int, default=1, help="worker processes on this machine (this one included)")
    ap.add_argument("--epochs", type=float, default=None,
                    help="train every trial (and the baseline) exactly this many epochs, a whole number; default: "
                         "each trial chooses 1..the preset's max_epochs and the baseline trains the preset's epochs")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="report folder (default <runs>/tuning/<study>)")
    ap.add_argument("--no-publish", action="store_true",
                    help="report the study only: neither the test-set comparison of the best trial with the "
                         "baseline nor the published model (both retrain)")
    ap.add_argument("--fresh", action="store_true", help="delete this study's trials first")
    ap.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    ap.add_argument("--pruner", choices=("median", "none"), default="median")
    ap.add_argument("--worker-only", action="store_true", help="run trials, then exit (no report, no publish)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.preset not in TUNE_PRESETS:
        ap.error(f"unknown preset {args.preset!r}; valid: {', '.join(TUNE_PRESETS)}")
    if args.epochs is not None and (args.epochs < 1 or not float(args.epochs).is_integer()):
        ap.error(f"--epochs must be a whole number of at least 1, got {args.epochs:g}")
    args.runs = default_runs_dir()
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from lab.hardware import cores
    from lab.paths import default_data_root
    from training.studies.common import StudyContext, get_study_preset
    from training.studies.claim import me
    from training.tuning import (TUNE_PRESETS, best_settings, claim_after_study, evaluate_best_and_baseline,
                                 finish_study, get_space, open_tuning_study, plan, print_statistics, run_worker,
                                 section, start_workers, statistics)

    import torch

    space = get_space(args.search_space)
    preset = TUNE_PRESETS[args.preset]
    n_trials = args.n_trials or preset["n_trials"]
    name = args.study_name or f"{space.name}-{args.preset}"
    storage = args.storage
    if storage is None:
        (args.runs / "tuning").mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(args.runs / 'tuning' / 'tuning.db').resolve()}"
    out = args.out or args.runs / "tuning" / name
    out.mkdir(parents=True, exist_ok=True)
    ctx = StudyContext(get_study_preset(args.preset), args.data_root or default_data_root(), out, storage,
                       command="", fresh=args.fresh and not args.worker_only,
                       progress=not args.no_progress and sys.stderr.isatty())
    epoch_range, baseline = plan(space, args.preset, ctx.preset, None if args.epochs is None else int(args.epochs))
    torch.set_num_threads(max(1, cores() // max(1, args.n_workers)))
    kw = dict(sampler=args.sampler, pruner=args.pruner, baseline=baseline)
    study = open_tuning_study(space, storage, name, fresh=args.fresh and not args.worker_only, **kw)
    if args.worker_only:
        run_worker(ctx, space, storage, name, n_trials, epoch_range, log=ctx.log, **kw)
        return 0
    t0 = time.perf_counter()
    helper_argv = [a for a in argv if a != "--fresh"]
    helpers = start_workers(args.n_workers - 1, helper_argv) if args.n_workers > 1 else []
    try:
        study = finish_study(ctx, space, storage, name, n_trials, epoch_range, log=ctx.log, **kw)
    finally:
        for h in helpers:
            h.wait()
    seconds = time.perf_counter() - t0
    stats = statistics(study)
    print_statistics(stats, ctx.log)
    # one process, of all those on this study (here or on other machines), does what follows it
    publish = not args.no_publish and "best_value" in stats
    claim = claim_after_study(storage, study, name, n_trials, publish)
    what = "publishes the best trial" if publish else "writes the report"
    if claim.state == "done":  # a rerun of a study published before
        ctx.log(f"study complete: {claim.holder} published the best trial as {(claim.result or {}).get('tag', '?')}; "
                f"nothing to do here (--fresh starts the study over)")
        return 0
    if not claim.mine:
        ctx.log(f"study complete: {claim.holder} {what} (claimed in the study's storage); "
                f"this process ({me()}) stops here")
        return 0
    taken = f", taken over from {claim.taken_over}, which stopped" if claim.taken_over else ""
    ctx.log(f"study complete: {claim.holder} (this process) {what}{taken}")
    with claim.held():
        published = evaluation = None
        if publish:
            from training.studies.common import publish_model

            # the evaluation grid is named after what it trains: a study that grows a new best (more trials, a
            # rerun) trains its own grid instead of meeting one of other settings under the same name
            key = hashlib.sha256(json.dumps([study.best_trial.params, baseline], sort_keys=True).encode()).hexdigest()
            evaluation = evaluate_best_and_baseline(ctx, space, study, baseline, epoch_range,
                                                    f"{name}-evaluation-{key[:10]}")
            if evaluation is not None and "comparison" in evaluation:
                ctx.log(evaluation["comparison"].sentence(1))
            kwargs, train = best_settings(space, study.best_trial.params, epoch_range)
            published = publish_model(ctx, f"{space.dataset}-tuned-{space.name}", space.dataset, space.model,
                                      kwargs, recipe="study_sgd", train=train,
                                      description=f"best trial {study.best_trial.number} of Optuna study {name}",
                                      before_publish=claim.check)
        command = "python training/tune.py " + " ".join(argv)
        section(ctx, space, study, name, storage, n_trials, seconds, command, published, evaluation)
        ctx.log(f"report section: {out / 'tuning' / 'section.md'}")
        if publish:
            claim.finish({**published, "best_trial": study.best_trial.number})
        else:
            claim.release()  # a report may be written again by a rerun
    return 0


def cli(argv=None) -> int:
    from training.studies.runner import StudyError

    try:
        return main(argv)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; rerun the same command to continue the study", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
