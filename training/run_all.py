#!/usr/bin/env python
"""The main job: train, evaluate, export and publish the served model, then run the studies.

    python training/run_all.py                      # everything on the quick preset (real data, this CPU)
    python training/run_all.py --preset smoke       # seconds, tiny slices
    python training/run_all.py --only model         # the served model: train, evaluate, export, publish
    python training/run_all.py --only studies       # every study stage (or name them: --only kernels,depth)
    python training/run_all.py --only export --run-dir runs/20261126-130000-quick
    python training/run_all.py --skip publish --epochs 4
    torchrun --nproc-per-node 2 training/run_all.py ...   # one model trained by 2 processes

The model stages write one folder under runs/ (its path is printed at the end) with summary.md, the
plots and run.log; rerunning after an interruption continues the unfinished run of the same preset
from its last checkpoint (--fresh starts over). The study stages write runs/studies-<preset>/ (report.md,
report.html, a folder per stage) and keep every trained cell in one results database, so a rerun
skips what is done.

Under torchrun (training/distributed.py) every process trains (NCCL on GPUs, gloo on CPUs; the global
batch is the recipe's, each of N processes takes batch / N); the main process alone picks and writes
the run folder, then evaluates, exports and publishes while the others leave after training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from datetime import datetime
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def parse_args(argv=None) -> argparse.Namespace:
    from lab.paths import default_runs_dir
    from training.optim import OPTIMIZERS
    from training.pipeline import STAGES
    from training.presets import PRESETS
    from training.recipes import RECIPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", help=f"one of: {', '.join(PRESETS)} (default quick)")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="data folder (default: $LAB_DATA_ROOT, else ../shared/data, else ./data)")
    ap.add_argument("--download", action="store_true", help="let torchvision download missing data")
    ap.add_argument("--runs-dir", type=Path, default=default_runs_dir())
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="continue or reuse this run folder instead of making a new one")
    ap.add_argument("--fresh", action="store_true", help="never resume an unfinished run")
    from training.studies import STAGES as STUDY_STAGES

    ap.add_argument("--only", default="", help=f"comma-separated stages to run: {', '.join(STAGES)}, "
                                               f"{', '.join(STUDY_STAGES)}; or the groups 'model', 'studies'")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--report", action="store_true",
                    help="at the end, write the combined report (bench/report.py) for the published model")
    ap.add_argument("--report-load", action="store_true",
                    help="--report, plus load tests against a service it starts and stops itself")
    st = ap.add_argument_group("studies")
    st.add_argument("--studies-dir", type=Path, default=None,
                    help="where the study report and results go (default: <runs dir>/studies-<preset>)")
    st.add_argument("--study-storage", default=None,
                    help="results database URL shared by study workers (default: sqlite:///<studies dir>/results.db); "
                         "e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test")
    st.add_argument("--study-workers", type=int, default=None,
                    help="worker processes on this machine per grid, each with cores/N torch threads (default: one "
                         "per core; 1 on smoke, whose grids take less than a helper's start; more machines: start "
                         "the same command there)")
    st.add_argument("--image-folder", type=Path, default=None,
                    help="the image-folder dataset of the scratch stage's ResNet-50 (default <data root>/cifar10-jpg; "
                         "Stanford Cars: a <root>/{train,test}/<class>/ tree)")
    st.add_argument("--restart-studies", action="store_true",
                    help="discard the finished cells of the selected study stages and run them again")
    g = ap.add_argument_group("overrides of the preset")
    g.add_argument("--dataset")
    g.add_argument("--model", help="a registry model; its own recipe and store name follow unless given")
    g.add_argument("--model-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"n_layers": 3}\'')
    g.add_argument("--recipe", help=f"one of: {', '.join(RECIPES)} (default: the model's own)")
    g.add_argument("--optimizer", help=f"one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--epochs", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--seed", type=int, help="initial weights and batch order")
    g.add_argument("--data-seed", type=int, help="the validation split and test subset (default 0)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    g.add_argument("--train-limit", type=int, help="use only this many training images")
    g.add_argument("--store-name", help="BentoML model name to publish under")
    g.add_argument("--students", help="comma-separated students of the students stage (training/compress/students.py); "
                                     "'' for none")
    return ap.parse_args(argv)


def resolve_preset(args):
    from models import list_models
    from models.registry import UnknownModelError
    from training.data import DATASETS, DataError
    from training.optim import OPTIMIZERS, ConfigError
    from training.presets import get_preset
    from training.recipes import get_recipe

    p = get_preset(args.preset)
    if args.recipe:
        get_recipe(args.recipe)  # a one-line error naming the valid ones
    if args.dataset and args.dataset not in DATASETS:
        raise DataError(f"unknown dataset {args.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if args.model and args.model not in list_models():
        raise UnknownModelError(f"unknown model {args.model!r}; valid models: {', '.join(list_models())}")
    if args.optimizer and args.optimizer.lower() not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {args.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    train_over = {k: v for k, v in dict(optimizer=args.optimizer, epochs=args.epochs,
                                        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                        precision=args.precision, compile=args.compile,
                                        threads=args.threads).items() if v is not None}
    over = {}
    if args.dataset:
        over["dataset"] = args.dataset
    if args.model and args.model != p.model:  # another model: its own recipe, kwargs and store name
        over.update(model=args.model, model_kwargs={}, recipe="", store_name="")
        # the preset's settings that belong to its own model's recipe go too (LRs, optimizer)
        over["overrides"] = {k: v for k, v in p.overrides.items() if k in _RECIPE_NEUTRAL}
    if args.recipe:
        over["recipe"] = args.recipe
    if args.model_kwargs is not None:
        over["model_kwargs"] = args.model_kwargs
    if args.train_limit is not None:
        over["train_limit"] = args.train_limit
    if args.data_seed is not None:
        over["data_seed"] = args.data_seed
    if args.store_name:
        over["store_name"] = args.store_name
    if args.students is not None:
        over["students"] = tuple(n.strip() for n in args.students.split(",") if n.strip())
    p = replace(p, **over)
    p = replace(p, overrides={**p.overrides, **train_over})
    p.config()  # unknown settings and recipes fail here, before any work
    return p


# Preset settings that mean the same for every recipe: they survive a --model override.
_RECIPE_NEUTRAL = ("epochs", "batch_size", "whiten_images", "whiten_bias_epochs", "precision", "threads")


def choose_run_dir(args, preset) -> tuple[Path, object]:
    """The run folder and the lock that makes it this process's alone while it runs."""
    if args.run_dir:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_run_dir(args.run_dir)
        if lock is None:
            raise ValueError(f"another run_all.py is using {args.run_dir}; wait for it or pick another folder")
        return args.run_dir, lock
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.fresh:  # an unfinished run of the same preset and recipe continues
        for d in sorted(args.runs_dir.glob(f"*-{preset.name}"), reverse=True):
            cfg = d / "config.json"
            if cfg.exists() and not (d / "DONE").exists():
                if json.loads(cfg.read_text()).get("preset") == _preset_dict(preset):
                    lock = _lock_run_dir(d)
                    if lock is not None:  # else another process is running it: start a new folder
                        return d, lock
            break  # only the latest run is a candidate
    stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
    for i in range(1000):
        d = args.runs_dir / (f"{stamp}-{preset.name}" if i == 0 else f"{stamp}.{i}-{preset.name}")
        try:
            d.mkdir(parents=True, exist_ok=False)  # atomic: two processes never get the same folder
        except FileExistsError:
            continue
        return d, _lock_run_dir(d)
    raise ValueError(f"could not create a run folder under {args.runs_dir}")


def _lock_run_dir(d: Path):
    """An exclusive lock on d/.lock held for the life of the process; None if another process holds it."""
    import fcntl

    f = open(d / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _preset_dict(preset) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(preset), default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    from training import distributed as dist

    world = dist.init_from_env()  # a world of one unless launched by torchrun
    try:
        return _main(args, world)
    finally:
        dist.shutdown()


def _main(args, world) -> int:
    from lab.runfiles import write_json_atomic
    from lab.store import clean_staging, repair_latest, store_lock
    from training import distributed as dist
    from training import pipeline as P

    from training.studies import OPTIONAL_STAGES
    from training.studies import STAGES as STUDY_STAGES

    preset = resolve_preset(args)
    # the optional study stages (hours on a CPU) run only when named: not in the group, not by default
    groups = {"model": list(P.STAGES), "studies": [s for s in STUDY_STAGES if s not in OPTIONAL_STAGES]}
    valid = list(P.STAGES) + list(STUDY_STAGES)

    def expand(text: str) -> list[str]:
        names = [n for part in text.split(",") if part.strip() for n in groups.get(part.strip(), [part.strip()])]
        for n in names:
            if n not in valid:
                raise ValueError(f"unknown stage {n!r}; valid stages: {', '.join(valid)}; groups: model, studies")
        return names

    stages = expand(args.only) or [s for s in valid if s not in OPTIONAL_STAGES]
    explicit = {part.strip() for part in args.only.split(",")} - set(groups)
    skip = expand(args.skip)
    stages = [s for s in stages if s not in skip]
    study_stages = [s for s in stages if s in STUDY_STAGES]
    stages = [s for s in stages if s in P.STAGES]
    from training.data import default_data_root

    data_root = args.data_root or default_data_root()
    if not stages:  # studies alone: one process's work (more workers: --study-workers, or more machines)
        return run_studies(args, preset, study_stages, data_root) if world.main else 0
    # the run folder is the main process's: it picks (and locks) it, the others only learn its name
    run_dir, _run_lock = choose_run_dir(args, preset) if world.main else (None, None)
    run_dir = Path(dist.broadcast_object(str(run_dir) if world.main else None))
    run = P.Run(dir=run_dir, preset=preset, data_root=data_root, download=args.download,
                progress=not args.no_progress and sys.stderr.isatty(), rank=world.rank,
                world_size=world.world_size)
    done = dist.broadcast_object(run.stages_done() if world.main else None)
    resuming = False
    if world.main:
        resuming = bool(done) or (run_dir / "checkpoint.pt").exists()
        if not (run_dir / "config.json").exists():
            write_json_atomic(run.path("config.json"), {"preset": _preset_dict(preset), "argv": sys.argv[1:]})
    run.log(f"== run_all.py --preset {preset.name}: {preset.description}")
    run.log(f"run folder: {run_dir}" + (f" (resuming; done: {', '.join(done) or 'none'})" if resuming else ""))
    if world.distributed:
        run.log(f"{world.world_size} processes ({world.backend}): batch {preset.config().batch_size} split "
                f"{preset.config().batch_size // world.world_size} per process")

    lock = store_lock() if "publish" in stages and world.main else None
    t0 = time.perf_counter()
    try:
        if lock:
            lock.__enter__()
            clean_staging()
            for tag in repair_latest():
                run.log(f"repaired the latest pointer of {tag}")
        funcs = {"train": P.stage_train, "evaluate": P.stage_evaluate, "students": P.stage_students,
                 "export": P.stage_export, "publish": P.stage_publish}
        for stage in stages:
            if stage in done and stage not in explicit:  # named in --only: run again; else done is done
                run.log(f"-- {stage}: already done in this run folder")
                continue
            if stage != "train" and dist.current().distributed:
                _leave_group(run)  # evaluate, export and publish are the main process's alone
                if not world.main:
                    return 0
            run.log(f"-- {stage}")
            ts = time.perf_counter()
            funcs[stage](run)
            if world.main:
                run.mark_done(stage)
            run.log(f"-- {stage} done in {time.perf_counter() - ts:.1f} s")
        if dist.current().distributed:
            _leave_group(run)
            if not world.main:
                return 0
    finally:
        if lock:
            lock.__exit__(None, None, None)
    from training.report import write_summary

    summary = write_summary(run)
    if set(P.STAGES) <= set(run.stages_done()):
        (run_dir / "DONE").write_text(datetime.now().isoformat())
    if args.report or args.report_load:
        write_report(run, args)
    if study_stages:
        run_studies(args, preset, study_stages, data_root, log=run.log)
    run.log(f"== finished in {time.perf_counter() - t0:.1f} s; summary: {summary}")
    run.log(f"run folder: {run_dir}")
    return 0


def study_workers(requested: int | None, preset: str) -> int:
    """Worker processes per study grid. By default one single-threaded worker per core: on 2 cores, two
    1-thread processes get through the architectures stage's cells about 1.24x faster than one 2-thread
    process (`python bench/study_budget.py --workers 1,2`); smoke's grids are shorter than a helper's start
    (importing torch, decoding the data)."""
    from lab.hardware import cores

    if requested is not None:
        return max(1, requested)
    return 1 if preset == "smoke" else max(1, cores())


def run_studies(args, preset, stages: list[str], data_root: Path, log=None) -> int:
    """The study stages: each runs (or resumes) its grid and writes its section; then the report."""
    from training.studies import STAGES, write_report as write_study_report
    from training.studies.common import STUDY_PRESETS, StudyContext, get_study_preset
    from lab.paths import default_runs_dir

    study_preset = get_study_preset(preset.name if preset.name in STUDY_PRESETS else "quick")
    out = args.studies_dir or (args.runs_dir or default_runs_dir()) / f"studies-{study_preset.name}"
    out.mkdir(parents=True, exist_ok=True)
    storage = args.study_storage or f"sqlite:///{(out / 'results.db').resolve()}"
    log = log or _printer(out / "studies.log")
    ctx = StudyContext(study_preset, data_root, out, storage, command="", fresh=args.restart_studies,
                       progress=not args.no_progress and sys.stderr.isatty(), log=log,
                       data_seed=args.data_seed or 0, workers=study_workers(args.study_workers, study_preset.name),
                       image_folder=args.image_folder)
    t0 = time.perf_counter()
    for stage in stages:
        command = _study_command(args, stage)
        log(f"-- study {stage}: {command}")
        ts = time.perf_counter()
        ctx.stage = stage
        STAGES[stage](ctx, command)
        log(f"-- study {stage} done in {time.perf_counter() - ts:.0f} s")
    report = write_study_report(ctx)
    log(f"== studies finished in {time.perf_counter() - t0:.0f} s; report: {report}")
    log(f"studies folder: {out}")
    return 0


def _study_command(args, stage: str) -> str:
    cmd = f"python training/run_all.py --preset {args.preset} --only {stage}"
    if args.data_root:
        cmd += f" --data-root {args.data_root}"
    if args.study_storage:
        cmd += f" --study-storage '{args.study_storage}'"
    if args.data_seed:
        cmd += f" --data-seed {args.data_seed}"
    return cmd


def _printer(path: Path):
    def log(msg: str = "") -> None:
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def _leave_group(run) -> None:
    """All processes meet once the training is written (a barrier), then leave the process group: the
    others exit, the main process goes on alone (no collective waits on its single-process stages)."""
    from training import distributed as dist

    dist.barrier()
    dist.shutdown()
    run.log("-- the other processes are done; the main process continues alone")


def write_report(run, args) -> None:
    """The combined report of bench/report.py for the model this run published (a subprocess: the
    training side never imports bench/)."""
    import subprocess

    tag = run.files.published().tag
    cmd = [sys.executable, "-m", "bench.report", "--model", tag, "--out", str(run.dir / "report")]
    if args.data_root:
        cmd += ["--data-root", str(args.data_root)]
    if not args.report_load:
        cmd.append("--no-load")
    run.log("-- report: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        run.log(line)
    if proc.returncode != 0:
        raise ReportError(f"the report failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    run.log(f"-- report done: {run.dir / 'report'}")


class ReportError(RuntimeError):
    pass


def cli(argv=None) -> int:
    """main() with every expected failure turned into one clear line and exit status 2."""
    from lab.card import IntegrityError
    from lab.runfiles import MissingArtifact
    from lab.store import StoreBusyError
    from models.registry import UnknownModelError
    from training.checkpoint import CheckpointError
    from training.data import DataError
    from training.export import ExportError
    from training.optim import ConfigError

    from training.studies.runner import StudyError

    expected = (DataError, UnknownModelError, ConfigError, CheckpointError, StoreBusyError, MissingArtifact,
                ExportError, IntegrityError, ValueError, ReportError, FloatingPointError, StudyError)
    try:
        return main(argv)
    except expected as e:
        if os.environ.get("LAB_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        if not os.environ.get("LAB_DEBUG"):
            print("(LAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
