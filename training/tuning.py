"""Hyper-parameter tuning with Optuna (issue 11): the course reports' search spaces, pruning on per-epoch
held-out accuracy, many workers on one study through a database, and the best trial retrained,
exported and published.

Search spaces (each a named, documented choice):
  cnn  the seeds' CNN on CIFAR-10 (`simple_cnn`): n_layers 1-5, kernel_size 3, 5 or 7 (odd sizes keep
       "same" padding exact: an even kernel would change the feature-map size), optimizer in
       {Adam, RMSprop, SGD}, lr 1e-5..1e-1 log-uniform
  mlp  the seeds' MLP on MNIST (`mlp`): n_layers 1-3, per layer n_units_l{i} 32..512 (log) and
       dropout_l{i} 0.2-0.5, the same optimizer and lr choices

Every trial trains on the study's training images and is scored on held-out training images (never
the test set); it reports that accuracy after every epoch, and a MedianPruner stops trials that fall
below the median of earlier trials at the same epoch. A trial whose loss diverges is pruned too.

Workers: any number of processes on any number of machines, each running `training/tune.py` with the
same --storage and --study-name; together they finish exactly --n-trials trials (a worker claims a trial
only while fewer than that many are finished, running or queued; a trial that loses the race is marked
failed as "surplus" before it trains). Each trial records its worker (host:pid). A killed worker's
running trial stops sending heartbeats; after 30 s the next worker to look fails it and queues its
parameters again, so a restart continues the study to its count.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.studies.common import Section, StudyContext, plt, train_cell
from training.studies.runner import StudyError, storage_for

OPTIMIZER_CHOICES = ("Adam", "RMSprop", "SGD")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    dataset: str
    model: str
    description: str

    def suggest(self, trial) -> tuple[dict, dict]:
        """(model kwargs, training settings) for this trial."""
        if self.name == "cnn":
            kwargs = {"n_layers": trial.suggest_int("n_layers", 1, 5),
                      "kernel_size": trial.suggest_int("kernel_size", 3, 7, step=2)}
        else:
            n = trial.suggest_int("n_layers", 1, 3)
            kwargs = {"hidden": [trial.suggest_int(f"n_units_l{i}", 32, 512, log=True) for i in range(n)],
                      "dropout": [trial.suggest_float(f"dropout_l{i}", 0.2, 0.5) for i in range(n)]}
        optimizer = trial.suggest_categorical("optimizer", OPTIMIZER_CHOICES)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        train = {"optimizer": optimizer.lower(), "lr": lr, "schedule": "constant", "warmup": 0.0,
                 "momentum": 0.9 if optimizer == "SGD" else 0.0, "nesterov": False, "weight_decay": 0.0}
        return kwargs, train


SPACES = {
    "cnn": SearchSpace("cnn", "cifar10", "simple_cnn",
                       "n_layers 1-5, kernel_size 3/5/7, optimizer Adam|RMSprop|SGD, lr 1e-5..1e-1 log"),
    "mlp": SearchSpace("mlp", "mnist", "mlp",
                       "n_layers 1-3, n_units_l{i} 32..512 log, dropout_l{i} 0.2-0.5, optimizer Adam|RMSprop|SGD, "
                       "lr 1e-5..1e-1 log"),
}
TUNE_PRESETS = {  # trials of the study; data sizes and epochs come from the study presets
    "smoke": dict(n_trials=6, epochs=2),
    "quick": dict(n_trials=24, epochs=3),
    "full": dict(n_trials=100, epochs=20),
}


def get_space(name: str) -> SearchSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise StudyError(f"unknown search space {name!r}; valid: {', '.join(SPACES)}") from None


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_tuning_study(space: SearchSpace, storage_url: str, study_name: str, fresh: bool = False,
                      sampler: str = "tpe", pruner: str = "median"):
    """The study (created or loaded). sampler "tpe" (Optuna's default) or "random"; pruner "median" or "none"
    (the benchmark of worker throughput compares like with like: random parameters, no pruning)."""
    import optuna

    storage = storage_for(storage_url)
    if fresh:
        try:
            optuna.delete_study(study_name=study_name, storage=storage)
        except KeyError:
            pass
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                    load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler() if sampler == "random"
                                    else optuna.samplers.TPESampler(),
                                    pruner=optuna.pruners.NopPruner() if pruner == "none"
                                    else optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1))
    except Exception as e:  # a database that stops answering between opening and creating
        raise StudyError(f"cannot create or load study {study_name!r}: {type(e).__name__}: {e}") from None
    have = study.user_attrs.get("search_space")
    want = {"name": space.name, "description": space.description, "dataset": space.dataset, "model": space.model}
    if have is None:
        study.set_user_attr("search_space", want)
    elif have != want:
        raise StudyError(f"study {study_name!r} in this storage tunes another search space ({have.get('name')}: "
                         f"{have.get('description')}); its trials are kept. Use another --study-name, or "
                         f"--search-space {have.get('name')}")
    return study


def _counted(study) -> int:
    """Trials that count towards --n-trials: finished (complete or pruned), running, or queued."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING, TrialState.WAITING)))


class Surplus(Exception):
    """This trial lost the race for the last slots of the study: it is failed before it trains."""


def objective_for(ctx: StudyContext, space: SearchSpace, n_trials: int, epochs: float, log=print):
    import optuna
    from optuna.trial import TrialState

    def objective(trial):
        trial.set_user_attr("worker", _worker())
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)) if t.number < trial.number]
        if len(earlier) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its {n_trials} trials")
        kwargs, train = space.suggest(trial)

        def report(record):
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record['epoch']}: held-out accuracy {record['val_acc']:.3f} "
                                         f"below the median of earlier trials")

        try:
            rec = train_cell(ctx, space.dataset, space.model, kwargs, seed=trial.number, recipe="study_sgd",
                             train={**train, "epochs": epochs}, stage="tuning", on_epoch=report, evaluate_on="val")
        except FloatingPointError as e:  # the loss diverged: a hopeless setting
            raise optuna.TrialPruned(f"diverged: {e}") from None
        trial.set_user_attr("train_seconds", rec["train_seconds"])
        trial.set_user_attr("params_count", rec["params"])
        log(f"  trial {trial.number} ({_worker()}): held-out accuracy {100 * rec['test_acc']:.2f}% "
            f"{json.dumps(trial.params)}")
        return rec["test_acc"]

    return objective


def run_worker(ctx: StudyContext, space: SearchSpace, storage_url: str, study_name: str, n_trials: int,
               epochs: float, log=print, **study_kw) -> int:
    """Run trials until the study has n_trials counted; returns how many this worker finished."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_tuning_study(space, storage_url, study_name, **study_kw)
    objective = objective_for(ctx, space, n_trials, epochs, log)
    done = 0
    while True:
        optuna.storages.fail_stale_trials(study)
        if _counted(study) >= n_trials and not _waiting(study):
            break
        study.optimize(objective, n_trials=1, catch=(Surplus,))
        done += 1
    return done


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def finish_study(ctx: StudyContext, space: SearchSpace, storage_url: str, study_name: str, n_trials: int,
                 epochs: float, log=print, poll: float = 2.0, **study_kw):
    """Run trials until the study has its count, then wait for other workers' running trials; a trial that
    goes stale meanwhile (its worker died) is queued again and run here. Returns the study."""
    import optuna
    from optuna.trial import TrialState

    study = open_tuning_study(space, storage_url, study_name, **study_kw)
    while True:
        run_worker(ctx, space, storage_url, study_name, n_trials, epochs, log, **study_kw)
        while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and not _waiting(study):
            time.sleep(poll)
            optuna.storages.fail_stale_trials(study)
        if not _waiting(study):
            return study


def statistics(study) -> dict:
    """The seeds' printout: finished / pruned / complete trials, best value and params; plus who ran what."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_state = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    surplus = sum(bool(t.user_attrs.get("surplus")) for t in trials)
    stale = sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in trials)
    stats = {"finished": by_state["COMPLETE"] + by_state["PRUNED"], "pruned": by_state["PRUNED"],
             "complete": by_state["COMPLETE"], "running": by_state["RUNNING"], "waiting": by_state["WAITING"],
             "failed_stale": stale, "failed_surplus": surplus,
             "workers": sorted({t.user_attrs.get("worker", "?") for t in trials if t.state != TrialState.FAIL
                                or not t.user_attrs.get("surplus")}),
             "retried": sum("failed_trial" in t.system_attrs for t in trials)}
    if complete:
        best = study.best_trial
        stats.update(best_value=best.value, best_params=best.params, best_number=best.number)
    return stats


def print_statistics(stats: dict, log=print) -> None:
    log("Study statistics:")
    log(f"  Number of finished trials: {stats['finished']}")
    log(f"  Number of pruned trials: {stats['pruned']}")
    log(f"  Number of complete trials: {stats['complete']}")
    log(f"  Stale trials (a worker died; failed and queued again): {stats['failed_stale']}; "
        f"surplus trials (lost the race for the last slot): {stats['failed_surplus']}")
    log(f"  Workers: {', '.join(stats['workers'])}")
    if "best_value" in stats:
        log("Best trial:")
        log(f"  Value: {stats['best_value']:.4f}")
        log("  Params: " + " ".join(f"{k}: {v}" for k, v in stats["best_params"].items()))


def plots(study, out: Path) -> list[Path]:
    """Optimization history, parameter importances, intermediate values (matplotlib, PNG)."""
    import optuna
    from optuna.trial import TrialState

    p = plt()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    paths = []
    fig, ax = p.subplots(figsize=(7, 4))
    xs = [t.number for t in complete]
    ys = [100 * t.value for t in complete]
    ax.plot(xs, ys, "o", label="complete trial")
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.plot(xs, best, "-", label="best so far")
    pr = [t for t in trials if t.state == TrialState.PRUNED]
    ax.plot([t.number for t in pr], [100 * max(t.intermediate_values.values(), default=0) for t in pr], "x",
            color="gray", label="pruned (last reported value)")
    ax.set(xlabel="trial", ylabel="held-out accuracy, %", title="optimization history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "history.png")
    fig.savefig(paths[-1], dpi=100)
    p.close(fig)
    if len(complete) >= 2:
        try:
            imp = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):
            imp = {}
        if imp:
            fig, ax = p.subplots(figsize=(6, 3.5))
            names = list(imp)[::-1]
            ax.barh(names, [imp[n] for n in names])
            ax.set(xlabel="importance (fANOVA)", title="parameter importances")
            fig.tight_layout()
            paths.append(out / "importances.png")
            fig.savefig(paths[-1], dpi=100)
            p.close(fig)
    fig, ax = p.subplots(figsize=(7, 4))
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [100 * t.intermediate_values[s] for s in steps], "-o", ms=2, alpha=0.6,
                    color="tab:gray" if t.state == TrialState.PRUNED else "tab:blue")
    ax.set(xlabel="epoch", ylabel="held-out accuracy, %",
           title="intermediate values (blue: complete, gray: pruned)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "intermediate.png")
    fig.savefig(paths[-1], dpi=100)
    p.close(fig)
    return paths


def start_workers(n: int, argv: list[str]) -> list[subprocess.Popen]:
    """n helper processes running the same tune.py command as workers (no report, no publish)."""
    return [subprocess.Popen([sys.executable, "-m", "training.tune", *argv, "--worker-only"],
                             stdout=subprocess.DEVNULL) for _ in range(n)]


def best_settings(space: SearchSpace, params: dict) -> tuple[dict, dict]:
    """The best trial's model kwargs and training settings, rebuilt from its parameters."""
    import optuna

    return space.suggest(optuna.trial.FixedTrial(params))


def section(ctx: StudyContext, space: SearchSpace, study, study_name: str, storage_url: str, n_trials: int,
            seconds: float, command: str, published: dict | None) -> Section:
    from training.studies.runner import _safe_url

    stats = statistics(study)
    out = ctx.stage_dir("tuning")
    sec = Section("tuning", "6. Hyper-parameter tuning with Optuna", command)
    sec.add(__doc__.split("\n\n", 1)[1].split("\n\nWorkers:")[0].strip(), "",
            f"Study `{study_name}` in `{_safe_url(storage_url)}`, search space **{space.name}** ({space.description}) "
            f"on {space.dataset}; {n_trials} trials requested.", "",
            "```", f"Number of finished trials: {stats['finished']}", f"Number of pruned trials: {stats['pruned']}",
            f"Number of complete trials: {stats['complete']}",
            f"Stale trials (dead worker, failed and queued again): {stats['failed_stale']}",
            f"Surplus trials (lost the race for the last slot): {stats['failed_surplus']}",
            f"Workers: {', '.join(stats['workers'])}")
    if "best_value" in stats:
        sec.add("Best trial:", f"  Value: {stats['best_value']:.4f} (held-out accuracy)",
                "  Params: " + " ".join(f"{k}: {v}" for k, v in stats["best_params"].items()))
    sec.add("```", "")
    for png in plots(study, out):
        sec.image(png, png.stem)
    if published:
        sec.add(f"The best trial retrained with its parameters ({published['epochs']:g} epochs), exported, parity-checked "
                f"and published as **`{published['tag']}`**: served accuracy (ONNX, full test set) "
                f"{100 * published['served_accuracy']:.2f}%.", "")
    sec.add("Throughput with 1 and 2 worker processes on one machine: `python bench/tuning_throughput.py` "
            "(see docs/studies.md for the figures and what limits them).", "")
    sec.write(ctx, seconds)
    return sec


def tuning_stage(ctx: StudyContext, command: str) -> Section:
    """The run_all.py stage: the cnn search space on the study's storage, best trial published."""
    from training.studies.common import publish_model

    space = SPACES["cnn"]
    preset = TUNE_PRESETS.get(ctx.preset.name, TUNE_PRESETS["quick"])
    name = f"tuning-{space.name}-{ctx.preset.name}"
    t0 = time.perf_counter()
    if ctx.fresh:
        open_tuning_study(space, ctx.storage, name, fresh=True)
    study = finish_study(ctx, space, ctx.storage, name, preset["n_trials"], preset["epochs"], log=ctx.log)
    print_statistics(statistics(study), ctx.log)
    kwargs, train = best_settings(space, study.best_trial.params)
    published = publish_model(ctx, f"{space.dataset}-tuned-{space.name}", space.dataset, space.model, kwargs,
                              recipe="study_sgd", train={**train, "epochs": preset["epochs"]},
                              description=f"best trial {study.best_trial.number} of Optuna study {name}")
    return section(ctx, space, study, name, ctx.storage, preset["n_trials"], time.perf_counter() - t0, command,
                   published)

