"""The training loop: one function, `train`, driven by one `TrainConfig`.

It picks the device (CUDA when present, else CPU), uses bf16 autocast where the hardware has native
bf16 (CUDA, or a CPU with AVX-512 BF16 / AMX) and channels_last for conv nets, schedules the LR, keeps
an EMA or lookahead copy of the weights if asked, logs a per-epoch history (train and eval loss and
accuracy, seconds) as JSON, and checkpoints every epoch so an interrupted run continues where it
stopped when started again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from serving.preprocess import Preprocessing
from training.data import ArrayDataset, BatchLoader
from training.optim import build_optimizers, set_lr


@dataclass
class TrainConfig:
    epochs: float = 10.0              # may be fractional: training stops after ceil(epochs * steps)
    batch_size: int = 512
    optimizer: str = "sgd"            # sgd | adam | adamw | rmsprop | rprop | adamax | muon
    lr: float = 0.05                  # for "muon": the Muon LR of the conv filters
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"        # linear | onecycle | cosine | constant
    warmup: float = 0.2               # fraction of training spent warming up
    final_lr: float = 0.0             # LR factor at the end of the schedule
    label_smoothing: float = 0.0
    averaging: str = "none"           # none | ema | lookahead
    ema_decay: float = 0.99           # per averaging update
    ema_every: int = 5                # steps between averaging updates
    grad_clip: float = 0.0            # max global grad norm; 0 = off
    translate: int = 0                # random translation in pixels (reflect padding)
    flip: bool = False                # alternating horizontal flip
    tta_level: int = 0                # test-time augmentation of the final model (models.tta)
    precision: str = "auto"           # auto | bf16 | fp32
    channels_last: bool | None = None  # None: on for conv nets
    compile: bool = False             # torch.compile the model
    seed: int = 0
    threads: int = 0                  # torch intra-op threads; 0 = all cores
    # Muon recipe (airbench94_muon): SGD for biases and the head, Muon for filters
    bias_lr: float = 0.05
    head_lr: float = 0.5
    muon_momentum: float = 0.6
    whiten_bias_epochs: float = 3.0
    whiten_images: int = 5000         # training images used to fit a whitening layer

    def key(self) -> str:
        """What must match for a checkpoint to be resumed (not threads or compile)."""
        d = asdict(self)
        for k in ("threads", "compile"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0        # whitening fit + optimisation steps, without evaluation
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    resumed_from_epoch: int = 0


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------- hardware


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


# ---------------------------------------------------------------- evaluation during training


@torch.no_grad()
def evaluate_loss_acc(model: nn.Module, loader: BatchLoader, device: torch.device,
                      precision: str) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss_sum / max(n, 1), correct / max(n, 1)


# ---------------------------------------------------------------- checkpoints


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {reason}); "
                              f"delete it or start fresh (run_all.py --fresh)") from None


# ---------------------------------------------------------------- the loop


def train(model: nn.Module, train_set: ArrayDataset, spec: Preprocessing, cfg: TrainConfig, *,
          eval_sets: dict[str, ArrayDataset] | None = None, run_dir: Path | None = None,
          progress: bool = True, log=print, context: dict | None = None) -> TrainResult:
    """Train `model` on `train_set`; evaluate on each of `eval_sets` after every epoch.

    With `run_dir`, writes history.json and checkpoint.pt there every epoch, and resumes from
    checkpoint.pt if one with the same config, precision, data size and `context` (what else must
    match: dataset, architecture, ...) is present.
    """
    from tqdm import tqdm

    wall0 = time.perf_counter()
    device = pick_device()
    precision = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    channels_last = has_conv(model) if cfg.channels_last is None else cfg.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    loader = BatchLoader(train_set, spec, cfg.batch_size, train=True, translate=cfg.translate,
                         flip=cfg.flip, seed=cfg.seed, channels_last=channels_last)
    if len(loader) == 0:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {len(train_set)} training images")
    eval_loaders = {name: BatchLoader(ds, spec, 1000, train=False, channels_last=channels_last)
                    for name, ds in (eval_sets or {}).items()}
    total_steps = max(1, math.ceil(cfg.epochs * len(loader)))
    n_epochs = math.ceil(total_steps / len(loader))
    run_key = hashlib.sha256(json.dumps([cfg.key(), precision, len(train_set), context or {}], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]

    train_seconds, history, start_epoch, step = 0.0, [], 0, 0
    ckpt_path = run_dir / "checkpoint.pt" if run_dir else None
    resume = ckpt_path is not None and ckpt_path.exists()
    if hasattr(model, "fit_whitening") and not resume:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(loader.images), generator=g)[:cfg.whiten_images]
        model.fit_whitening(loader.images[pick].to(device))
        train_seconds += time.perf_counter() - t0

    optimizers = build_optimizers(model, cfg)
    averaging = (WeightAveraging(model, cfg.averaging, cfg.ema_decay, cfg.ema_every)
                 if cfg.averaging != "none" else None)

    if resume:
        state = load_checkpoint(ckpt_path)
        if state.get("config_key") != run_key:
            raise CheckpointError(f"{ckpt_path} was written by a run with a different configuration (recipe, "
                                  f"precision, data or model); start fresh (run_all.py --fresh) or restore it")
        try:
            model.load_state_dict(state["model"])
            for opt, s in zip(optimizers, state["optimizers"]):
                opt.load_state_dict(s)
            if averaging is not None:
                averaging.shadow.load_state_dict(state["averaging"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path} does not fit this model: {e}") from None
        torch.set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        history, train_seconds = state["history"], state["train_seconds"]
        log(f"resuming from {ckpt_path}: epoch {start_epoch}/{n_epochs} done")

    train_model = torch.compile(model) if cfg.compile else model
    for epoch in range(start_epoch, n_epochs):
        loader.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(total=min(len(loader), total_steps - step), desc=f"epoch {epoch + 1}/{n_epochs}",
                   disable=not progress, file=sys.stderr, leave=False, mininterval=1.0)
        for x, y in loader:
            if step >= total_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            set_lr(optimizers, step / total_steps, cfg)
            with autocast(device, precision):
                out = train_model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            if averaging is not None:
                averaging.update(model, step, step / total_steps)
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.update(1)
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(seen, 1),
                  "train_acc": correct.item() / max(seen, 1), "seconds": epoch_seconds,
                  "train_seconds": train_seconds, "images": seen}
        eval_model = averaging.shadow if averaging is not None else model
        for name, ev in eval_loaders.items():
            record[f"{name}_loss"], record[f"{name}_acc"] = evaluate_loss_acc(eval_model, ev, device,
                                                                                precision)
        history.append(record)
        if run_dir is not None:
            write_json_atomic(run_dir / "history.json", history)
            _save_atomic({"config_key": run_key, "model": model.state_dict(),
                          "optimizers": [o.state_dict() for o in optimizers],
                          "averaging": averaging.shadow.state_dict() if averaging else {},
                          "rng": torch.get_rng_state(), "epoch": epoch + 1, "step": step,
                          "history": history, "train_seconds": train_seconds}, ckpt_path)
        log("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    if averaging is not None:
        model = averaging.final(model)
    model.eval()
    images = sum(r["images"] for r in history)
    return TrainResult(model=model, history=history, train_seconds=train_seconds,
                       wall_seconds=time.perf_counter() - wall0,
                       images_per_second=images / max(sum(r["seconds"] for r in history), 1e-9),
                       device=str(device), precision=precision,
                       resumed_from_epoch=start_epoch)
