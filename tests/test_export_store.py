import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models import create_model
from lab.card import Card, IntegrityError, read_card, verify_files
from training import export as E


def trained_like_airbench(seed=0):
    """A small airbench whose weights and BN statistics are not the trivial initial ones."""
    torch.manual_seed(seed)
    net = create_model("airbench", widths=(8, 16, 16))
    net.fit_whitening(torch.randn(32, 3, 32, 32))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.add_(0.05 * torch.randn_like(m.weight))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.1)
    return net.eval()


def test_export_is_verified_and_simplified(tmp_path):
    batch = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    out = E.export_verified(trained_like_airbench(), 2, batch, tmp_path)
    assert set(out["files"]) == {"model.pth", "model.onnx", "model.sim.onnx"}
    for par in out["parity"].values():
        assert par["ok"] and par["max_abs_diff"] <= par["atol"] and par["top1_agreement"] == 1.0
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    assert "whiten.weight" in state
    model = onnx.load(str(tmp_path / "model.sim.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "model.sim.onnx"))
    for n in (1, 5):
        assert sess.run(None, {"input": batch[:n]})[0].shape == (n, 10)


def test_parity_scales_with_the_logits_so_a_diverged_net_exports_and_a_wrong_graph_does_not(tmp_path, monkeypatch):
    """A net whose logits reach 1e5 (a tuning trial that diverged) differs between two correct runtimes by
    more than 1e-3 in float32; the tolerance is relative to the logits' scale, and a wrong graph still fails."""
    net = trained_like_airbench()
    with torch.no_grad():
        net.head.weight.mul_(1e5)
    batch = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    out = E.export_verified(net, 0, batch, tmp_path / "big")
    for par in out["parity"].values():
        assert par["ok"] and par["scale"] > 1e3 and par["max_abs_diff"] <= par["atol"] * par["scale"]
    real_simplify = E.simplify_onnx

    def perturbed(src, dst):
        real_simplify(src, dst)
        m = onnx.load(str(dst))
        init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * 1.01).astype(np.float32), init.name))
        onnx.save(m, str(dst))
        return dst

    monkeypatch.setattr(E, "simplify_onnx", perturbed)
    with pytest.raises(E.ExportError, match="logit scale"):
        E.export_verified(net, 0, batch, tmp_path / "wrong")


def test_a_broken_export_is_caught(tmp_path, monkeypatch):
    real_simplify = E.simplify_onnx

    def broken_simplify(src, dst):  # a simplifier bug that perturbs one weight
        real_simplify(src, dst)
        m = onnx.load(str(dst))
        init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = numpy_helper.to_array(init) * 1.5
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
        onnx.save(m, str(dst))
        return dst

    monkeypatch.setattr(E, "simplify_onnx", broken_simplify)
    batch = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    with pytest.raises(E.ExportError, match="disagrees with torch"):
        E.export_verified(trained_like_airbench(), 0, batch, tmp_path)


def _publish_inputs(tmp_path):
    batch = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    out = E.export_verified(trained_like_airbench(), 0, batch, tmp_path / "export")
    card = {"schema": 1, "name": "x", "architecture": {"name": "airbench", "kwargs": {"widths": [8, 16, 16]}},
            "tta_level": 0, "classes": [str(i) for i in range(10)], "metrics": {"test_accuracy": 0.5},
            "preprocessing": {"size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
            "backends": {}, "parameters": 1, "flops_per_image": 1}
    return {k: str(v) for k, v in out["files"].items()}, card


def test_publish_puts_a_verified_model_in_the_store(tmp_path, monkeypatch):
    import bentoml
    from lab.store import publish

    files, card = _publish_inputs(tmp_path)
    tag = publish("unit-published", {k: Path(v) for k, v in files.items()}, Card.from_dict(card, require_files=False))
    model = bentoml.models.get(tag)
    stored = read_card(model.path)
    assert stored.metrics["test_accuracy"] == 0.5
    assert set(stored.files) == set(files)
    assert model.info.metadata["files"]["model.pth"]["sha256"] == stored.files["model.pth"].sha256
    assert stored.backends["onnx"] == "model.sim.onnx" and stored.backends["torch"] == "model.pth"
    verify_files(model.path, stored)
    # a tampered file no longer verifies
    with open(Path(model.path) / "model.sim.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match="model.sim.onnx"):
        verify_files(model.path, stored)


def test_a_killed_publish_leaves_nothing_servable(tmp_path, lab_env):
    files, card = _publish_inputs(tmp_path)
    script = f"""
import json, shutil, sys, time
import lab.store as S
from lab.card import Card
real = shutil.copyfile
def slow(src, dst, *a, **k):
    r = real(src, dst, *a, **k)
    print("copied", dst, flush=True)
    time.sleep(60)
    return r
shutil.copyfile = slow
S.publish("killed-model", {{k: S.Path(v) for k, v in json.loads({json.dumps(json.dumps(files))}).items()}},
          Card.from_dict(json.loads({json.dumps(json.dumps(card))}), require_files=False))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=lab_env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the first file is half-way through publishing
        assert line.startswith("copied"), line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    models_dir = Path(lab_env["BENTOML_HOME"]) / "models"
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
                            env=lab_env, capture_output=True, text=True, check=True)
    assert "killed-model" not in listed.stdout
    assert not list(models_dir.glob("killed-model/*/*")) if models_dir.exists() else True
    # the leftovers sit in the staging area, which the next run_all.py clears
    code = """
from lab.store import clean_staging; print(clean_staging())
"""
    out = subprocess.run([sys.executable, "-c", code], env=lab_env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) >= 1


def test_clean_staging_removes_only_the_folders_of_publishes_that_are_gone(tmp_path, monkeypatch):
    """Several processes (here and on other machines sharing the store) publish at once: a folder whose
    publish still runs is never removed, only a dead process's on this machine, or one untouched for a day."""
    import os
    import time

    from lab.paths import process_tag
    from lab.store import clean_staging, staging_dir

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    root = staging_dir()
    root.mkdir(parents=True)
    host = process_tag().rpartition("-")[0]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        for name in (f"{host}-{live.pid}-aaaa", f"{host}-{dead}-bbbb", f"{host}-{os.getpid()}-cccc",
                     "elsewhere-123-dddd", "elsewhere-124-eeee", "0123abcd"):
            (root / name).mkdir()
        day_old = time.time() - 25 * 3600
        os.utime(root / "elsewhere-124-eeee", (day_old, day_old))
        assert clean_staging() == 2
        assert sorted(p.name for p in root.iterdir()) == sorted(
            [f"{host}-{live.pid}-aaaa", f"{host}-{os.getpid()}-cccc", "elsewhere-123-dddd", "0123abcd"])
    finally:
        live.kill()
        live.wait()


def test_two_run_folders_made_in_the_same_second_are_two_folders(tmp_path):
    from lab.paths import new_run_dir, process_tag

    a, b = new_run_dir(tmp_path, "m-smoke"), new_run_dir(tmp_path, "m-smoke")
    assert a != b and a.is_dir() and b.is_dir()
    assert process_tag() in a.name and a.name.endswith("-m-smoke") and b.name.endswith("-m-smoke")
