"""Optimizer study settings and Optuna tuning through training/tune.py, against a real PostgreSQL."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO


def tune(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "training" / "tune.py"), "--no-progress", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tune_data(tmp_path_factory) -> Path:
    from tests.fakedata import write_cifar_pickles, write_mnist

    root = tmp_path_factory.mktemp("tunedata")
    write_cifar_pickles(root)
    write_mnist(root)
    return root


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam", "adamw", "rmsprop", "rprop", "adamax"])
def test_every_optimizer_of_the_study_lowers_the_loss(name):
    from models import create_model
    from tests.test_engine import SPEC, tiny_dataset
    from training.engine import train
    from training.recipes import make_config
    from training.studies.optimizers import LR_GRID, OPTIMIZERS

    ds = tiny_dataset()
    settings = dict(OPTIMIZERS[name]["train"])
    if name == "rprop":
        settings["batch_size"] = len(ds)  # Rprop: one full-batch step per epoch
    cfg = make_config("study_sgd", **settings, lr=LR_GRID[name][1], epochs=8 if name == "rprop" else 3,
                      schedule="constant", precision="fp32")
    net = create_model("simple_cnn", num_classes=4, image_size=16, n_layers=2, width=8, hidden=16, seed=0)
    losses = [r["train_loss"] for r in train(net, ds, SPEC, cfg, progress=False, log=lambda *_: None).history]
    assert losses[-1] < losses[0], (name, losses)


def test_bad_storage_urls_are_one_line_errors(tune_data, lab_env):
    for storage, needle in (("nope", "is not a database URL"),
                            ("postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot open the study storage"),
                            ("mysql+nodriver://x@127.0.0.1/db", "cannot open the study storage")):
        proc = tune(["--preset", "smoke", "--data-root", str(tune_data), "--storage", storage], lab_env, timeout=120)
        assert proc.returncode == 2, (storage, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and "Traceback" not in proc.stderr, proc.stderr


def test_a_study_with_another_search_space_is_refused(tune_data, lab_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 't.db'}"
    ok = tune(["--preset", "smoke", "--data-root", str(tune_data), "--storage", storage, "--study-name", "same",
               "--n-trials", "1", "--epochs", "1", "--no-publish"], lab_env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = tune(["--preset", "smoke", "--data-root", str(tune_data), "--storage", storage, "--study-name", "same",
                "--search-space", "mlp", "--n-trials", "1", "--no-publish"], lab_env)
    assert bad.returncode == 2 and "tunes another search space" in bad.stderr and "trials are kept" in bad.stderr
    import optuna

    assert len(optuna.load_study(study_name="same", storage=storage).trials) == 1


def test_two_workers_on_postgresql_finish_exactly_n_trials_prune_a_bad_one_and_publish(tune_data, lab_env,
                                                                                        postgres_url, tmp_path):
    import optuna

    from training.tuning import SPACES, open_tuning_study

    name = f"pg-{time.time_ns()}"
    study = open_tuning_study(SPACES["cnn"], postgres_url, name)
    args = ["--preset", "smoke", "--data-root", str(tune_data), "--storage", postgres_url, "--study-name", name,
            "--n-workers", "2", "--epochs", "3"]
    # First the pruner's 4 start-up trials, all of which learn; only then a deliberately bad one (SGD at
    # LR 1e-5 learns nothing in 3 epochs), so that the median it is held against exists whatever the two
    # workers' timing: which trials have finished when it reports does not depend on the machine's load.
    for layers, kernel in ((1, 3), (2, 3), (2, 5), (3, 3)):
        study.enqueue_trial({"n_layers": layers, "kernel_size": kernel, "optimizer": "Adam", "lr": 3e-3,
                             "schedule": "constant"})
    first = tune([*args, "--n-trials", "4", "--no-publish"], lab_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study.enqueue_trial({"n_layers": 1, "kernel_size": 3, "optimizer": "SGD", "lr": 1e-5, "momentum": 0.9,
                         "nesterov": False, "schedule": "constant"})
    proc = tune([*args, "--n-trials", "8"], lab_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=postgres_url)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 8, [(t.number, t.state.name) for t in study.trials]
    workers = {t.user_attrs.get("worker") for t in finished}
    assert len(workers) >= 2, workers  # both processes of a run took trials
    bad = next(t for t in finished if t.params["lr"] == 1e-5)
    assert bad.state.name == "PRUNED", [(t.number, t.state.name, t.params, t.intermediate_values) for t in finished]
    assert "Number of pruned trials:" in proc.stdout and "Best trial:" in proc.stdout
    # the best trial and the baseline were trained again on the evaluation seeds and compared on the test set
    section = (tmp_path / "runs" / "tuning" / name / "tuning" / "section.md").read_text()
    assert "untuned baseline" in section and "95 % CI" in section, section
    tag = next(line.split("published ")[1].split(":")[0] for line in proc.stdout.splitlines()
               if line.strip().startswith("published cifar10-tuned-cnn"))
    assert tag == "cifar10-tuned-cnn-smoke"  # a smoke run never adds a version to a real study's model
    from bench.server import Server

    with Server(lab_env, tmp_path / "serve.log", {"LAB_DEFAULT_MODEL": "cifar10-tuned-cnn-smoke"}) as s:
        from tests.test_service import good_image

        r = requests.post(f"{s.url}/classify", data=good_image(), headers={"Content-Type": "image/png"},
                          params={"model": "cifar10-tuned-cnn-smoke"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"].startswith("cifar10-tuned-cnn-smoke:"), r.text
    optuna.delete_study(study_name=name, storage=postgres_url)


def test_a_killed_worker_loses_no_finished_trial_and_a_restart_completes_the_study(tune_data, lab_env, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'kill.db'}"
    env = dict(lab_env, LAB_STUDY_GRACE_S="3")
    args = [sys.executable, str(REPO / "training" / "tune.py"), "--no-progress", "--preset", "smoke",
            "--data-root", str(tune_data), "--storage", storage, "--study-name", "killed", "--n-trials", "6",
            "--epochs", "2", "--no-publish"]
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it in the middle of a trial, after at least one has finished
        time.sleep(0.05)
        try:
            states = [t.state.name for t in optuna.load_study(study_name="killed", storage=storage).trials]
        except KeyError:  # the study is not created yet
            continue
        if "COMPLETE" in states and states[-1] == "RUNNING":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in optuna.load_study(study_name="killed", storage=storage).trials
              if t.state.name == "COMPLETE"}
    assert len(before) >= 1
    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    study = optuna.load_study(study_name="killed", storage=storage)
    after = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert all(after.get(n) == v for n, v in before.items())  # nothing finished was lost or redone
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 6
    assert "Stale trials (a worker died; failed and queued again): 1" in again.stdout, again.stdout[-2000:]


# ---------------------------------------------------------------- the baseline, the seed and the test-set comparison
# These run the tuning code in this process with training replaced by a stand-in (`fake_training`): what is
# checked is which settings and seeds the trials and the evaluation train with, not what they learn.


@pytest.fixture
def fake_training(monkeypatch):
    """training.tuning.train_cell replaced: records each call's (seed, kwargs, train, evaluate_on) and returns a
    record like the real one (per-epoch val_acc to the pruner; test_correct when scored on the test set)."""
    import numpy as np

    import training.tuning as T
    from training.studies.stats import pack_correct

    calls = []

    def train_cell(ctx, dataset, model, kwargs, seed, *, recipe, train=None, stage="", on_epoch=None,
                   evaluate_on="test"):
        calls.append({"seed": seed, "kwargs": kwargs, "train": dict(train), "evaluate_on": evaluate_on})
        acc = 0.5 + (0.3 if train["optimizer"] == "adam" else 0.0)
        for epoch in range(1, train["epochs"] + 1):
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "val_acc": acc * epoch / train["epochs"]})
        rec = {"val_acc": acc, "diverged": "", "train_seconds": 0.0, "params": 1, "seed": seed}
        if evaluate_on == "test":
            rng = np.random.default_rng(seed)
            rec.update(test_acc=acc, test_images=200, test_correct=pack_correct(rng.random(200) < acc))
        return rec

    monkeypatch.setattr(T, "train_cell", train_cell)
    return calls


def _smoke_ctx(tmp_path):
    from training.studies.common import StudyContext, get_study_preset

    return StudyContext(get_study_preset("smoke"), tmp_path / "data", tmp_path / "out",
                        f"sqlite:///{tmp_path / 'grid.db'}", command="", progress=False, log=lambda *_: None)


def test_the_space_expresses_each_baseline_as_the_recipe_and_model_the_studies_use():
    import inspect

    from optuna.trial import FixedTrial

    from models import count_parameters, create_model
    from models.mlp import mlp
    from models.simple_cnn import simple_cnn
    from training.recipes import make_config
    from training.studies.architectures import ARCHITECTURES
    from training.studies.common import STUDY_PRESETS
    from training.tuning import SPACES, TRAIN_KEYS, TUNE_PRESETS, plan

    for preset in STUDY_PRESETS.values():
        for space, recipe in ((SPACES["cnn"], "study_sgd"), (SPACES["mlp"], "adam_mlp")):
            epoch_range, params = plan(space, preset.name, preset)
            assert epoch_range == (1, TUNE_PRESETS[preset.name]["max_epochs"])
            kwargs, train = space.suggest(FixedTrial(params), epoch_range)
            cfg = make_config(recipe, batch_size=preset.batch_size, epochs=preset.epochs_for("tuning"))
            assert train == {k: getattr(cfg, k) for k in TRAIN_KEYS}, (space.name, preset.name)
            assert epoch_range[0] <= train["epochs"] <= epoch_range[1]
            if space.name == "cnn":  # the architecture study's CNN, with simple_cnn's default kernel
                default_kernel = inspect.signature(simple_cnn).parameters["kernel_size"].default
                assert kwargs == {**ARCHITECTURES["cnn"]["kwargs"], "kernel_size": default_kernel}
                same = create_model("simple_cnn", **ARCHITECTURES["cnn"]["kwargs"])
            else:  # the registry's MLP at its defaults
                defaults = inspect.signature(mlp).parameters
                assert kwargs == {"hidden": list(defaults["hidden"].default),
                                  "dropout": [defaults["dropout"].default] * len(defaults["hidden"].default)}
                same = create_model("mlp", in_channels=1, image_size=28)
            assert count_parameters(create_model(space.model, **({"in_channels": 1, "image_size": 28}
                                                                  if space.name == "mlp" else {}), **kwargs)) \
                == count_parameters(same)
    # on quick, as the studies train their CNN: SGD, Nesterov momentum 0.9, one-cycle to peak LR 0.05, the
    # study preset's epochs
    _, params = plan(SPACES["cnn"], "quick", STUDY_PRESETS["quick"])
    _, train = SPACES["cnn"].suggest(FixedTrial(params))
    assert (train["optimizer"], train["momentum"], train["nesterov"], train["schedule"], train["lr"],
            train["epochs"]) == ("sgd", 0.9, True, "onecycle", 0.05, STUDY_PRESETS["quick"].epochs_for("tuning"))
    assert train["epochs"] == 3
    # --epochs N fixes every trial's epochs, the baseline's included
    epoch_range, params = plan(SPACES["cnn"], "quick", STUDY_PRESETS["quick"], epochs=3)
    assert epoch_range == (3, 3) and params["epochs"] == 3


def test_the_baseline_is_trial_0_and_is_queued_once_however_often_the_study_is_opened(tmp_path, fake_training):
    import optuna

    from training.studies.common import STUDY_PRESETS
    from training.tuning import SPACES, open_tuning_study, plan, run_worker, statistics

    space = SPACES["cnn"]
    epoch_range, baseline = plan(space, "smoke", STUDY_PRESETS["smoke"])
    url = f"sqlite:///{tmp_path / 't.db'}"
    for _ in range(2):
        study = open_tuning_study(space, url, "s", baseline=baseline, sampler="random")
    assert [(t.number, t.state.name, t.system_attrs["fixed_params"], t.user_attrs) for t in study.trials] == \
        [(0, "WAITING", baseline, {"baseline": True})]
    run_worker(None, space, url, "s", 4, epoch_range, log=lambda *_: None, baseline=baseline, sampler="random")
    open_tuning_study(space, url, "s", baseline=baseline)  # a worker that joins later queues nothing
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert len(trials) == 4 and trials[0].params == baseline and trials[0].state.name == "COMPLETE"
    assert [t.number for t in trials if t.user_attrs.get("baseline")] == [0]
    assert sum(t.params == baseline for t in trials) == 1
    stats = statistics(optuna.load_study(study_name="s", storage=url))
    assert stats["baseline_number"] == 0 and stats["baseline_value"] == pytest.approx(0.5)
    # started over: the new study gets its baseline again, as trial 0
    study = open_tuning_study(space, url, "s", fresh=True, baseline=baseline)
    assert [(t.number, t.system_attrs["fixed_params"]) for t in study.trials] == [(0, baseline)]


OPEN_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from training.studies.common import STUDY_PRESETS
    from training.tuning import SPACES, open_tuning_study, plan
    ready = Path(sys.argv[2])
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < int(sys.argv[3]):  # start together
        time.sleep(0.01)
    _, baseline = plan(SPACES["cnn"], "smoke", STUDY_PRESETS["smoke"])
    open_tuning_study(SPACES["cnn"], sys.argv[1], "race", baseline=baseline)
""")


def test_workers_that_create_the_study_at_once_queue_one_baseline(tmp_path, lab_env):
    import optuna

    from training.studies.runner import storage_for

    url = f"sqlite:///{tmp_path / 'race.db'}"
    storage_for(url)  # the tables exist: the race is the study's creation, not the schema's
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_SCRIPT, url, str(ready), "3"], env=lab_env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="race", storage=url).trials
    assert [(t.number, t.user_attrs) for t in trials] == [(0, {"baseline": True})]


def test_every_trial_trains_with_the_one_tuning_seed(tmp_path, fake_training):
    from training.studies.common import STUDY_PRESETS
    from training.tuning import SPACES, TUNING_SEED, open_tuning_study, plan, run_worker, statistics

    space = SPACES["mlp"]
    assert not any(TUNING_SEED in p.seeds for p in STUDY_PRESETS.values())  # never an evaluation seed
    epoch_range, baseline = plan(space, "smoke", STUDY_PRESETS["smoke"])
    url = f"sqlite:///{tmp_path / 't.db'}"
    run_worker(None, space, url, "seeds", 6, epoch_range, log=lambda *_: None, baseline=baseline, sampler="random",
               pruner="none")
    assert len(fake_training) == 6 and {c["seed"] for c in fake_training} == {TUNING_SEED}
    assert {c["evaluate_on"] for c in fake_training} == {"val"}  # a trial never sees the test set
    assert len({json.dumps(c["train"], sort_keys=True) for c in fake_training}) > 1  # the settings differ
    study = open_tuning_study(space, url, "seeds")
    assert statistics(study)["seeds"] == [TUNING_SEED]


@pytest.mark.parametrize("best_is_baseline", [False, True])
def test_the_best_trial_and_the_baseline_are_compared_on_the_test_set_with_the_evaluation_seeds(
        tmp_path, fake_training, best_is_baseline):
    from training.studies.common import STUDY_PRESETS
    from training.tuning import (SPACES, TUNING_SEED, evaluate_best_and_baseline, open_tuning_study, plan,
                                 run_worker, section)

    ctx = _smoke_ctx(tmp_path)
    space = SPACES["cnn"]
    epoch_range, baseline = plan(space, "smoke", STUDY_PRESETS["smoke"])
    url = f"sqlite:///{tmp_path / 't.db'}"
    study_kw = dict(baseline=baseline, sampler="random", pruner="none")
    study = open_tuning_study(space, url, "cmp", **study_kw)
    adam = {**baseline, "optimizer": "Adam", "epochs": baseline["epochs"] + 1}   # trains longer than the baseline
    del adam["momentum"], adam["nesterov"]
    # the stand-in scores Adam 0.8 and SGD 0.5: an Adam trial wins, unless every other trial is SGD too
    study.enqueue_trial({**baseline, "lr": 1e-3} if best_is_baseline else adam)
    run_worker(ctx, space, url, "cmp", 2, epoch_range, log=lambda *_: None, **study_kw)
    trials_calls = len(fake_training)
    evaluation = evaluate_best_and_baseline(ctx, space, study, baseline, epoch_range, "cmp-evaluation")
    cells = fake_training[trials_calls:]
    assert {c["evaluate_on"] for c in cells} == {"test"} and TUNING_SEED not in {c["seed"] for c in cells}
    section(ctx, space, study, "cmp", url, 2, 1.0, "python training/tune.py", None, evaluation)
    text = (ctx.out_dir / "tuning" / "section.md").read_text()
    assert "maximum over 2 finished trials" in text and "the one that counts" in text
    assert "untuned baseline (trial 0) 50.00%" in text
    if best_is_baseline:
        assert evaluation["same"] and "comparison" not in evaluation
        assert sorted(c["seed"] for c in cells) == list(ctx.preset.seeds)  # trained once, not twice
        assert "The best trial is the untuned baseline itself" in text
    else:
        assert sorted(c["seed"] for c in cells) == sorted(2 * list(ctx.preset.seeds))
        # the baseline is compared at the tuned trial's training budget: as many epochs
        assert {c["train"]["epochs"] for c in cells} == {adam["epochs"]} != {baseline["epochs"]}
        assert [c["train"] for c in cells if c["train"]["optimizer"] == "sgd"][0] == {
            **[c["train"] for c in fake_training[:trials_calls] if c["train"]["optimizer"] == "sgd"][0],
            "epochs": adam["epochs"]}
        assert f"**for the same number of epochs**: the baseline trains as long as the best trial chose to " \
               f"({adam['epochs']}; the baseline trial trained the preset's {baseline['epochs']})" in text
        c = evaluation["comparison"]
        assert c.a == "tuned (trial 1)" and c.b == f"untuned baseline (at the tuned {adam['epochs']} epochs)"
        assert c.seeds == (3, 3) and c.images == 200
        assert c.diff == pytest.approx(evaluation["spread"]["tuned"].mean - evaluation["spread"]["baseline"].mean,
                                       abs=0.02)
        assert f"tuned (trial 1) − untuned baseline (at the tuned {adam['epochs']} epochs): **+" in text
        assert "95 % CI" in text
        assert evaluation["spread"]["tuned"].pct() in text and evaluation["spread"]["baseline"].pct() in text
    # the grid resumes: a second evaluation trains nothing
    evaluate_best_and_baseline(ctx, space, study, baseline, epoch_range, "cmp-evaluation")
    assert len(fake_training) == trials_calls + len(cells)


# ---------------------------------------------------------------- who publishes: one process, claimed in the storage


def test_a_claim_has_one_holder_until_it_is_done_released_or_its_holder_is_gone(tmp_path, monkeypatch):
    import socket

    from training.studies import claim as C
    from training.studies.runner import StudyError

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    a = C.take(url, "k")
    assert a.mine and a.holder == C.me() and a.state == "running"
    b = C.take(url, "k", holder="elsewhere:1")
    assert not b.mine and b.holder == C.me() and b.state == "running"
    a.finish({"tag": "m:v1"})
    done = C.take(url, "k", holder="elsewhere:1")
    assert not done.mine and done.state == "done" and done.result == {"tag": "m:v1"} and done.holder == C.me()
    # a holder that died on this machine: the next process takes its claim over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    C.take(url, "k2", holder=f"{socket.gethostname()}:{dead}")
    taken = C.take(url, "k2")
    assert taken.mine and taken.taken_over == f"{socket.gethostname()}:{dead}"
    # one on another machine: only once it has been silent for GRACE_S (the database's clock)
    C.take(url, "k3", holder="elsewhere:1")
    assert not C.take(url, "k3").mine
    monkeypatch.setattr(C, "GRACE_S", 0)
    time.sleep(1.1)  # SQLite's CURRENT_TIMESTAMP counts whole seconds
    mine = C.take(url, "k3")
    assert mine.mine and mine.taken_over == "elsewhere:1"
    with pytest.raises(StudyError, match="no longer this process's"):  # the old holder may not publish now
        C.Claim(url, "k3", "elsewhere:1", True, "running").check()
    mine.check()
    # a holder that fails releases its claim: the next process takes it
    with pytest.raises(RuntimeError):
        with mine.held():
            raise RuntimeError("the publish failed")
    assert C.take(url, "k3", holder="elsewhere:2").mine


CLAIM_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from training.studies.claim import take
    ready = Path(sys.argv[2])
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < int(sys.argv[3]):  # start together
        time.sleep(0.01)
    c = take(sys.argv[1], "the-key")
    print(c.mine, c.holder)
""")


def test_processes_that_claim_at_once_on_a_fresh_postgresql_database_get_one_holder(fresh_postgres_url, tmp_path,
                                                                                    lab_env):
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_SCRIPT, fresh_postgres_url, str(ready), "4"], env=lab_env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    answers = []
    for p in procs:  # the table does not exist yet either: they race to create it too
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        answers.append(out.split())
    assert sum(mine == "True" for mine, _ in answers) == 1, answers
    assert len({holder for _, holder in answers}) == 1, answers


def test_two_workers_started_at_once_on_a_fresh_postgresql_database_publish_the_best_trial_once(
        tune_data, lab_env, fresh_postgres_url, tmp_path):
    """The issue's two workers at once: both exit 0, exactly one publishes (the other names it), from a run
    folder of its own, and the store holds one new version whose files match its card."""
    import re
    import socket

    import sqlalchemy as sa

    from lab.card import read_card, verify_files

    name = f"twice-{time.time_ns()}"
    args = [sys.executable, str(REPO / "training" / "tune.py"), "--no-progress", "--preset", "smoke", "--data-root",
            str(tune_data), "--storage", fresh_postgres_url, "--study-name", name, "--n-trials", "4"]
    procs = [subprocess.Popen(args, env=lab_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    pids = {f"{socket.gethostname()}:{p.pid}": out for p, (out, _) in zip(procs, outs)}
    named = {}
    for me, out in pids.items():  # each worker's output names the publisher
        m = re.search(r"^study complete: (\S+) (\(this process\) )?publishes the best trial", out, re.M)
        assert m, out[-3000:]
        named[me] = m.group(1)
        assert bool(m.group(2)) == (m.group(1) == me), m.group(0)
    publisher = next(iter(named.values()))
    assert set(named.values()) == {publisher} and publisher in pids, named
    other = next(me for me in pids if me != publisher)
    assert f"this process ({other}) stops here" in pids[other] and "publishing " not in pids[other]
    assert len(re.findall(r"^  published cifar10-tuned-cnn-smoke:\S+: served accuracy", pids[publisher], re.M)) == 1
    # the store: exactly one version, its files the card's
    versions = [d for d in (Path(lab_env["BENTOML_HOME"]) / "models" / "cifar10-tuned-cnn-smoke").iterdir()
                if d.is_dir()]
    assert len(versions) == 1, versions
    card = read_card(versions[0])
    verify_files(versions[0], card)
    assert {p.name for p in versions[0].iterdir()} == set(card.files) | {"card.json", "model.yaml"}
    assert f"published cifar10-tuned-cnn-smoke:{versions[0].name}" in pids[publisher]
    # one run folder, the publisher's own
    folders = list((tmp_path / "runs" / "tuning" / name / "published").iterdir())
    assert len(folders) == 1 and f"-{publisher.rsplit(':', 1)[1]}-cifar10-tuned-cnn-smoke" in folders[0].name, folders
    engine = sa.create_engine(fresh_postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT holder, state, result FROM lab_claims")).all()
    engine.dispose()
    assert [(r.holder, r.state, json.loads(r.result)["tag"]) for r in rows] == \
        [(publisher, "done", f"cifar10-tuned-cnn-smoke:{versions[0].name}")]
    # a rerun finds the study published: it says by whom and publishes nothing
    again = tune(["--preset", "smoke", "--data-root", str(tune_data), "--storage", fresh_postgres_url,
                  "--study-name", name, "--n-trials", "4"], lab_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"study complete: {publisher} published the best trial as cifar10-tuned-cnn-smoke:{versions[0].name}" \
        in again.stdout
    assert len([d for d in versions[0].parent.iterdir() if d.is_dir()]) == 1
