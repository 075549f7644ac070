import json

import pytest
import torch

from models import create_model
from lab.preprocess import Preprocessing
from tests.fakedata import _class_images
from training.data import ArrayDataset
from training.engine import CheckpointError, TrainConfig, train
from training.optim import ConfigError, Muon, build_optimizers, lr_factor
from training.recipes import make_config

SPEC = Preprocessing(size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)


def tiny_dataset(n=256, seed=0) -> ArrayDataset:
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = _class_images(rng, labels, 16, 3)
    return ArrayDataset(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                        torch.from_numpy(labels).long(), ["a", "b", "c", "d"])


def tiny_cnn():
    torch.manual_seed(0)
    return create_model("simple_cnn", num_classes=4, image_size=16, n_layers=2, width=8, hidden=16)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.01), ("adam", 3e-3), ("adamw", 3e-3),
                                          ("rmsprop", 1e-3), ("adamax", 3e-3), ("rprop", 1e-3)])
def test_a_few_epochs_lower_the_loss(optimizer, lr):
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer=optimizer, lr=lr, momentum=0.9, nesterov=True, schedule="constant",
                      weight_decay=0.0, precision="fp32")
    res = train(tiny_cnn(), tiny_dataset(), SPEC, cfg, progress=False, log=lambda *_: None)
    losses = [r["train_loss"] for r in res.history]
    assert losses[-1] < losses[0] * 0.9, losses


def test_muon_recipe_trains_airbench_and_reports_eval_sets():
    torch.manual_seed(0)
    net = create_model("airbench", num_classes=4, widths=(8, 16, 16))
    cfg = make_config("airbench94_muon", epochs=4, batch_size=32, whiten_images=64, whiten_bias_epochs=1)
    assert cfg.bias_lr == pytest.approx(0.053 * 32) and cfg.head_lr == pytest.approx(0.67 * 32)  # batch-scaled
    ds = tiny_dataset()
    res = train(net, ds, SPEC, cfg, eval_sets={"val": tiny_dataset(64, seed=1)}, progress=False,
                log=lambda *_: None)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert {"val_loss", "val_acc", "train_seconds"} <= set(res.history[-1])
    assert not net.whiten.bias.requires_grad  # trained only for its first epoch
    assert res.precision in ("bf16", "fp32")


@pytest.mark.parametrize("averaging", ["ema", "lookahead"])
def test_weight_averaging_runs(averaging):
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, averaging=averaging,
                      ema_every=2, precision="fp32")
    res = train(tiny_cnn(), tiny_dataset(), SPEC, cfg, progress=False, log=lambda *_: None)
    assert len(res.history) == 2


class Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, translate=1, flip=True,
                      precision="fp32", label_smoothing=0.1)
    ds = tiny_dataset()
    full = train(tiny_cnn(), ds, SPEC, cfg, run_dir=None, progress=False, log=lambda *_: None)

    def stop_after_first_epoch(msg):
        if msg.startswith("epoch 1"):
            raise Interrupt  # as if killed right after the checkpoint of epoch 1 was written

    with pytest.raises(Interrupt):
        train(tiny_cnn(), ds, SPEC, cfg, run_dir=tmp_path, progress=False, log=stop_after_first_epoch)
    assert (tmp_path / "checkpoint.pt").exists()
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1
    lines = []
    resumed = train(tiny_cnn(), ds, SPEC, cfg, run_dir=tmp_path, progress=False, log=lines.append)
    assert any(line.startswith("resuming") for line in lines)
    assert resumed.resumed_from_epoch == 1 and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    ds = tiny_dataset()
    cfg = TrainConfig(epochs=1, batch_size=32, precision="fp32")
    train(tiny_cnn(), ds, SPEC, cfg, run_dir=tmp_path, progress=False, log=lambda *_: None)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(tiny_cnn(), ds, SPEC, TrainConfig(epochs=2, batch_size=32, precision="fp32"),
              run_dir=tmp_path, progress=False, log=lambda *_: None)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        train(tiny_cnn(), tiny_dataset(), SPEC, TrainConfig(epochs=1, batch_size=32), run_dir=tmp_path,
              progress=False, log=lambda *_: None)


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid optimizers: sgd, adam"):
        build_optimizers(tiny_cnn(), TrainConfig(optimizer="lion"))


def test_muon_orthogonalises_its_update():
    w = torch.nn.Parameter(torch.randn(16, 32))
    w.grad = torch.randn(16, 32)
    before = w.detach().clone()
    Muon([w], lr=0.1, momentum=0.0, nesterov=False).step()
    step = (before * (16 ** 0.5 / before.norm()) - w.detach()) / 0.1
    s = torch.linalg.svdvals(step)
    assert 0.3 < s.min() and s.max() < 1.7  # singular values near 1: an orthogonalised step


def test_lr_schedules():
    assert lr_factor(0.0, "linear") == 1.0 and lr_factor(1.0, "linear") == 0.0
    assert lr_factor(0.1, "onecycle", warmup=0.2) == pytest.approx(0.6)
    assert lr_factor(0.5, "cosine") == pytest.approx(0.5)
    assert lr_factor(0.7, "constant") == 1.0
    with pytest.raises(ConfigError):
        lr_factor(0.5, "exponential")
