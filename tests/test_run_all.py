import fcntl
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lab.card import read_card, verify_files
from tests.conftest import REPO, run_all


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    last = [l for l in proc.stderr.strip().splitlines() if l.startswith("error: ")][-1]
    assert last.startswith("error: "), proc.stderr
    for n in needles:
        assert n in last, last


def _stored_models(env) -> list[Path]:
    return sorted(Path(env["BENTOML_HOME"], "models").glob("*/*/card.json"))


def test_smoke_end_to_end(cifar_root, lab_env):
    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--only", "model", "--report"], lab_env,
                   check=True)
    run_dir = Path(proc.stdout.strip().splitlines()[-1].split("run folder: ")[1])
    report = next((run_dir / "report").glob("*/report.html"))  # --report: the combined report's in-process part
    assert "onnx_int8" in report.read_text()
    for name in ("summary.md", "learning_curves.png", "confusion.png", "run.log", "history.json",
                 "metrics.json", "trained.pth", "DONE"):
        assert (run_dir / name).exists(), name
    assert "Accuracy for class: airplane" in proc.stdout
    cards = _stored_models(lab_env)
    assert len(cards) == 1
    card = read_card(cards[0].parent)
    verify_files(cards[0].parent, card)
    assert card.name == "cifar10-airbench-smoke"
    assert 0.0 <= card.metrics["test_accuracy"] <= 1.0
    assert card.preprocessing.size == (32, 32) and len(card.preprocessing.mean) == 3
    assert card.parity["onnx_simplified"]["ok"] and card.flops_per_image > 0
    assert {"torch", "onnx", "onnxruntime"} <= set(card.versions)
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
                            env=lab_env, capture_output=True, text=True, check=True)
    assert "cifar10-airbench-smoke" in listed.stdout
    # a stage runs alone on an earlier run folder
    again = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--only", "evaluate",
                     "--run-dir", str(run_dir)], lab_env, check=True)
    assert "test accuracy (torch fp32" in again.stdout


def test_kill_and_rerun_continues_from_the_checkpoint(cifar_root, lab_env):
    args = ["--preset", "smoke", "--data-root", str(cifar_root), "--only", "train", "--epochs", "12",
            "--batch-size", "32"]
    proc = subprocess.Popen([sys.executable, str(REPO / "training/run_all.py"), "--no-progress", *args],
                            env=lab_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait for a few epochs to be checkpointed
            if line.startswith("epoch 3 "):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = run_all(args, lab_env, check=True)
    assert "resuming" in again.stdout
    first_epoch = next(l for l in again.stdout.splitlines() if l.startswith("epoch "))
    assert not first_epoch.startswith(("epoch 1 ", "epoch 2 ", "epoch 3 ")), first_epoch


@pytest.mark.parametrize("args,needles", [
    (["--preset", "huge"], ["unknown preset 'huge'", "smoke, quick, full"]),
    (["--model", "resnet9000"], ["unknown model 'resnet9000'", "airbench"]),
    (["--dataset", "imagenet"], ["unknown dataset 'imagenet'", "cifar10"]),
    (["--optimizer", "lion"], ["unknown optimizer 'lion'", "adamax"]),
    (["--only", "deploy"], ["unknown stage 'deploy'", "train"]),
])
def test_bad_names_give_one_clear_line(args, needles, lab_env, cifar_root):
    _assert_clean_error(run_all(["--data-root", str(cifar_root), *args], lab_env), *needles)


def test_no_data_says_where_it_looked(tmp_path, lab_env):
    proc = run_all(["--preset", "smoke", "--data-root", str(tmp_path / "empty")], lab_env)
    _assert_clean_error(proc, str(tmp_path / "empty"), "--data-root", "LAB_DATA_ROOT")
    assert not _stored_models(lab_env)


def test_wrong_number_of_classes(cifar_root, lab_env):
    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--model-kwargs",
                    '{"widths": [16, 32, 32], "num_classes": 5}'], lab_env)
    _assert_clean_error(proc, "5 classes", "10")


def test_corrupt_checkpoint(cifar_root, lab_env, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage")
    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--run-dir", str(run_dir)], lab_env)
    _assert_clean_error(proc, "checkpoint", "unreadable")


def test_mismatched_trained_model(cifar_root, lab_env, tmp_path):
    import torch

    from models import create_model
    run_dir = tmp_path / "run"
    run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--only", "train", "--run-dir",
             str(run_dir)], lab_env, check=True)
    torch.save(create_model("mlp").state_dict(), run_dir / "trained.pth")  # the wrong architecture
    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--only", "export,publish",
                    "--run-dir", str(run_dir)], lab_env)
    _assert_clean_error(proc, "does not fit airbench")
    assert not _stored_models(lab_env)


def test_second_run_all_on_the_same_store_is_refused(cifar_root, lab_env):
    home = Path(lab_env["BENTOML_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lab-run_all.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running run_all.py holds it
        f.write("pid 12345")
        f.flush()
        proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root)], lab_env)
    _assert_clean_error(proc, "another run_all.py", "model store")
