"""Hyper-parameter tuning with Optuna: the course reports' search spaces, pruning on per-epoch held-out
accuracy, many workers on one study through a database, the best trial compared with the untuned baseline
on the test set, and the best trial retrained, exported and published.

Search spaces (each a named, documented choice; each holds its untuned baseline as one of its points):
  cnn  the seeds' CNN on CIFAR-10 (`simple_cnn`): n_layers 1-5, kernel_size 3, 5 or 7 (odd sizes keep
       "same" padding exact: an even kernel would change the feature-map size), optimizer in
       {Adam, RMSprop, SGD} (SGD: momentum 0-0.99 and Nesterov or not), lr 1e-5..1e-1 log-uniform,
       LR schedule constant | onecycle | cosine, epochs 1..the preset's maximum.
       Baseline: the studies' CNN and recipe (3 conv layers, 3x3, `study_sgd`: SGD with Nesterov momentum
       0.9, one-cycle schedule, peak LR 0.05 at batch 128, the study preset's epochs)
  mlp  the seeds' MLP on MNIST (`mlp`): n_layers 1-3, per layer n_units_l{i} 32..512 (log) and
       dropout_l{i} 0-0.5, the same optimizer, lr, schedule and epochs choices.
       Baseline: the registry's MLP (512 and 256 units, no dropout) with `adam_mlp` (Adam, LR 1e-3, cosine)

Every trial trains with the same seed (TUNING_SEED, none of the evaluation seeds), so trials differ by
their settings only; trial 0 is the untuned baseline. Each trial trains on the study's training images and
is scored on held-out training images (never the test set); it reports that accuracy after every epoch,
and a MedianPruner stops trials that fall below the median of earlier trials at the same epoch (a trial
with a long schedule is judged at its early epochs against the same epochs of others, and a trial whose
loss diverges is pruned too). The best held-out value is the maximum over all trials on one validation
set, so it flatters the winner; the best trial and the baseline are therefore both trained again on the
evaluation seeds and compared on the test set, with a t-interval over seeds and test images
(training/studies/stats.py). The baseline is trained there for as many epochs as the best trial chose
(trials may choose 1..the preset's maximum, the baseline trial trains the study preset's epochs): tuned
and untuned are compared at the same training budget.

Workers: any number of processes on any number of machines, each running `training/tune.py` with the
same --storage and --study-name; together they finish exactly --n-trials trials (a worker claims a trial
only while fewer than that many are finished, running or queued; a trial that loses the race is marked
failed as "surplus" before it trains). The process that creates the study queues the baseline as its
first trial; the others load it. Each trial records its worker (host:pid). A killed worker's running
trial stops sending heartbeats; after 30 s the next worker to look fails it and queues its parameters
again, so a restart continues the study to its count. Once the study is complete, exactly one process
(not --worker-only) does what follows it, the comparison, the report and the published model: the first to
claim it in the study's own database (claim_after_study, training/studies/claim.py); the others name it and
exit.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from training.studies.common import CLIPPED_HEADER, Section, Spread, StudyContext, grid, plt, train_cell
from training.studies.runner import Cell, GridSpec, StudyError, storage_for

OPTIMIZER_CHOICES = ("Adam", "RMSprop", "SGD")
# Each schedule with the warm-up and final LR factor it trains with: onecycle as in the `study_sgd` recipe
# (20 % warm-up from 0.2x, then linear to 0), cosine as in `adam_mlp` (no warm-up, down to 0).
SCHEDULES = {"constant": dict(schedule="constant", warmup=0.0, final_lr=0.0),
             "onecycle": dict(schedule="onecycle", warmup=0.2, final_lr=0.0),
             "cosine": dict(schedule="cosine", warmup=0.0, final_lr=0.0)}
TUNING_SEED = 100  # every trial's seed: not one of the evaluation seeds (the study presets' 0, 1, 2, ...)
TRAIN_KEYS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup", "final_lr", "epochs")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    dataset: str
    model: str
    description: str
    baseline_recipe: str                                  # the untuned settings: a recipe of training/recipes.py
    baseline_kwargs: dict = field(default_factory=dict)   # ... and the untuned model

    def suggest(self, trial, epoch_range: tuple[int, int] = (1, 6)) -> tuple[dict, dict]:
        """(model kwargs, training settings) for this trial; epoch_range is (fewest, most) epochs."""
        if self.name == "cnn":
            kwargs = {"n_layers": trial.suggest_int("n_layers", 1, 5),
                      "kernel_size": trial.suggest_int("kernel_size", 3, 7, step=2)}
        else:
            n = trial.suggest_int("n_layers", 1, 3)
            kwargs = {"hidden": [trial.suggest_int(f"n_units_l{i}", 32, 512, log=True) for i in range(n)],
                      "dropout": [trial.suggest_float(f"dropout_l{i}", 0.0, 0.5) for i in range(n)]}
        optimizer = trial.suggest_categorical("optimizer", OPTIMIZER_CHOICES)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        momentum, nesterov = 0.0, False
        if optimizer == "SGD":  # momentum and Nesterov are SGD's own parameters: asked only for SGD
            momentum = trial.suggest_float("momentum", 0.0, 0.99)
            # torch refuses Nesterov without momentum; with momentum 0 both are plain SGD
            nesterov = trial.suggest_categorical("nesterov", (False, True)) and momentum > 0
        schedule = trial.suggest_categorical("schedule", tuple(SCHEDULES))
        epochs = trial.suggest_int("epochs", *epoch_range)
        train = {"optimizer": optimizer.lower(), "lr": lr, "momentum": momentum, "nesterov": nesterov,
                 "weight_decay": 0.0, **SCHEDULES[schedule], "epochs": epochs}
        return kwargs, train

    def baseline(self, batch_size: int, epochs: int, epoch_range: tuple[int, int] = (1, 6)) -> dict:
        """The untuned baseline as this space's parameters: the baseline model and recipe at this batch size
        (the recipe's LR scaled as every study cell scales it) and epochs. Refused if it is not a point of
        the space, so that "tuned vs untuned" never compares against settings the search could not reach."""
        from optuna.trial import FixedTrial

        from training.recipes import make_config

        cfg = make_config(self.baseline_recipe, batch_size=batch_size, epochs=epochs)
        if self.name == "cnn":
            params = {"n_layers": self.baseline_kwargs["n_layers"], "kernel_size": self.baseline_kwargs["kernel_size"]}
        else:
            hidden = self.baseline_kwargs["hidden"]
            drop = self.baseline_kwargs.get("dropout", 0.0)
            drops = list(drop) if isinstance(drop, (list, tuple)) else [drop] * len(hidden)
            params = {"n_layers": len(hidden), **{f"n_units_l{i}": h for i, h in enumerate(hidden)},
                      **{f"dropout_l{i}": d for i, d in enumerate(drops)}}
        params.update(optimizer={o.lower(): o for o in OPTIMIZER_CHOICES}[cfg.optimizer], lr=cfg.lr,
                      schedule=cfg.schedule, epochs=int(epochs))
        if cfg.optimizer == "sgd":
            params.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
        kwargs, train = self.suggest(FixedTrial(params), epoch_range)
        want = {k: getattr(cfg, k) for k in TRAIN_KEYS}
        model_ok = kwargs == _per_layer(self.baseline_kwargs)
        if train != want or not model_ok or not epoch_range[0] <= epochs <= epoch_range[1]:
            raise StudyError(f"the {self.name} space cannot express its baseline ({self.baseline_recipe}, "
                             f"{self.baseline_kwargs}, {epochs} epochs in {epoch_range}): {train} vs {want}")
        return params


def _per_layer(kwargs: dict) -> dict:
    """Model kwargs as the spaces write them: lists, and the MLP's dropout once per hidden layer."""
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
    if "hidden" in out and not isinstance(out.get("dropout"), list):
        out["dropout"] = [out.get("dropout", 0.0)] * len(out["hidden"])
    return out


def _baseline_kwargs(architecture: str, **extra) -> dict:
    """The model kwargs of one of the architecture study's variants (the studies' untuned models)."""
    from training.studies.architectures import ARCHITECTURES

    return {**ARCHITECTURES[architecture]["kwargs"], **extra}


SPACES = {
    "cnn": SearchSpace("cnn", "cifar10", "simple_cnn",
                       "n_layers 1-5, kernel_size 3/5/7, optimizer Adam|RMSprop|SGD (SGD: momentum 0-0.99, "
                       "nesterov), lr 1e-5..1e-1 log, schedule constant|onecycle|cosine, epochs 1..max",
                       "study_sgd", _baseline_kwargs("cnn", kernel_size=3)),  # simple_cnn's default kernel
    "mlp": SearchSpace("mlp", "mnist", "mlp",
                       "n_layers 1-3, n_units_l{i} 32..512 log, dropout_l{i} 0-0.5, optimizer Adam|RMSprop|SGD "
                       "(SGD: momentum 0-0.99, nesterov), lr 1e-5..1e-1 log, schedule constant|onecycle|cosine, "
                       "epochs 1..max",
                       "adam_mlp", _baseline_kwargs("fc", dropout=0.0)),  # the registry MLP's default dropout
}
# Trials of the study and the most epochs a trial may choose; data sizes, the evaluation seeds and the
# baseline's epochs come from the study presets (training/studies/common.py), whose epochs lie in 1..max.
TUNE_PRESETS = {
    "smoke": dict(n_trials=6, max_epochs=2),
    "quick": dict(n_trials=24, max_epochs=6),
    "full": dict(n_trials=100, max_epochs=40),
}


def get_space(name: str) -> SearchSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise StudyError(f"unknown search space {name!r}; valid: {', '.join(SPACES)}") from None


def plan(space: SearchSpace, preset_name: str, study_preset, epochs: int | None = None):
    """(epoch range of the trials, baseline parameters) for a tuning preset: the trials choose 1..max_epochs
    and the baseline trains the study preset's epochs; `epochs` fixes every trial's (and the baseline's)."""
    if epochs is not None:
        epoch_range = (int(epochs), int(epochs))
    else:
        epoch_range = (1, TUNE_PRESETS[preset_name]["max_epochs"])
    base_epochs = epochs if epochs is not None else study_preset.epochs_for("tuning")
    if float(base_epochs) != int(base_epochs):
        raise StudyError(f"the baseline's epochs must be a whole number, got {base_epochs}")
    return epoch_range, space.baseline(study_preset.batch_size, int(base_epochs), epoch_range)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_tuning_study(space: SearchSpace, storage_url: str, study_name: str, fresh: bool = False,
                      sampler: str = "tpe", pruner: str = "median", baseline: dict | None = None):
    """The study (created or loaded). sampler "tpe" (Optuna's default) or "random"; pruner "median" or "none"
    (the benchmark of worker throughput compares like with like: random parameters, no pruning).

    `baseline`: parameters queued as trial 0 by the process that creates the study (the database lets one
    process create a study name, so with several workers exactly one queues it; a loaded study is left as
    it is)."""
    import optuna

    storage = storage_for(storage_url)
    if fresh:
        try:
            optuna.delete_study(study_name=study_name, storage=storage)
        except KeyError:
            pass
    kw = dict(study_name=study_name, storage=storage,
              sampler=optuna.samplers.RandomSampler() if sampler == "random" else optuna.samplers.TPESampler(),
              pruner=optuna.pruners.NopPruner() if pruner == "none"
              else optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1))
    try:
        try:
            study = optuna.create_study(direction="maximize", **kw)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(**kw)
            created = False
    except Exception as e:  # a database that stops answering between opening and creating
        raise StudyError(f"cannot create or load study {study_name!r}: {type(e).__name__}: {e}") from None
    if created:  # this study, not an earlier one of the same name that was deleted: its claims are its own
        study.set_user_attr("instance", uuid.uuid4().hex)
    if created and baseline is not None and not study.get_trials(deepcopy=False):
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
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


def objective_for(ctx: StudyContext, space: SearchSpace, n_trials: int, epoch_range: tuple[int, int], log=print):
    import optuna
    from optuna.trial import TrialState

    def objective(trial):
        trial.set_user_attr("worker", _worker())
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)) if t.number < trial.number]
        if len(earlier) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its {n_trials} trials")
        kwargs, train = space.suggest(trial, epoch_range)
        trial.set_user_attr("seed", TUNING_SEED)

        def report(record):
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record['epoch']}: held-out accuracy {record['val_acc']:.3f} "
                                         f"below the median of earlier trials")

        # one seed for every trial: two trials differ by their settings, not by their initial weights and
        # batch order
        rec = train_cell(ctx, space.dataset, space.model, kwargs, seed=TUNING_SEED, recipe="study_sgd",
                         train=train, stage="tuning", on_epoch=report, evaluate_on="val")
        if rec.get("diverged"):  # the loss turned non-finite: a hopeless setting
            raise optuna.TrialPruned(f"diverged: {rec['diverged']}")
        trial.set_user_attr("train_seconds", rec["train_seconds"])
        trial.set_user_attr("params_count", rec["params"])
        log(f"  trial {trial.number} ({_worker()}): held-out accuracy {100 * rec['val_acc']:.2f}% "
            f"{json.dumps(trial.params)}")
        return rec["val_acc"]

    return objective


def run_worker(ctx: StudyContext, space: SearchSpace, storage_url: str, study_name: str, n_trials: int,
               epoch_range: tuple[int, int], log=print, **study_kw) -> int:
    """Run trials until the study has n_trials counted; returns how many this worker finished."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_tuning_study(space, storage_url, study_name, **study_kw)
    objective = objective_for(ctx, space, n_trials, epoch_range, log)
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
                 epoch_range: tuple[int, int], log=print, poll: float = 2.0, **study_kw):
    """Run trials until the study has its count, then wait for other workers' running trials; a trial that
    goes stale meanwhile (its worker died) is queued again and run here. Returns the study once it is
    complete: n_trials finished, none running or queued (what follows it, see claim_after_study)."""
    import optuna
    from optuna.trial import TrialState

    study = open_tuning_study(space, storage_url, study_name, **study_kw)
    while True:
        run_worker(ctx, space, storage_url, study_name, n_trials, epoch_range, log, **study_kw)
        while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and not _waiting(study):
            time.sleep(poll)
            optuna.storages.fail_stale_trials(study)
        # complete: nothing queued or running, and the count reached (a trial that failed in another worker
        # left a slot: it is run here)
        if not _waiting(study) and _counted(study) >= n_trials:
            return study


def claim_after_study(storage_url: str, study, study_name: str, n_trials: int, publish: bool):
    """Who does what follows the complete study (the test-set comparison, the report and, with `publish`, the
    published model): one process of all those sharing its storage, on any machine. The first to ask
    claims it in the study's database (training/studies/claim.py); that is normally the worker that
    finished the last trial, since the others are waiting for it. Returns the Claim (`.mine`, `.holder`).

    The key names this study (its instance, so a study deleted and made again under the name starts over),
    its trial count and its best trial: a study that grows a new best is published again. A published study
    stays published: a rerun says by whom; a report-only claim is released when done (a rerun reports
    again)."""
    from training.studies.claim import take

    instance = study.user_attrs.get("instance") or f"id{study._study_id}"
    try:
        best = study.best_trial.number
    except ValueError:  # no complete trial
        best = "none"
    what = "publish" if publish else "report"
    return take(storage_url, f"tune/{study_name}/{instance}/{n_trials}/best{best}/{what}")


def baseline_trial(study):
    """The study's baseline trial (queued as trial 0 when the study was created), or None; a retried copy
    of a stale baseline counts, the failed original does not."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("baseline") and t.state != TrialState.FAIL:
            return t
    return None


def statistics(study) -> dict:
    """The seeds' printout: finished / pruned / complete trials, best value and params; plus who ran what,
    the trials' seeds and the baseline trial."""
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
             "seeds": sorted({t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs}),
             "retried": sum("failed_trial" in t.system_attrs for t in trials)}
    if complete:
        best = study.best_trial
        stats.update(best_value=best.value, best_params=best.params, best_number=best.number)
    base = baseline_trial(study)
    if base is not None:
        last = base.intermediate_values[max(base.intermediate_values)] if base.intermediate_values else None
        stats.update(baseline_number=base.number, baseline_state=base.state.name,
                     baseline_value=base.value if base.state == TrialState.COMPLETE else last,
                     baseline_epochs=len(base.intermediate_values))
    return stats


def _baseline_line(stats: dict) -> str:
    if "baseline_number" not in stats:
        return "  none in this study (it was created without one)"
    value = stats["baseline_value"]
    shown = "no value yet" if value is None else f"{value:.4f}"
    if stats["baseline_state"] == "PRUNED":
        shown = f"pruned after epoch {stats['baseline_epochs']} at {shown}"
    return f"  Trial {stats['baseline_number']}, value: {shown}"


def print_statistics(stats: dict, log=print) -> None:
    log("Study statistics:")
    log(f"  Number of finished trials: {stats['finished']}")
    log(f"  Number of pruned trials: {stats['pruned']}")
    log(f"  Number of complete trials: {stats['complete']}")
    log(f"  Stale trials (a worker died; failed and queued again): {stats['failed_stale']}; "
        f"surplus trials (lost the race for the last slot): {stats['failed_surplus']}")
    log(f"  Workers: {', '.join(stats['workers'])}; seed of every trial: {', '.join(map(str, stats['seeds']))}")
    if "best_value" in stats:
        log("Best trial:")
        log(f"  Value: {stats['best_value']:.4f}")
        log("  Params: " + " ".join(f"{k}: {v}" for k, v in stats["best_params"].items()))
    log("Untuned baseline trial:")
    log(_baseline_line(stats))


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
    base = baseline_trial(study)
    if base is not None and base.intermediate_values:
        value = base.value if base.state == TrialState.COMPLETE else base.intermediate_values[
            max(base.intermediate_values)]
        ax.plot([base.number], [100 * value], "*", ms=14, color="tab:red", label="untuned baseline")
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


def best_settings(space: SearchSpace, params: dict, epoch_range: tuple[int, int] = (1, 6)) -> tuple[dict, dict]:
    """A trial's model kwargs and training settings (epochs included), rebuilt from its parameters."""
    import optuna

    return space.suggest(optuna.trial.FixedTrial(params), epoch_range)


def _describe(space: SearchSpace, params: dict, epoch_range: tuple[int, int]) -> str:
    kwargs, train = best_settings(space, params, epoch_range)
    opt = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop"}[train["optimizer"]]
    if train["optimizer"] == "sgd":
        opt += f" (momentum {train['momentum']:.2f}{', Nesterov' if train['nesterov'] else ''})"
    model = ", ".join(f"{k} {v}" for k, v in kwargs.items())
    epochs = f"{train['epochs']} epoch{'s' if train['epochs'] != 1 else ''}"
    return f"{model}; {opt}, LR {train['lr']:.3g}, {train['schedule']} schedule, {epochs}"


def evaluate_best_and_baseline(ctx: StudyContext, space: SearchSpace, study, baseline: dict,
                               epoch_range: tuple[int, int], grid_name: str) -> dict | None:
    """Train the best trial's settings and the baseline on the evaluation seeds (ctx.preset.seeds, none of
    them the tuning seed) and score them on the test images, as a resumable grid; returns what the report
    states about them, or None when the study has no complete trial. The baseline trains the best trial's
    epochs (the same training budget). When the best trial IS the baseline (at its own epochs or the
    best trial's), the settings are trained once."""
    from optuna.trial import TrialState

    from training.studies.stats import compare_all, correct_matrix

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    base = baseline_trial(study)
    # the baseline at the best trial's epochs: both train as long, so a gain is not that of training longer
    matched = {**baseline, "epochs": best.params["epochs"]}
    same = (base is not None and best.number == base.number) or best.params in (baseline, matched)
    variants = {"baseline": best.params} if same else {"tuned": best.params, "baseline": matched}

    def run_cell(cell: Cell) -> dict:
        kwargs, train = best_settings(space, variants[cell.variant], epoch_range)
        rec = train_cell(ctx, cell.dataset, space.model, kwargs, cell.seed, recipe="study_sgd", train=train,
                         stage="tuning", evaluate_on="test")
        rec["variant"] = cell.variant
        return rec

    cells = [Cell(space.dataset, v, s) for v in variants for s in ctx.preset.seeds]
    config = {"stage": grid_name, "space": space.name, "variants": variants, "preset": ctx.preset.name,
              "train_limit": ctx.preset.train_limit, "test_limit": ctx.preset.test_limit,
              "batch_size": ctx.preset.batch_size, "data_seed": ctx.data_seed}
    records = grid(ctx, GridSpec(grid_name, cells, config, run_cell))
    by = {v: [r for r in records.values() if r["variant"] == v] for v in variants}
    out = {"same": same, "best_number": best.number, "records": records, "epochs": best.params["epochs"],
           "baseline_epochs": baseline["epochs"],
           "spread": {v: Spread.of(r["test_acc"] for r in recs) for v, recs in by.items()},
           "diverged": sorted(r["cell"] for r in records.values() if r.get("diverged")),
           "settings": {v: _describe(space, p, epoch_range) for v, p in variants.items()}}
    if not same:
        out["comparison"] = compare_all([(f"tuned (trial {best.number})", correct_matrix(by["tuned"]),
                                          f"untuned baseline (at the tuned {matched['epochs']} epochs)",
                                          correct_matrix(by["baseline"]), "")])[0]
    return out


def section(ctx: StudyContext, space: SearchSpace, study, study_name: str, storage_url: str, n_trials: int,
            seconds: float, command: str, published: dict | None, evaluation: dict | None = None) -> Section:
    from training.studies.runner import _safe_url

    stats = statistics(study)
    out = ctx.stage_dir("tuning")
    sec = Section("tuning", "6. Hyper-parameter tuning with Optuna", command)
    sec.add(__doc__.split("\n\n", 1)[1].split("\n\nWorkers:")[0].strip(), "",
            f"Study `{study_name}` in `{_safe_url(storage_url)}`, search space **{space.name}** ({space.description}) "
            f"on {space.dataset}; {n_trials} trials requested, every one with seed "
            f"{', '.join(map(str, stats['seeds'])) or TUNING_SEED}.", "",
            "```", f"Number of finished trials: {stats['finished']}", f"Number of pruned trials: {stats['pruned']}",
            f"Number of complete trials: {stats['complete']}",
            f"Stale trials (dead worker, failed and queued again): {stats['failed_stale']}",
            f"Surplus trials (lost the race for the last slot): {stats['failed_surplus']}",
            f"Workers: {', '.join(stats['workers'])}")
    if "best_value" in stats:
        sec.add("Best trial:", f"  Value: {stats['best_value']:.4f} (held-out accuracy)",
                "  Params: " + " ".join(f"{k}: {v}" for k, v in stats["best_params"].items()))
    sec.add("Untuned baseline trial:", _baseline_line(stats))
    sec.add("```", "")
    if "best_value" in stats:
        val_images = ctx.preset.val_images
        held = f"Held-out accuracy (one validation set of {val_images:,} training images): best trial " \
               f"{stats['best_number']} **{100 * stats['best_value']:.2f}%**"
        if "baseline_number" in stats and stats["baseline_value"] is not None:
            pruned = " (pruned)" if stats["baseline_state"] == "PRUNED" else ""
            held += (f", untuned baseline (trial {stats['baseline_number']}) "
                     f"{100 * stats['baseline_value']:.2f}%{pruned}")
        sec.add(held + f". The best value is the maximum over {stats['finished']} finished trials on that one "
                       f"validation set and one seed: it is optimistic (the winner of a selection is partly the "
                       f"luckiest), which is why the comparison below, on the test set with fresh seeds "
                       f"{', '.join(map(str, ctx.preset.seeds))} that no trial used, is the one that counts.", "")
    if evaluation is not None:
        sp = evaluation["spread"]
        if evaluation["same"]:
            clipped = sec.clipping({"baseline": list(evaluation["records"].values())})
            longer = ("" if evaluation["epochs"] == evaluation["baseline_epochs"] else
                      f" (trained for {evaluation['epochs']} epochs, not the baseline trial's "
                      f"{evaluation['baseline_epochs']})")
            sec.add(f"The best trial is the untuned baseline itself{longer}: in {stats['finished']} trials tuning "
                    f"found nothing better on the held-out images. Trained once on the evaluation seeds: test accuracy "
                    f"**{sp['baseline'].pct()}** ({sp['baseline'].n} seeds; {evaluation['settings']['baseline']}"
                    + (f"; clipped steps {clipped['baseline']}" if clipped is not None else "") + ").", "")
        else:
            by = {v: [r for r in evaluation["records"].values() if r["variant"] == v] for v in ("tuned", "baseline")}
            clipped = sec.clipping(by)
            rows = [[f"tuned (trial {evaluation['best_number']})", evaluation["settings"]["tuned"], sp["tuned"].pct()],
                    ["untuned baseline", evaluation["settings"]["baseline"], sp["baseline"].pct()]]
            if clipped is not None:
                rows = [row + [clipped[v]] for row, v in zip(rows, ("tuned", "baseline"))]
            sec.add(f"Both trained on the evaluation seeds and scored on the test set (mean ± std over "
                    f"{sp['tuned'].n} seeds), **for the same number of epochs**: the baseline trains as long as the "
                    f"best trial chose to ({evaluation['epochs']}; the baseline trial trained the preset's "
                    f"{evaluation['baseline_epochs']}), so that the difference is tuning's, not that of a longer "
                    "training:", "")
            sec.table(["variant", "settings", "test accuracy"] + ([CLIPPED_HEADER] if clipped is not None else []),
                      rows)
            sec.add(evaluation["comparison"].sentence(1), "")
        if evaluation["diverged"]:
            sec.add(f"Diverged (loss not finite; scored as they stood): {', '.join(evaluation['diverged'])}.", "")
    for png in plots(study, out):
        sec.image(png, png.stem)
    if published:
        sec.add(f"The best trial retrained with its parameters ({published['epochs']:g} epochs), exported, parity-checked "
                f"and published as **`{published['tag']}`**: served accuracy (ONNX, full test set) "
                f"{100 * published['served_accuracy']:.2f}%.", "")
    sec.add("Throughput with 1 and 2 worker processes on one machine: `python bench/tuning_throughput.py` "
            "(see docs/studies.md for the figures and what limits them).", "")
    sec.write(ctx, seconds, records=evaluation["records"] if evaluation else None)
    return sec


def tuning_stage(ctx: StudyContext, command: str) -> Section:
    """The run_all.py stage: the cnn search space on the study's storage, the best trial compared with the
    untuned baseline on the test set, the best trial published."""
    from training.studies.common import publish_model

    space = SPACES["cnn"]
    preset_name = ctx.preset.name if ctx.preset.name in TUNE_PRESETS else "quick"
    preset = TUNE_PRESETS[preset_name]
    epoch_range, baseline = plan(space, preset_name, ctx.preset)
    name = f"tuning-{space.name}-{ctx.preset.name}"
    t0 = time.perf_counter()
    if ctx.fresh and not ctx.is_worker:
        open_tuning_study(space, ctx.storage, name, fresh=True, baseline=baseline)
    study = finish_study(ctx, space, ctx.storage, name, preset["n_trials"], epoch_range, log=ctx.log,
                         baseline=baseline)
    print_statistics(statistics(study), ctx.log)
    # the grid is named after the stage: --study-workers helpers run this stage to join it
    evaluation = evaluate_best_and_baseline(ctx, space, study, baseline, epoch_range, "tuning")
    published = None
    if evaluation is not None:
        kwargs, train = best_settings(space, study.best_trial.params, epoch_range)
        published = publish_model(ctx, f"{space.dataset}-tuned-{space.name}", space.dataset, space.model, kwargs,
                                  recipe="study_sgd", train=train,
                                  description=f"best trial {study.best_trial.number} of Optuna study {name}")
    return section(ctx, space, study, name, ctx.storage, preset["n_trials"], time.perf_counter() - t0, command,
                   published, evaluation)
