"""Optimizers by name, the Muon optimizer, and learning-rate schedules.

`build_optimizers(model, cfg)` returns one optimizer, or two for "muon" (Muon for the convolution
filters, Nesterov SGD for biases and the head, as in airbench94_muon). Parameters are grouped by the
roles the model declares (`param_roles()`, models/base.py), never guessed. Each param group carries
`initial_lr` and a `schedule_end` (fraction of training at which its LR reaches its final value), so
`set_lr(optimizers, progress, cfg)` can drive all of them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "rprop", "adamax", "muon", "adam_scratch", "adamax_scratch")
# *_scratch: the hand-written Adam and AdaMax of training/scratch/optimizers.py (they match torch's step for step)
SCHEDULES = ("linear", "onecycle", "cosine", "constant")


class ConfigError(ValueError):
    pass


def newton_schulz_orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by a quintic Newton-Schulz iteration (in bf16).

    The coefficients push small singular values up fast; the result has singular values roughly in
    [0.5, 1.5] rather than exactly 1, which trains just as well (Keller Jordan's Muon).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16)
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum, then an orthogonalised update; weights are renormalised to norm sqrt(fan_out).

    Meant for scale-invariant weights (convolutions followed by BatchNorm).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.6, nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.mul_(len(p) ** 0.5 / p.norm())
                update = newton_schulz_orthogonalize(g.reshape(len(g), -1)).view_as(g)
                p.add_(update.to(p.dtype), alpha=-group["lr"])


def _role_groups(model: nn.Module, cfg) -> list[dict]:
    """Parameter groups by the roles the model declares (models/base.py): the head at cfg.head_lr, the
    biases and norm parameters at cfg.bias_lr, the rest at cfg.lr (a None role LR means cfg.lr)."""
    roles = model.param_roles()
    head_ids = {id(p) for p in roles.get("head", [])}
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in params if id(p) in head_ids]
    biases = [p for p in params if id(p) not in head_ids and p.ndim < 2]
    rest = [p for p in params if id(p) not in head_ids and p.ndim >= 2]
    groups = [dict(params=rest, lr=cfg.lr),
              dict(params=biases, lr=cfg.bias_lr if cfg.bias_lr is not None else cfg.lr),
              dict(params=head, lr=cfg.head_lr if cfg.head_lr is not None else cfg.lr)]
    return [g for g in groups if g["params"]]


def _fused(cfg, model: nn.Module) -> dict:
    """fused=True for SGD/Adam/AdamW where cfg.fused_optim asks for it (None: when the model is on CUDA)."""
    want = getattr(cfg, "fused_optim", None)
    if want is None:
        want = any(p.is_cuda for p in model.parameters())
    return {"fused": True} if want else {}


def build_optimizers(model: nn.Module, cfg) -> list[torch.optim.Optimizer]:
    name = cfg.optimizer.lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if name == "muon":
        return _build_muon(model, cfg)
    groups, wd = _role_groups(model, cfg), cfg.weight_decay
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=wd, **_fused(cfg, model))
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=wd, **_fused(cfg, model))
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd, **_fused(cfg, model))
    elif name == "rmsprop":
        opt = torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    elif name == "rprop":
        opt = torch.optim.Rprop(groups, lr=cfg.lr)  # a full-batch method; no weight decay
    elif name == "adamax":
        opt = torch.optim.Adamax(groups, lr=cfg.lr, weight_decay=wd)
    else:
        from training.scratch import optimizers as scratch

        opt = {"adam_scratch": scratch.Adam, "adamax_scratch": scratch.AdaMax}[name](groups, lr=cfg.lr, weight_decay=wd)
    for g in opt.param_groups:
        g["initial_lr"], g["schedule_end"] = g["lr"], 1.0
    return [opt]


def _build_muon(model: nn.Module, cfg) -> list[torch.optim.Optimizer]:
    """Muon for the weight matrices (conv filters); Nesterov SGD for the head, the biases and a
    "whitening_bias" role, which trains only for its first cfg.whiten_bias_epochs epochs."""
    if cfg.bias_lr is None or cfg.head_lr is None:
        raise ConfigError("the muon optimizer needs bias_lr and head_lr (the SGD part of the recipe)")
    roles = model.param_roles()
    head = [p for p in roles.get("head", []) if p.requires_grad]
    whiten_bias = [p for p in roles.get("whitening_bias", []) if p.requires_grad]
    taken = {id(p) for p in head + whiten_bias}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    filters = [p for p in params if p.ndim >= 2]
    others = [p for p in params if p.ndim < 2]
    wd = cfg.weight_decay
    groups = [dict(params=others, lr=cfg.bias_lr, weight_decay=wd / cfg.bias_lr, schedule_end=1.0),
              dict(params=head, lr=cfg.head_lr, weight_decay=wd / cfg.head_lr, schedule_end=1.0)]
    if whiten_bias:
        end = min(1.0, cfg.whiten_bias_epochs / cfg.epochs) if cfg.epochs and cfg.whiten_bias_epochs else 1.0
        groups.append(dict(params=whiten_bias, lr=cfg.bias_lr, weight_decay=wd / cfg.bias_lr,
                           schedule_end=end))
    sgd = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.bias_lr, momentum=cfg.momentum,
                          nesterov=cfg.momentum > 0, **_fused(cfg, model))
    optimizers = [sgd]
    if filters:
        muon = Muon(filters, lr=cfg.lr, momentum=cfg.muon_momentum, nesterov=True)
        muon.param_groups[0]["schedule_end"] = 1.0
        optimizers.append(muon)
    for opt in optimizers:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return optimizers


def lr_factor(progress: float, schedule: str, warmup: float = 0.0, final: float = 0.0) -> float:
    """LR multiplier at `progress` in [0, 1] of a group's schedule."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if warmup > 0 and p < warmup:
        start = 0.2 if schedule == "onecycle" else 0.0
        return start + (1.0 - start) * p / warmup
    q = (p - warmup) / (1 - warmup) if warmup < 1 else 1.0
    if schedule == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * q))
    return 1.0 + (final - 1.0) * q  # linear and onecycle decay linearly after the warmup


def set_lr(optimizers: list[torch.optim.Optimizer], progress: float, cfg) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            end = g.get("schedule_end", 1.0)
            if end < 1.0 and progress >= end:
                g["lr"] = 0.0
                for p in g["params"]:
                    p.requires_grad_(False)  # e.g. the whitening bias after its epochs
                continue
            g["lr"] = g["initial_lr"] * lr_factor(progress / end, cfg.schedule, cfg.warmup, cfg.final_lr)
