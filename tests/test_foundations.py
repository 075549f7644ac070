"""Seeds that reach the weights, recipes that follow the model, a backend added from one file."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import requests
import torch

from lab.card import read_card
from models import create_model
from tests.conftest import REPO, run_all


def test_two_seeds_give_different_weights_and_the_same_seed_the_same():
    a, b, a2 = (create_model("airbench", widths=(8, 16, 16), seed=s) for s in (0, 1, 0))
    sa, sb, sa2 = a.state_dict(), b.state_dict(), a2.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())
    assert all(torch.equal(sa[k], sa2[k]) for k in sa)


def test_the_training_seed_leaves_the_data_split_alone(cifar_root, tmp_path):
    from training.pipeline import Run, load_splits
    from training.presets import get_preset

    smoke = get_preset("smoke")
    splits = []
    for seed in (0, 1):
        p = replace(smoke, overrides={**smoke.overrides, "seed": seed})
        run = Run(dir=tmp_path, preset=p, data_root=cifar_root, progress=False)
        splits.append(load_splits(run))
    (t0, v0, s0), (t1, v1, s1) = splits
    assert torch.equal(t0.images, t1.images) and torch.equal(v0.labels, v1.labels) and torch.equal(s0.images, s1.images)
    other = Run(dir=tmp_path, preset=replace(smoke, data_seed=5), data_root=cifar_root, progress=False)
    assert not torch.equal(load_splits(other)[0].images, t0.images)  # the data seed moves the split


def test_seeds_reach_the_trained_weights_through_run_all(cifar_root, lab_env):
    runs = []
    for seed in ("0", "1"):
        proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--only", "train", "--seed", seed,
                        "--epochs", "1", "--fresh"], lab_env, check=True)
        runs.append(Path(proc.stdout.strip().splitlines()[-1].split("run folder: ")[1]))
    w = [torch.load(r / "trained.pth", weights_only=True) for r in runs]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0] if w[0][k].is_floating_point())
    logs = [(r / "run.log").read_text() for r in runs]
    assert "seed 0" in logs[0] and "seed 1" in logs[1]
    split_lines = [next(l for l in log.splitlines() if l.startswith("data: ")) for log in logs]
    assert split_lines[0] == split_lines[1]


def test_model_override_takes_its_own_recipe_and_store_name(cifar_root, lab_env):
    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--model", "simple_cnn", "--only", "model"],
                   lab_env, check=True)
    run_dir = Path(proc.stdout.strip().splitlines()[-1].split("run folder: ")[1])
    trained = json.loads((run_dir / "trained.json").read_text())
    assert trained["training"]["recipe"] == "sgd_onecycle"
    assert trained["training"]["config"]["batch_size"] == 64  # the preset's size survives the override
    stored = sorted(p.parent.parent.name for p in Path(lab_env["BENTOML_HOME"], "models").glob("*/*/card.json"))
    assert stored == ["cifar10-simple-cnn-smoke"], stored  # never the default model's name
    card = read_card(next(Path(lab_env["BENTOML_HOME"], "models", "cifar10-simple-cnn-smoke").glob("*/card.json")).parent)
    assert card.architecture.name == "simple_cnn" and card.name == "cifar10-simple-cnn-smoke"


def test_unknown_recipe_is_one_line(cifar_root, lab_env):
    proc = run_all(["--preset", "smoke", "--data-root", str(cifar_root), "--recipe", "nope"], lab_env)
    assert proc.returncode == 2 and "valid recipes: airbench94_muon" in proc.stderr


def test_a_backend_added_in_one_test_file_is_served_and_benchmarked(store, tmp_path):
    from bench.server import Server

    env = dict(store["env"], LAB_PLUGINS="tests.plugin_backend", LAB_BACKENDS="onnx,onnx_basic",
               LAB_DEFAULT_MODEL="cifar10-airbench-smoke")
    with Server(env, tmp_path / "serve-plugin.log") as s:
        info = requests.get(f"{s.url}/models/", timeout=10).json()["models"]["cifar10-airbench-smoke"]
        assert info["backends"] == ["onnx", "onnx_basic"]
        spec = requests.get(f"{s.url}/docs.json", timeout=10).json()
        assert "onnx_basic" in json.dumps(spec["paths"]["/classify"])
        from tests.test_service import good_image

        answers = {}
        for b in ("onnx", "onnx_basic"):
            r = requests.post(f"{s.url}/classify", data=good_image(), params={"backend": b, "top_k": 10},
                              headers={"Content-Type": "image/png"}, timeout=30)
            assert r.status_code == 200 and r.json()["backend"] == b, r.text
            answers[b] = {p["index"]: p["probability"] for p in r.json()["predictions"]}
        assert max(abs(answers["onnx"][k] - answers["onnx_basic"][k]) for k in range(10)) < 1e-4
    out = subprocess.run([sys.executable, "-m", "bench.accuracy_report", "--model", "cifar10-airbench-smoke",
                          "--limit", "50", "--backends", "onnx,onnx_basic", "--out", str(tmp_path / "acc")],
                         env=dict(env, LAB_DATA_ROOT=str(store["data"])), cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    assert set(rep["backends"]) == {"onnx", "onnx_basic"}
    assert rep["backends"]["onnx_basic"]["ms_per_image_batch1"] > 0
    assert rep["top1_differences"]["onnx"]["onnx_basic"] == 0
