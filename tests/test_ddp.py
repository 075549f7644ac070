"""Data-parallel training through torchrun on this CPU (gloo): one model across two processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.card import read_card
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def torchrun(args: list[str], env: dict, n: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_two_processes_train_the_single_process_model_without_batchnorm(tmp_path, lab_env):
    """Without BatchNorm (whose statistics are per rank) two processes compute the single process's steps:
    same batches split in two, averaged gradients. Interrupted and resumed, they end where they would have."""
    from tests.ddp_worker import setup
    from training.engine import train

    torchrun([str(REPO / "tests" / "ddp_worker.py"), str(tmp_path), "resume"], lab_env)
    for r in (0, 1):
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        assert resumed["resumed_from_epoch"] == 1
        whole = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["state"]
        for k, v in resumed["state"].items():
            assert torch.allclose(v, whole[k], atol=1e-6), k
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k  # every rank ends with the same weights
    net, ds, spec, cfg = setup()
    single = train(net, ds, spec, cfg, progress=False, log=lambda *_: None)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, ranks[0]["state"][k], atol=2e-5), (k, (v - ranks[0]["state"][k]).abs().max())
    assert [r["images"] for r in ranks[0]["history"]] == [r["images"] for r in single.history]
    assert abs(ranks[0]["history"][-1]["train_loss"] - single.history[-1]["train_loss"]) < 1e-4


def test_torchrun_run_all_trains_once_writes_once_and_publishes_world_size(cifar_root, lab_env, tmp_path):
    env = dict(lab_env, LAB_DEBUG_STATE_HASH_DIR=str(tmp_path / "hash"))
    proc = torchrun([str(REPO / "training" / "run_all.py"), "--no-progress", "--preset", "smoke", "--data-root",
                     str(cifar_root), "--only", "train,evaluate,export,publish"], env)
    hashes = {p.name: p.read_text() for p in (tmp_path / "hash").iterdir()}
    assert set(hashes) == {"rank0.sha256", "rank1.sha256"} and len(set(hashes.values())) == 1, hashes
    runs = list(Path(lab_env["LAB_RUNS_DIR"]).iterdir())
    assert len(runs) == 1, runs  # one run folder, written by rank 0 alone
    run = runs[0]
    log = (run / "run.log").read_text()
    assert log.count("-- train\n") == 1 and log.count("epoch 2 ") == 1 and "2 processes (gloo)" in log
    assert proc.stdout.count("== finished") == 1
    assert "on cpu, 2 processes)" in (run / "summary.md").read_text()
    trained = json.loads((run / "trained.json").read_text())["training"]
    assert trained["world_size"] == 2 and trained["batch_per_process"] == 32
    assert json.loads((run / "stages.json").read_text()) == ["train", "evaluate", "export", "publish"]
    cards = sorted(Path(lab_env["BENTOML_HOME"], "models").glob("*/*/card.json"))
    assert len(cards) == 1 and read_card(cards[0].parent).training["world_size"] == 2
    # the weights published are the ones every rank ended with
    import hashlib

    state = torch.load(run / "trained.pth", weights_only=True)
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert h.hexdigest() == hashes["rank0.sha256"]


def test_single_process_records_world_size_one(cifar_root, lab_env):
    from tests.conftest import run_all

    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--only", "train", "--epochs", "1"],
                   lab_env, check=True)
    run = Path(proc.stdout.strip().splitlines()[-1].split("run folder: ")[1])
    assert json.loads((run / "trained.json").read_text())["training"]["world_size"] == 1
    assert "processes" not in (run / "run.log").read_text()
