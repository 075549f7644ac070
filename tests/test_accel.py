"""Training at accelerator speed: device-resident batches, no host sync per step, speed levers, evaluation
on the device, time to accuracy and the GPU script's CPU path (seconds each; the script's about 30)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lab.preprocess import Preprocessing
from bench.micro_speed import earlier_batches  # the earlier host-only loader, restated
from tests.conftest import REPO
from training import data as D

SPEC = Preprocessing(size=(16, 12), channels=3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_dataset(n=300, h=16, w=12, seed=0) -> D.ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return D.ArrayDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


@pytest.mark.parametrize("translate,flip,channels_last,drop_last",
                         [(2, True, True, True), (2, True, False, True), (3, False, True, True),
                          (0, True, False, True), (0, False, True, True), (1, True, True, False)])
def test_loader_gives_the_earlier_batches_bit_for_bit(translate, flip, channels_last, drop_last):
    ds = random_dataset()
    loader = D.BatchLoader(ds, SPEC, 64, train=True, translate=translate, flip=flip, seed=7,
                           channels_last=channels_last, drop_last=drop_last, device="cpu")
    for epoch in range(3):
        loader.set_epoch(epoch)
        ref = list(earlier_batches(ds, SPEC, 64, seed=7, epoch=epoch, translate=translate, flip=flip,
                                     channels_last=channels_last, drop_last=drop_last))
        got = list(loader)
        assert len(got) == len(ref) == len(loader)
        for (x, y), (xr, yr) in zip(got, ref):
            assert torch.equal(x, xr) and torch.equal(y, yr)
            assert x.stride() == xr.stride() and x.dtype == torch.float32


def test_evaluation_batches_and_images_are_the_serving_path_normalisation():
    ds = random_dataset(50)
    loader = D.BatchLoader(ds, SPEC, 20, train=False)
    x = torch.cat([b for b, _ in loader])
    assert torch.equal(x, D.to_float(ds.images, SPEC)) and torch.equal(loader.images, x)
    assert torch.equal(loader.normalized(torch.tensor([3, 1])), x[[3, 1]])
    assert loader.pixels.data_ptr() == ds.images.data_ptr()  # on the CPU the loader copies nothing


def test_shards_of_the_ranks_make_up_the_single_process_batches():
    ds = random_dataset()
    single = D.BatchLoader(ds, SPEC, 60, train=True, translate=2, flip=True, seed=3)
    ranks = [D.BatchLoader(ds, SPEC, 60, train=True, translate=2, flip=True, seed=3, rank=r, world_size=3)
             for r in range(3)]
    for epoch in (0, 1):
        for lo in [single, *ranks]:
            lo.set_epoch(epoch)
        for (x, y), *parts in zip(single, *ranks):
            assert [len(p[1]) for p in parts] == [20, 20, 20]
            assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_the_same_on_every_device(device):
    ds = random_dataset()
    cpu = D.BatchLoader(ds, SPEC, 64, train=True, translate=2, flip=True, seed=1, channels_last=True)
    dev = D.BatchLoader(ds, SPEC, 64, train=True, translate=2, flip=True, seed=1, channels_last=True, device=device)
    assert dev.pixels.device.type == device
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        for (x, y), (xd, yd) in zip(cpu, dev):
            assert xd.device.type == device and yd.device.type == device
            assert torch.equal(x, xd.cpu()) and torch.equal(y, yd.cpu())


# ---------------------------------------------------------------- the engine


def _tiny(seed=0):
    from models import create_model

    return create_model("simple_cnn", num_classes=10, image_size=16, n_layers=2, width=8, hidden=16, seed=seed)


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("finite_check", ["epoch", "step"])
def test_a_diverging_run_names_the_step_where_the_loss_broke(finite_check):
    from training.engine import TrainConfig, train

    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=1e12, precision="fp32", finite_check=finite_check)
    with pytest.raises(FloatingPointError, match=r"became (nan|inf) at step \d+: the learning rate \(1e\+12\)"):
        train(_tiny(), random_dataset(h=16, w=16), SPEC, cfg, progress=False, log=lambda *_: None)


def test_speed_levers_leave_the_result_and_the_resume_key_alone():
    from training.engine import TrainConfig, train

    ds = random_dataset(h=16, w=16)
    base = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, translate=2, flip=True,
                       precision="fp32", seed=3)
    levers = dict(data_device="cpu", finite_check="step", fused_optim=False, cudnn_benchmark=False,
                  eval_batch_size=7, compile_mode="reduce-overhead", threads=1)
    other = TrainConfig(**{**base.__dict__, **levers})
    assert base.key() == other.key()
    quiet = dict(progress=False, log=lambda *_: None)
    a = train(_tiny(), ds, SPEC, base, eval_sets={"val": random_dataset(40, 16, 16, 1)}, **quiet)
    b = train(_tiny(), ds, SPEC, TrainConfig(**{**base.__dict__, "data_device": "cpu", "finite_check": "step"}),
              eval_sets={"val": random_dataset(40, 16, 16, 1)}, **quiet)
    assert _state_equal(a.model, b.model)
    assert [r["val_acc"] for r in a.history] == [r["val_acc"] for r in b.history]
    fused = train(_tiny(), ds, SPEC, TrainConfig(**{**base.__dict__, "fused_optim": True}), **quiet)
    for (k, x), y in zip(a.model.state_dict().items(), fused.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), k


def test_on_epoch_end_adds_to_the_record_outside_the_training_clock():
    import time

    from training.engine import TrainConfig, train

    seen = []

    def slow_eval(model, record):
        assert not model.training
        time.sleep(0.3)
        record["extra_acc"] = 0.5
        seen.append(record["epoch"])

    cfg = TrainConfig(epochs=2, batch_size=50, precision="fp32")
    res = train(_tiny(), random_dataset(h=16, w=16), SPEC, cfg, progress=False, log=lambda *_: None,
                on_epoch_end=slow_eval)
    assert seen == [1, 2] and all(r["extra_acc"] == 0.5 for r in res.history)
    assert res.train_seconds < res.wall_seconds - 0.5 and res.world_size == 1


# ---------------------------------------------------------------- evaluation


def test_predict_torch_on_the_device_matches_the_earlier_host_loop():
    from models import create_model, with_tta
    from training.evaluate import predict_torch

    ds = random_dataset(130, 16, 16)
    net = with_tta(create_model("airbench", widths=(8, 16, 16), seed=0), 2).eval()
    ref = []
    with torch.no_grad():  # the earlier predict_torch: host batches of 500, NCHW-then-channels_last input
        for i in range(0, len(ds), 500):
            x = D.to_float(ds.images[i:i + 500], SPEC).contiguous(memory_format=torch.channels_last)
            ref.append(net(x).float())
    ref = torch.cat(ref).numpy()
    for bs in (None, 7):
        got = predict_torch(net, ds, SPEC, batch_size=bs, device="cpu")
        assert got.shape == (130, 10) and np.allclose(got, ref, atol=1e-5)
    bf16 = predict_torch(net, ds, SPEC, precision="bf16")
    assert (bf16.argmax(1) == ref.argmax(1)).mean() > 0.9


def test_eval_precision_is_fp32_on_the_cpu_unless_asked(monkeypatch):
    from training.evaluate import eval_precision

    assert eval_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setenv("LAB_EVAL_PRECISION", "bf16")
    assert eval_precision(torch.device("cpu")) == "bf16"
    monkeypatch.setenv("LAB_EVAL_PRECISION", "fp16")
    with pytest.raises(ValueError, match="valid: bf16, fp32"):
        eval_precision(torch.device("cpu"))


# ---------------------------------------------------------------- benchmarks and the GPU script

TINY_BENCH = ["--train-limit", "256", "--test-limit", "100", "--epochs", "2", "--batch-size", "64",
              "--model-kwargs", '{"widths": [8, 16, 16]}', "--seeds", "3", "--target", "0.05", "--no-airbench"]


def test_time_to_accuracy_on_the_cpu(cifar_root, tmp_path, monkeypatch):
    from bench import time_to_accuracy

    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    assert time_to_accuracy.main(TINY_BENCH + ["--data-root", str(cifar_root), "--out", str(tmp_path),
                                               "--levers", "baseline,sync_every_step", "--lever-epochs", "2",
                                               "--tta-eval", "--set", "finite_check=epoch"]) == 0
    r = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    ours = r["ours"]
    assert len(ours["runs"]) == 3 and ours["reached"] == 3 and ours["time_to_target"]["n"] == 3
    assert ours["time_to_target"]["min"] <= ours["time_to_target"]["median"] <= ours["time_to_target"]["max"]
    for run in ours["runs"]:
        assert len(run["curve"]) == 2 and run["time_to_target"] == run["curve"][run["epoch_reached"] - 1][0]
        assert 0 <= run["final_tta_acc"] <= 1 and run["device"] == "cpu"
    assert len({round(run["final_tta_acc"], 6) for run in ours["runs"]} | {None}) >= 2  # seeds differ
    assert set(r["levers"]) == {"baseline", "sync_every_step"} and r["levers"]["baseline"]["later_epoch_median"] > 0
    assert r["tta_eval"]["images"] == 100 and r["tta_eval"]["warm_seconds"] > 0
    assert "airbench94" not in r
    import time

    late = time_to_accuracy.measure_levers(None, None, None, None, "cpu", ["baseline", "compile"], deadline=time.perf_counter())
    assert all(v["skipped"] == "out of time" for v in late.values())


def test_airbench_is_measured_on_the_same_images_and_parsed(cifar_root, tmp_path, monkeypatch):
    """The airbench94 side with a stand-in for the package (it needs CUDA): the same images reach its
    loader's files in its format, and its printed table becomes the figures."""
    import types

    from bench import time_to_accuracy as T

    loaded = {}

    def train94(verbose=True):  # prints what airbench 0.1.8 prints (utils.print_columns)
        for name in ("train", "test"):
            loaded[name] = torch.load(f"cifar10/{name}.pt", weights_only=True)
        print("|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |")
        print("|       0  |      0  |      1.2345  |     0.5000  |   0.8000  |               |              0.5000  |")
        print("|          |      1  |      0.6172  |     0.6000  |   0.8100  |               |              2.4500  |")
        print("|          |   eval  |              |             |           |       0.9061  |              2.6000  |")

    fake = types.SimpleNamespace(__version__="0.1.8", warmup94=lambda: None, train94=train94)
    monkeypatch.setattr(T, "airbench_status", lambda: (fake, ""))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ds = random_dataset(40, 32, 32)
    r = T.measure_airbench(ds, ds.subset(slice(0, 10)), [0, 1, 2], 0.90, tmp_path)
    assert r["available"] and r["reached"] == 3
    assert r["train_seconds"]["median"] == 2.45 and r["tta_acc"]["median"] == 0.9061
    assert loaded["train"]["images"].shape == (40, 32, 32, 3) and loaded["train"]["images"].dtype == torch.uint8
    assert torch.equal(loaded["train"]["images"], ds.images.permute(0, 2, 3, 1))
    assert torch.equal(loaded["test"]["labels"], ds.labels[:10]) and loaded["train"]["classes"] == ds.classes


def test_pack_and_unpack_give_back_the_same_files(tmp_path):
    from bench.pack_cifar import pack, unpack
    from tests.fakedata import CIFAR_CLASSES, write_image_folder

    src = write_image_folder(tmp_path / "src" / "cifar10-jpg", classes=CIFAR_CLASSES[:3], per_class=4,
                             size=(32, 32), fmt="jpg")
    info = pack(src, tmp_path / ".gpu" / "c.npz")
    assert info["images"] == {"train": 12, "test": 6} and info["classes"] == CIFAR_CLASSES[:3]
    unpack(tmp_path / ".gpu" / "c.npz", tmp_path / "root")
    files = sorted(p.relative_to(src) for p in src.rglob("*.jpg"))
    assert files == sorted(p.relative_to(tmp_path / "root" / "cifar10-jpg")
                           for p in (tmp_path / "root" / "cifar10-jpg").rglob("*.jpg"))
    assert all((src / f).read_bytes() == (tmp_path / "root" / "cifar10-jpg" / f).read_bytes() for f in files)


def test_gpu_script_runs_its_cpu_path_without_bentoml_or_onnxsim(tmp_path, lab_env):
    """bench/gpu_run.sh --tiny: the GPU session's script end to end on this CPU, where importing BentoML or
    onnxsim fails (as on the GPU machine)."""
    from bench.pack_cifar import pack
    from tests.fakedata import CIFAR_CLASSES, write_image_folder

    src = write_image_folder(tmp_path / "src" / "cifar10-jpg", classes=CIFAR_CLASSES, per_class=30,
                             size=(32, 32), fmt="jpg")
    pack(src, tmp_path / "pack.npz")
    block = tmp_path / "block"
    block.mkdir()
    for name in ("bentoml", "onnxsim"):
        (block / f"{name}.py").write_text('raise ImportError("not on the GPU machine")\n')
    env = dict(lab_env, PYTHON=sys.executable, PYTHONPATH=str(block), OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), "--tiny", "--pack", str(tmp_path / "pack.npz"),
                           "--work", str(tmp_path / "work")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert all(p["ok"] for p in r["parts"].values()), r["parts"]
    assert set(r["parts"]) == {"environment", "data", "accuracy", "pipeline", "torchrun", "levers", "imports"}
    acc = r["parts"]["accuracy"]["summary"]
    assert acc["time_to_target"]["n"] == 2 and acc["tta_eval"]["images"] == 150
    assert r["parts"]["pipeline"]["training"]["world_size"] == 1 and r["parts"]["torchrun"]["world_size"] == 1
    assert r["parts"]["levers"]["levers"]["data_on_host"]["later_epoch_median"] > 0
    out = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"gpu_run.json", "gpu_run.log", "time_to_accuracy.json", "levers.json", "pipeline.log"} <= out
    assert len(out) <= 8 and all((tmp_path / "out" / f).is_file() for f in out)  # what the device tool returns
