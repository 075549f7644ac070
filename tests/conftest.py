"""Shared fixtures. Every test gets its own BentoML home, cache and runs folder: nothing touches ~/bentoml."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Before anything imports bentoml: a private home for the whole session.
_session_home = tempfile.mkdtemp(prefix="lab-tests-bentoml-")
os.environ["BENTOML_HOME"] = _session_home
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ.setdefault("LAB_CACHE_DIR", tempfile.mkdtemp(prefix="lab-tests-cache-"))


def has_real_cifar() -> bool:
    return (SHARED_DATA / "cifar10-jpg" / "test").is_dir()


real_cifar = pytest.mark.skipif(not has_real_cifar(), reason=f"no CIFAR-10 copy in {SHARED_DATA}")
real_mnist = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                                reason=f"no MNIST copy in {SHARED_DATA}")


@pytest.fixture
def lab_env(tmp_path) -> dict:
    """Environment for a subprocess of the project with its own store, cache and runs folder."""
    env = dict(os.environ)
    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), LAB_CACHE_DIR=str(tmp_path / "cache"),
               LAB_RUNS_DIR=str(tmp_path / "runs"), BENTOML_DO_NOT_TRACK="True",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("LAB_DATA_ROOT", None)
    return env


def run_all(args: list[str], env: dict, timeout: float = 600, check: bool = False):
    proc = subprocess.run([sys.executable, str(REPO / "training" / "run_all.py"), "--no-progress", *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run_all.py {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    from tests.fakedata import write_cifar_pickles

    return write_cifar_pickles(tmp_path_factory.mktemp("cifar"))


MAX_BODY = 3_000_000  # the test server's body limit


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> dict:
    """A private model store with the smoke model and a copy whose ONNX file was tampered with."""
    root = tmp_path_factory.mktemp("service")
    env = dict(os.environ, BENTOML_HOME=str(root / "bentoml"), LAB_CACHE_DIR=str(root / "cache"),
               LAB_RUNS_DIR=str(root / "runs"), BENTOML_DO_NOT_TRACK="True", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    from tests.fakedata import CIFAR_CLASSES, write_cifar_pickles, write_image_folder

    data = write_cifar_pickles(root / "data")
    # labelled JPEGs where the benchmarks look for test images, so answers can be checked
    write_image_folder(root / "data" / "cifar10-jpg", classes=CIFAR_CLASSES, per_class=8, size=(32, 32), fmt="jpg")
    proc = run_all(["--preset", "smoke", "--data-root", str(data), "--only", "model"], env, check=True)
    run_dir = proc.stdout.strip().splitlines()[-1].split("run folder: ")[1]
    run_all(["--preset", "smoke", "--data-root", str(data), "--only", "publish", "--run-dir", run_dir,
             "--store-name", "tampered-model"], env, check=True)
    run_all(["--preset", "smoke", "--data-root", str(data), "--only", "publish", "--run-dir", run_dir,
             "--store-name", "bad-card-model"], env, check=True)
    bad_card = next((root / "bentoml" / "models" / "bad-card-model").glob("*/card.json"))
    card = json.loads(bad_card.read_text())
    del card["classes"]  # a card that would load, then fail every request, if it were not validated
    bad_card.write_text(json.dumps(card))
    tampered = next((root / "bentoml" / "models" / "tampered-model").glob("*/model.sim.onnx"))
    blob = bytearray(tampered.read_bytes())
    blob[-100] ^= 0xFF
    tampered.write_bytes(bytes(blob))
    good = next((root / "bentoml" / "models" / "cifar10-airbench-smoke").glob("*/card.json")).parent
    return {"env": env, "root": root, "model_dir": good, "data": data, "run_dir": run_dir}


@pytest.fixture(scope="session")
def server(store):
    from bench.server import Server

    s = Server(store["env"], store["root"] / "serve.log",
               {"LAB_DEFAULT_MODEL": "cifar10-airbench-smoke", "LAB_MAX_BODY_BYTES": str(MAX_BODY),
                "LAB_MAX_LATENCY_MS": "20000"})
    yield s
    s.stop()




POSTGRES_URL = os.environ.get("LAB_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The project's PostgreSQL (trust auth, database test); tests that need it skip, saying so, without it."""
    import psycopg

    try:
        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3).close()
    except Exception as e:
        pytest.skip(f"no PostgreSQL server answers at 127.0.0.1:5432 ({type(e).__name__}: {e})")
    return POSTGRES_URL


@pytest.fixture
def fresh_postgres_url(postgres_url) -> str:
    """A new, empty PostgreSQL database for one test (dropped after it): what a first run on a new
    machine meets, where workers race to create the schema."""
    import psycopg

    name = f"lab_test_{os.getpid()}_{time.time_ns()}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def combined_report(store, server, tmp_path_factory) -> Path:
    """bench/report.py against the smoke model and the test server, with small settings: the folder it
    wrote (report.md, report.html, report.json, the PNGs). Built once, read by the bench and browser tests."""
    out = tmp_path_factory.mktemp("combined-report")
    env = dict(store["env"], LAB_DATA_ROOT=str(store["data"]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "report.py"), "--model", "cifar10-airbench-smoke", "--limit", "60",
         "--host", server.url, "--backends", "onnx,onnx_int8", "--images", "40", "--sweep-seconds", "0.5",
         "--single-stream-queries", "10", "--server-seconds", "1", "--server-steps", "2", "--offline-images", "40",
         "--locust-seconds", "3", "--locust-users", "2", "--ladder-rounds", "1", "--out", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return next(p for p in out.iterdir() if (p / "report.md").exists())


@pytest.fixture(scope="session")
def study_data(tmp_path_factory) -> Path:
    """CIFAR-10 pickles, MNIST idx files and a CIFAR-like image folder, all small, in the real formats."""
    from tests.fakedata import CIFAR_CLASSES, write_cifar_pickles, write_image_folder, write_mnist

    root = tmp_path_factory.mktemp("studydata")
    write_cifar_pickles(root)
    write_mnist(root, train=400, test=200)
    write_image_folder(root / "cifar10-jpg", classes=CIFAR_CLASSES, per_class=8, size=(32, 32), fmt="jpg")
    return root


@pytest.fixture(scope="session")
def smoke_studies(study_data, tmp_path_factory) -> dict:
    """Every study stage on the smoke preset, once per session: {"out": studies folder, "env", "stdout"}."""
    root = tmp_path_factory.mktemp("studies")
    env = dict(os.environ, BENTOML_HOME=str(root / "bentoml"), LAB_CACHE_DIR=str(root / "cache"),
               LAB_RUNS_DIR=str(root / "runs"), BENTOML_DO_NOT_TRACK="True", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    env.pop("LAB_DATA_ROOT", None)
    proc = run_all(["--preset", "smoke", "--data-root", str(study_data), "--only", "studies"], env, timeout=1200,
                   check=True)
    out = Path(proc.stdout.strip().splitlines()[-1].split("studies folder: ")[1])
    return {"out": out, "env": env, "stdout": proc.stdout}


@pytest.fixture
def one_torch_thread():
    """One torch thread for tests of tiny ops: on a shared 2-core machine, two threads wait on each other."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
