"""Data-parallel training across processes launched by torchrun (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc-per-node N training/run_all.py ...      one model trained by N processes

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_from_env()` joins the
process group they describe (nothing happens without them: the single-process command is unchanged).
What the engine does with it (training/engine.py):

  data      every rank holds the whole uint8 training set and makes the same random draws; each global
            batch (the recipe's batch) is split into N disjoint per-rank slices (BatchLoader rank /
            world_size), so the ranks together see exactly the single process's batches
  gradients averaged over the ranks after backward, before clipping and the optimizer step (one
            all-reduce of all gradients, flattened); every rank then takes the same step
  BatchNorm per rank: each rank normalises with the statistics of its own slice (as airbench-style
            recipes and DistributedDataParallel without SyncBatchNorm do); the running statistics are
            averaged over the ranks at the end of every epoch, so checkpoints, evaluation and the saved
            model use the mean over ranks and every rank ends with identical weights
  start     parameters and buffers are broadcast from rank 0 after the data-dependent initialisation

A multi-node launch is torchrun's own rendezvous, the same command on every node:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --rdzv-id RUN_NAME training/run_all.py ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(timeout_s: float | None = None) -> World:
    """Join the process group torchrun describes (NCCL when CUDA is there, else gloo); a World of one
    when the process was not launched by torchrun. Idempotent."""
    if not launched_by_torchrun() or not dist.is_available():
        return World()
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("LAB_DIST_TIMEOUT_S", 1800)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return current()


def current() -> World:
    """The process group this process is in (a World of one when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=str(dist.get_backend()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (pickled; for small things: paths, flags, a checkpoint)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` from rank `src`."""
    if not current().distributed:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def _flat_all_reduce(tensors: list[torch.Tensor], average: bool) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


@torch.no_grad()
def average_gradients(model: nn.Module) -> None:
    """Gradients averaged over the ranks (what DistributedDataParallel does): the gradient of the global
    batch's mean loss. One all-reduce over all gradients; parameters without a gradient (frozen ones)
    are skipped on every rank alike, so no find_unused_parameters bookkeeping is needed."""
    if not current().distributed:
        return
    _flat_all_reduce([p.grad for p in model.parameters() if p.grad is not None], average=True)


@torch.no_grad()
def average_buffers(*modules: nn.Module | None) -> None:
    """Floating-point buffers (BatchNorm running statistics) averaged over the ranks; integer ones
    (batch counters) are the same on every rank already."""
    if not current().distributed:
        return
    bufs = [b for m in modules if m is not None for b in m.buffers() if b.dtype.is_floating_point]
    _flat_all_reduce(bufs, average=True)


def all_sum(values: list[float | int | torch.Tensor], device: torch.device) -> list[float]:
    """Each value summed over the ranks (one all-reduce); plain floats back."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if current().distributed:
        dist.all_reduce(t)
    return t.tolist()
