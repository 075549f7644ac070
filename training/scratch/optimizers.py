"""Adam and AdaMax written out as torch.optim.Optimizer subclasses, with the update rules as derived.

Adam (Kingma & Ba 2015), for each parameter theta with gradient g_t at step t:
    g_t   <- g_t + weight_decay * theta_{t-1}            (L2 penalty added to the gradient, as torch.optim.Adam)
    m_t    = beta1 * m_{t-1} + (1 - beta1) * g_t          (first moment: a running mean of the gradient)
    v_t    = beta2 * v_{t-1} + (1 - beta2) * g_t^2        (second moment: a running mean of its square)
    m_hat  = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t)      (bias corrections: m_0 = v_0 = 0)
    theta_t = theta_{t-1} - lr * m_hat / (sqrt(v_hat) + eps)

AdaMax (the same paper, section 7.1): Adam's L2 norm of past gradients replaced by the L-infinity norm
    m_t    = beta1 * m_{t-1} + (1 - beta1) * g_t
    u_t    = max(beta2 * u_{t-1}, |g_t| + eps)            (torch adds eps inside the max, so u_t > 0)
    theta_t = theta_{t-1} - lr / (1 - beta1^t) * m_t / u_t  (u_t needs no bias correction)

The arithmetic is arranged as torch's single-tensor implementations arrange it (bias corrections folded
into the step size and the denominator; m_t computed as m.lerp_(g, 1 - beta1) = m + (1 - beta1)(g - m),
algebraically b1 m + (1 - b1) g), so the parameters match torch.optim.Adam / Adamax bit for bit
(tests/test_scratch_optimizers.py asks <= 1e-6 after 100 steps). Written literally as
m.mul_(b1).add_(g, alpha=1 - b1), the rounding differs: about 6e-8 after 100 steps at lr 1e-3, but
3.5e-6 at lr 1e-2, betas (0.8, 0.99) on a small simple_cnn.
"""
from __future__ import annotations

import math

import torch


def _check(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if lr < 0:
        raise ValueError(f"invalid learning rate {lr}")
    if eps < 0:
        raise ValueError(f"invalid eps {eps}")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    if weight_decay < 0:
        raise ValueError(f"invalid weight_decay {weight_decay}")


class Adam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        _check(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["m"], state["v"]
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)          # g_t + wd * theta
                m.lerp_(g, 1 - beta1)                                       # m_t = b1 m + (1 - b1) g_t
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)               # v_t = b2 v + (1 - b2) g_t^2
                bias_correction1 = 1 - beta1 ** t                           # m_hat = m_t / bc1
                bias_correction2 = 1 - beta2 ** t                           # v_hat = v_t / bc2
                denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # sqrt(v_hat) + eps
                p.addcdiv_(m, denom, value=-lr / bias_correction1)          # theta -= lr m_hat / denom
        return loss


class AdaMax(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        _check(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaMax does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["u"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, u = state["step"], state["m"], state["u"]
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)          # g_t + wd * theta
                m.lerp_(g, 1 - beta1)                                       # m_t = b1 m + (1 - b1) g_t
                torch.maximum(u.mul_(beta2), g.abs().add_(eps), out=u)      # u_t = max(b2 u, |g_t| + eps)
                p.addcdiv_(m, u, value=-lr / (1 - beta1 ** t))              # theta -= lr/(1 - b1^t) m_t / u_t
        return loss
