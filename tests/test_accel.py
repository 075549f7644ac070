"""Training at accelerator speed: device-resident batches, no host sync per step, speed levers, evaluation
on the device, time to accuracy and the GPU script's CPU path. All fast (seconds)."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from lab.preprocess import Preprocessing
from training import data as D

SPEC = Preprocessing(size=(16, 12), channels=3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_dataset(n=300, h=16, w=12, seed=0) -> D.ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return D.ArrayDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def reference_batches(ds, spec, batch, *, seed, epoch, translate, flip, channels_last, drop_last=True):
    """The batches of the earlier, host-only BatchLoader, restated: the whole set normalised through the
    serving path, then per batch an index, random_translate and the alternating flip."""
    images = D.to_float(ds.images, spec)
    g = torch.Generator().manual_seed(seed)
    flip_mask = torch.rand(len(ds), generator=g) < 0.5
    g.manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(ds), generator=g)
    mask = flip_mask if epoch % 2 == 0 else ~flip_mask
    steps = len(ds) // batch if drop_last else math.ceil(len(ds) / batch)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        x = images[idx]
        if translate:
            x = D.random_translate(x, translate, g)
        if flip:
            x = torch.where(mask[idx].view(-1, 1, 1, 1), x.flip(-1), x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        yield x.contiguous(memory_format=fmt), ds.labels[idx]


@pytest.mark.parametrize("translate,flip,channels_last,drop_last",
                         [(2, True, True, True), (2, True, False, True), (3, False, True, True),
                          (0, True, False, True), (0, False, True, True), (1, True, True, False)])
def test_loader_gives_the_earlier_batches_bit_for_bit(translate, flip, channels_last, drop_last):
    ds = random_dataset()
    loader = D.BatchLoader(ds, SPEC, 64, train=True, translate=translate, flip=flip, seed=7,
                           channels_last=channels_last, drop_last=drop_last, device="cpu")
    for epoch in range(3):
        loader.set_epoch(epoch)
        ref = list(reference_batches(ds, SPEC, 64, seed=7, epoch=epoch, translate=translate, flip=flip,
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
