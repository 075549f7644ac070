"""Optimizer study settings and Optuna tuning through training/tune.py, against a real PostgreSQL."""
from __future__ import annotations

import signal
import subprocess
import sys
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
    settings = {k: v for k, v in OPTIMIZERS[name].items() if k != "full_batch"}
    if OPTIMIZERS[name].get("full_batch"):
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
        study.enqueue_trial({"n_layers": layers, "kernel_size": kernel, "optimizer": "Adam", "lr": 3e-3})
    first = tune([*args, "--n-trials", "4", "--no-publish"], lab_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study.enqueue_trial({"n_layers": 1, "kernel_size": 3, "optimizer": "SGD", "lr": 1e-5})
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
