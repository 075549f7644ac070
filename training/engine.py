"""The training loop, torchvision-reference style: small functions with their dependencies passed in.

    train_step(model, x, y, optimizers, ...)          one optimisation step; returns loss and logits
    train_one_epoch(model, loader, optimizers, ...)   the steps of one epoch, with the LR schedule
    train(model, train_set, spec, cfg, ...)           device, seeds, data fit, resume, epochs, history

`TrainConfig` is generic: its defaults are plain SGD at a constant LR with nothing else; the recipes
(training/recipes.py) are where real hyper-parameters live. The engine picks the device (CUDA when
present), uses bf16 autocast where the hardware has native bf16 and channels_last for conv nets, and
checkpoints every epoch (training/checkpoint.py) so an interrupted run continues where it stopped.

On a GPU the uint8 training set, its normalisation and the batch-wise flips and shifts live on the
device (training/data.py BatchLoader); the steps make no host synchronisation (losses and accuracies
stay on the device until the end of the epoch). Each speed lever is a TrainConfig field, so a benchmark
can switch it off and measure it (bench/time_to_accuracy.py --set field=value).

Under torchrun (training/distributed.py) the same `train` trains one model across the processes: each
rank takes its slice of every global batch, gradients are averaged after backward, BatchNorm statistics
are per rank and their running averages are averaged at the end of every epoch; the main rank alone
evaluates, logs and writes checkpoints.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.hardware import cpu_has_native_bf16
from lab.preprocess import Preprocessing
from training import checkpoint
from training import distributed as dist
from training.checkpoint import CheckpointError  # noqa: F401  (re-exported)
from training.data import ArrayDataset, BatchLoader
from training.optim import ConfigError, build_optimizers, set_lr


@dataclass
class TrainConfig:
    recipe: str = ""                  # the recipe these settings came from (training/recipes.py)
    epochs: float = 1.0               # may be fractional: training stops after ceil(epochs * steps)
    batch_size: int = 128
    optimizer: str = "sgd"            # sgd | adam | adamw | rmsprop | rprop | adamax | muon
    lr: float = 0.01                  # for "muon": the Muon LR of the conv filters
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"        # linear | onecycle | cosine | constant
    warmup: float = 0.0               # fraction of training spent warming up
    final_lr: float = 0.0             # LR factor at the end of the schedule
    label_smoothing: float = 0.0
    averaging: str = "none"           # none | ema | lookahead
    ema_decay: float = 0.99           # per averaging update
    ema_every: int = 5                # steps between averaging updates
    grad_clip: float = 0.0            # max global grad norm (clip_grad_norm_); 0 = off
    # distillation (training/compress/): with a teacher's logits per training image (train(teacher=...)),
    # the loss is (1 - w) x cross-entropy on the labels + w x T^2 x KL(teacher || student) at temperature T
    distill_weight: float = 0.0       # w; 0 = the labels alone
    distill_temperature: float = 1.0  # T
    translate: int = 0                # random translation in pixels (reflect padding)
    flip: bool = False                # alternating horizontal flip
    tta_level: int = 0                # test-time augmentation of the final model (models.tta)
    precision: str = "auto"           # auto | bf16 | fp32
    channels_last: bool | None = None  # None: on for conv nets
    compile: bool = False             # torch.compile the model
    compile_mode: str = ""            # torch.compile's mode: "" (default), "reduce-overhead" (CUDA graphs), ...
    seed: int = 0                     # initial weights and batch order (the data split has its own seed)
    threads: int = 0                  # torch intra-op threads; 0 = all cores
    # learning rates of the roles a model declares (models/base.py); None = lr
    head_lr: float | None = None      # the classifier
    bias_lr: float | None = None      # biases and norm parameters (muon: every non-matrix parameter)
    muon_momentum: float = 0.6
    whiten_bias_epochs: float = 0.0   # a "whitening_bias" role trains this many epochs, then freezes; 0 = all
    whiten_images: int = 5000         # training images a data-fitted first layer is fitted to
    # speed levers: none changes the recipe; each can be switched off to measure it
    data_device: str = "auto"         # auto: the training images live on the training device; cpu: on the
                                      # host, each batch made there and copied over (the older way)
    finite_check: str = "epoch"       # epoch: non-finite losses are caught at the end of the epoch, with no
                                      # host sync per step; step: after every step (a sync per step)
    fused_optim: bool | None = None   # fused SGD/Adam kernels; None: on CUDA only
    cudnn_benchmark: bool = True      # cuDNN picks the fastest convolution algorithms (CUDA only)
    eval_batch_size: int = 0          # per-epoch evaluation batch; 0: 1000 on the CPU, 5000 on a GPU

    SPEED_FIELDS = ("threads", "compile", "compile_mode", "data_device", "finite_check", "fused_optim",
                    "cudnn_benchmark", "eval_batch_size")

    def key(self) -> str:
        """What must match for a checkpoint to be resumed (not threads, compilation or other speed levers)."""
        d = asdict(self)
        for k in self.SPEED_FIELDS:
            d.pop(k)
        return checkpoint.run_key(d)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0        # data fit + optimisation steps, without evaluation
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    resumed_from_epoch: int = 0
    world_size: int = 1               # processes that trained the model together (torchrun)


# ---------------------------------------------------------------- hardware


def pick_device() -> torch.device:
    """CUDA when present (this process's current GPU: torchrun's LOCAL_RANK under training/distributed.py)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; valid: auto, bf16, fp32")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=(precision == "bf16"))


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


# ---------------------------------------------------------------- weight averaging


class WeightAveraging:
    """EMA: a shadow copy used for evaluation. Lookahead: the shadow copy is also written back."""

    def __init__(self, model: nn.Module, kind: str, decay: float, every: int):
        if kind not in ("ema", "lookahead"):
            raise ValueError(f"unknown averaging {kind!r}; valid: none, ema, lookahead")
        self.kind, self.decay, self.every = kind, decay, every
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, progress: float) -> None:
        if step % self.every:
            return
        # lookahead ramps its decay up over training (airbench94); EMA uses it as given
        decay = self.decay * progress ** 3 if self.kind == "lookahead" else self.decay
        for s, m in zip(self.shadow.state_dict().values(), model.state_dict().values()):
            if s.dtype.is_floating_point:
                s.lerp_(m, 1.0 - decay)
                if self.kind == "lookahead":
                    m.copy_(s)

    def final(self, model: nn.Module) -> nn.Module:
        """The model to keep: the averaged weights."""
        model.load_state_dict(self.shadow.state_dict())
        return model


# ---------------------------------------------------------------- the step and the epoch


def distillation_loss(out: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, *, weight: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - weight) x cross-entropy with the labels + weight x T^2 x KL(softmax(teacher / T) || softmax(out / T))
    (Hinton et al. 2015: the T^2 keeps the soft term's gradient scale independent of T)."""
    hard = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    t = temperature
    soft = F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - weight) * hard + weight * soft


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizers: list[torch.optim.Optimizer], *,
               precision: str, label_smoothing: float = 0.0, grad_clip: float = 0.0,
               after_backward: Callable[[nn.Module], None] | None = None,
               sync_grads: Callable[[nn.Module], None] | None = None, teacher: torch.Tensor | None = None,
               distill_weight: float = 0.0, distill_temperature: float = 1.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, (average gradients over ranks), (clip), step. Returns the detached loss,
    logits, and whether clipping shrank this step (a bool tensor; False when grad_clip is 0). With
    `teacher` (its logits for these images) the loss is `distillation_loss`. Nothing here waits for the
    device."""
    with autocast(x.device, precision):
        out = model(x)
    if teacher is None:
        loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
    else:
        loss = distillation_loss(out.float(), y, teacher, weight=distill_weight, temperature=distill_temperature,
                                 label_smoothing=label_smoothing)
    loss.backward()
    if sync_grads is not None:
        sync_grads(model)                   # data-parallel: the gradient of the global batch
    if after_backward is not None:
        after_backward(model)               # e.g. a study reading per-layer gradient norms
    clipped = torch.zeros((), dtype=torch.bool, device=out.device)
    if grad_clip:
        clipped = nn.utils.clip_grad_norm_(model.parameters(), grad_clip) > grad_clip
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach(), out.detach(), clipped


def train_one_epoch(model: nn.Module, forward: nn.Module, loader: BatchLoader, optimizers, cfg: TrainConfig,
                    precision: str, device: torch.device, step: int, total_steps: int,
                    averaging: WeightAveraging | None = None, bar=None,
                    after_backward: Callable[[nn.Module], None] | None = None, *,
                    sync_grads: Callable[[nn.Module], None] | None = None) -> tuple[dict, int]:
    """The steps of one epoch (up to total_steps). Returns the epoch's train loss/accuracy and the new step.

    Losses and accuracies stay on the device until the end of the epoch, where they are read once (and
    summed over the ranks of a data-parallel run); a non-finite loss is reported then, with its step
    (cfg.finite_check="step" checks after every step instead, at the cost of a host sync per step)."""
    model.train()
    losses, corrects, clips = [], [], []
    seen, first_step = 0, step
    for x, y, *teacher in loader:  # a loader with a teacher's logits yields them third
        if step >= total_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t = teacher[0].to(device, non_blocking=True) if teacher else None
        set_lr(optimizers, step / total_steps, cfg)
        loss, out, clipped = train_step(forward, x, y, optimizers, precision=precision,
                                        label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
                                        after_backward=after_backward, sync_grads=sync_grads, teacher=t,
                                        distill_weight=cfg.distill_weight,
                                        distill_temperature=cfg.distill_temperature)
        clips.append(clipped)
        if cfg.finite_check == "step" and not torch.isfinite(loss):
            raise _non_finite(loss.item(), step + 1, cfg)
        step += 1
        if averaging is not None:
            averaging.update(model, step, step / total_steps)
        losses.append(loss * len(y))
        corrects.append((out.argmax(1) == y).sum())
        seen += len(y)
        if bar is not None:
            bar.update(1)
    if losses:
        step_losses = torch.stack(losses)
        loss_sum, correct = step_losses.sum(), torch.stack(corrects).sum()
        clipped_steps = torch.stack(clips).sum()
    else:
        step_losses = loss_sum = correct = clipped_steps = torch.zeros((), device=device)
    loss_sum, correct, seen = dist.all_sum([loss_sum, correct, seen], device)  # the epoch's one host sync
    clipped_steps = int(clipped_steps)  # every rank clips the same averaged gradient: no sum over ranks
    if not math.isfinite(loss_sum):
        bad = torch.nonzero(~torch.isfinite(step_losses.reshape(-1))).flatten().tolist()
        if bad:
            raise _non_finite(step_losses[bad[0]].item(), first_step + bad[0] + 1, cfg)
        raise _non_finite(loss_sum, step, cfg, where="on another rank, ")
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images": int(seen), "steps": step - first_step, "clipped_steps": clipped_steps}, step


def _non_finite(value: float, step: int, cfg: TrainConfig, where: str = "") -> FloatingPointError:
    return FloatingPointError(f"the training loss became {value} {where}at step {step}: the learning "
                              f"rate ({cfg.lr:g}) is probably too high for this model and recipe")


@torch.no_grad()
def evaluate_loss_acc(model: nn.Module, loader: BatchLoader, device: torch.device,
                      precision: str) -> tuple[float, float]:
    """Mean loss and accuracy; summed on the device and read once at the end."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


# ---------------------------------------------------------------- the run


def fit_to_data(model: nn.Module, loader: BatchLoader, cfg: TrainConfig, device: torch.device) -> bool:
    """The model's data-dependent initialisation (if it declares one) on cfg.whiten_images training images."""
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(loader.labels), generator=g)[:cfg.whiten_images]
    return model.fit_to_data(loader.normalized(pick).to(device))


def train(model: nn.Module, train_set: ArrayDataset, spec: Preprocessing, cfg: TrainConfig, *,
          eval_sets: dict[str, ArrayDataset] | None = None, run_dir: Path | None = None,
          progress: bool = True, log=print, context: dict | None = None,
          after_backward: Callable[[nn.Module], None] | None = None,
          on_epoch_end: Callable[[nn.Module, dict], None] | None = None,
          device: torch.device | str | None = None, teacher: torch.Tensor | None = None) -> TrainResult:
    """Train `model` on `train_set`; evaluate on each of `eval_sets` after every epoch.

    With `run_dir`, writes history.json and checkpoint.pt there every epoch, and resumes from
    checkpoint.pt if one with the same config, precision, data size and `context` (what else must
    match: dataset, architecture, ...) is present.

    `on_epoch_end(eval_model, record)` runs after each epoch's evaluation, outside the training clock;
    it may add entries to the epoch's record (a benchmark's test accuracy with TTA, say), and an exception
    it raises (optuna.TrialPruned, say) ends the training there. `device`
    overrides the automatic choice (pick_device). `teacher`: a teacher's logits (N, K) for the N training
    images in their order, which makes the loss `distillation_loss` with cfg.distill_weight and
    cfg.distill_temperature (put what identifies the teacher in `context`). In a torchrun process group (training/distributed.py)
    the ranks train one model together; only the main rank evaluates, logs, calls on_epoch_end and
    writes to run_dir.
    """
    from tqdm import tqdm

    from lab.runfiles import write_json_atomic

    wall0 = time.perf_counter()
    world = dist.current()
    if not world.main:
        log, progress, eval_sets, on_epoch_end = (lambda *_: None), False, None, None
    if cfg.batch_size % world.world_size:
        raise ConfigError(f"the batch size {cfg.batch_size} does not split evenly over {world.world_size} "
                          f"processes: choose a batch size that is a multiple of the number of processes")
    if cfg.finite_check not in ("epoch", "step"):
        raise ConfigError(f"unknown finite_check {cfg.finite_check!r}; valid: epoch, step")
    device = torch.device(device) if device is not None else pick_device()
    data_device = device if cfg.data_device == "auto" else torch.device(cfg.data_device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.manual_seed(cfg.seed + world.rank)  # dropout and any other randomness inside the steps
    channels_last = has_conv(model) if cfg.channels_last is None else cfg.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    if teacher is not None and tuple(teacher.shape[:1]) != (len(train_set),):
        raise ConfigError(f"the teacher's logits are for {teacher.shape[0]} images, the training set has "
                          f"{len(train_set)}")
    if teacher is None and cfg.distill_weight:
        raise ConfigError(f"distill_weight {cfg.distill_weight:g} needs a teacher's logits (train(teacher=...))")
    loader = BatchLoader(train_set, spec, cfg.batch_size, train=True, translate=cfg.translate,
                         flip=cfg.flip, seed=cfg.seed, channels_last=channels_last, device=data_device,
                         rank=world.rank, world_size=world.world_size, targets=teacher)
    if len(loader) == 0:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {len(train_set)} training images")
    eval_batch = cfg.eval_batch_size or (5000 if data_device.type == "cuda" else 1000)
    eval_loaders = {name: BatchLoader(ds, spec, eval_batch, train=False, channels_last=channels_last,
                                      device=data_device)
                    for name, ds in (eval_sets or {}).items()}
    total_steps = max(1, math.ceil(cfg.epochs * len(loader)))
    n_epochs = math.ceil(total_steps / len(loader))
    key = checkpoint.run_key(cfg.key(), precision, len(train_set), context or {})
    ckpt = run_dir / checkpoint.FILE if run_dir else None
    # the main rank decides and reads; the others get its checkpoint (they may not see its disk)
    resume = dist.broadcast_object(ckpt is not None and world.main and ckpt.exists())
    state = dist.broadcast_object(checkpoint.load(ckpt) if resume and world.main else None) if resume else None

    train_seconds, history, start_epoch, step = 0.0, [], 0, 0
    if not resume:
        t0 = time.perf_counter()
        fit_to_data(model, loader, cfg, device)
        dist.broadcast_module(model)  # every rank starts from the main rank's weights
        synchronize(device)
        train_seconds += time.perf_counter() - t0
    optimizers = build_optimizers(model, cfg)
    averaging = (WeightAveraging(model, cfg.averaging, cfg.ema_decay, cfg.ema_every)
                 if cfg.averaging != "none" else None)
    if resume:
        state = checkpoint.restore_state(state, ckpt, key, model, optimizers, averaging)
        start_epoch, step, history, train_seconds = (state["epoch"], state["step"], state["history"],
                                                     state["train_seconds"])
        log(f"resuming from {ckpt}: epoch {start_epoch}/{n_epochs} done")

    forward = torch.compile(model, mode=cfg.compile_mode or None) if cfg.compile else model
    sync_grads = dist.average_gradients if world.distributed else None
    for epoch in range(start_epoch, n_epochs):
        loader.set_epoch(epoch)
        bar = tqdm(total=min(len(loader), total_steps - step), desc=f"epoch {epoch + 1}/{n_epochs}",
                   disable=not progress, file=sys.stderr, leave=False, mininterval=1.0)
        synchronize(device)
        t0 = time.perf_counter()
        stats, step = train_one_epoch(model, forward, loader, optimizers, cfg, precision, device, step,
                                      total_steps, averaging, bar, after_backward, sync_grads=sync_grads)
        synchronize(device)
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        record = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                  "seconds": epoch_seconds, "train_seconds": train_seconds, "images": stats["images"],
                  "steps": stats["steps"], "clipped_steps": stats["clipped_steps"]}
        # per-rank BatchNorm: the running statistics become the mean over the ranks
        dist.average_buffers(model, averaging.shadow if averaging is not None else None)
        eval_model = averaging.shadow if averaging is not None else model
        for name, ev in eval_loaders.items():
            record[f"{name}_loss"], record[f"{name}_acc"] = evaluate_loss_acc(eval_model, ev, device, precision)
        if on_epoch_end is not None:
            on_epoch_end(eval_model.eval(), record)  # the next epoch puts the model back in training mode
        history.append(record)
        if run_dir is not None and world.main:
            write_json_atomic(run_dir / "history.json", history)
            checkpoint.save(ckpt, key, model, optimizers, averaging, epoch=epoch + 1, step=step,
                            history=history, train_seconds=train_seconds)
        log("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    if averaging is not None:
        model = averaging.final(model)
    model.eval()
    images = sum(r["images"] for r in history)
    return TrainResult(model=model, history=history, train_seconds=train_seconds,
                       wall_seconds=time.perf_counter() - wall0,
                       images_per_second=images / max(sum(r["seconds"] for r in history), 1e-9),
                       device=str(device), precision=precision, resumed_from_epoch=start_epoch,
                       world_size=world.world_size)
