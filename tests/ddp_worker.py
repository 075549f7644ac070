"""Launched by tests/test_ddp.py under torchrun: trains one small model across the processes and saves
each rank's weights (rank<r>.pt in the folder given), for comparison with a single-process run."""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def setup():
    from models import create_model
    from tests.test_accel import SPEC, random_dataset
    from training.engine import TrainConfig

    ds = random_dataset(256, 16, 16, seed=5)
    net = create_model("simple_cnn", num_classes=10, image_size=16, n_layers=2, width=8, hidden=16, seed=0)
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
                      translate=2, flip=True, precision="fp32", schedule="linear", label_smoothing=0.1, seed=1)
    return net, ds, SPEC, cfg


def main() -> int:
    from training import distributed as dist
    from training.engine import train

    world = dist.init_from_env()
    try:
        net, ds, spec, cfg = setup()
        res = train(net, ds, spec, cfg, progress=False, log=lambda *_: None)
        out = Path(sys.argv[1])
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"state": res.model.state_dict(), "world_size": res.world_size, "history": res.history},
                   out / f"rank{world.rank}.pt")
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
