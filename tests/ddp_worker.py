"""Launched by tests/test_ddp.py under torchrun: trains one small model across the processes and saves
each rank's weights (rank<r>.pt in the folder given), for comparison with a single-process run.

    ddp_worker.py OUT            train once
    ddp_worker.py OUT resume     train once uninterrupted, then again interrupted after epoch 1 and resumed
                                 from its checkpoint (read by rank 0, sent to the others)
"""
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


class Interrupt(Exception):
    pass


def main() -> int:
    from training import distributed as dist
    from training.engine import train

    world = dist.init_from_env()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    quiet = {"progress": False, "log": lambda *_: None}
    try:
        net, ds, spec, cfg = setup()
        res = train(net, ds, spec, cfg, **quiet)
        torch.save({"state": res.model.state_dict(), "world_size": res.world_size, "history": res.history},
                   out / f"rank{world.rank}.pt")
        if sys.argv[2:] == ["resume"]:
            steps = []

            def stop_in_epoch_two(model):  # every rank stops at the same step, after epoch 1's checkpoint
                steps.append(1)
                if len(steps) == 9:  # 8 steps per epoch
                    raise Interrupt

            try:
                train(setup()[0], ds, spec, cfg, run_dir=out / "run", after_backward=stop_in_epoch_two, **quiet)
            except Interrupt:
                pass
            resumed = train(setup()[0], ds, spec, cfg, run_dir=out / "run", **quiet)
            torch.save({"state": resumed.model.state_dict(), "resumed_from_epoch": resumed.resumed_from_epoch},
                       out / f"resumed{world.rank}.pt")
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
