"""Every NumPy layer against torch autograd, in float64: forward outputs and every backward gradient.

For each case the NumPy layer and its torch counterpart get the same random input and weights; the
outputs are compared, then both are backpropagated from the same random dL/dy and the gradients
with respect to the input and each parameter are compared. The error is the norm-wise relative error
||a - b|| / max(||a||, ||b||) (0 when both are 0).

    rows = check_layers()          # list of {"layer", "forward", "backward": {"input": e, "weight": e, ...}}
    print(format_table(rows))      # a markdown table for a report
    worst(rows)                    # the largest error anywhere

`python -m training.scratch.gradcheck` prints the table.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.scratch import numpy_cnn as N

TOLERANCE = 1e-6


def rel_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def _t(a: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=grad)


def _compare(name: str, layer: N.Layer, torch_fn, x: np.ndarray, rng: np.random.Generator) -> dict:
    """Run the NumPy layer and torch_fn(x_t, **params_t) forward and backward on the same data."""
    params = layer.parameters()
    x_t = _t(x)
    p_t = {k: _t(p.data) for k, p in params.items()}
    y_np = layer.forward(x)
    y_t = torch_fn(x_t, **p_t)
    dy = rng.normal(size=y_np.shape)
    dx_np = layer.backward(dy)
    y_t.backward(torch.from_numpy(dy))
    back = {"input": rel_error(dx_np, x_t.grad.numpy())}
    for k, p in params.items():
        back[k] = rel_error(p.grad, p_t[k].grad.numpy())
    return {"layer": name, "forward": rel_error(y_np, y_t.detach().numpy()), "backward": back}


def check_layers(seed: int = 0) -> list[dict]:
    """Forward and backward relative errors of every NumPy layer (and the loss and model) vs torch."""
    rng = np.random.default_rng(seed)
    f64 = np.float64
    rows = []

    lin = N.Linear(7, 5, rng=rng, dtype=f64)
    rows.append(_compare("Linear(7->5)", lin, lambda x, weight, bias: F.linear(x, weight, bias),
                         rng.normal(size=(4, 7)), rng))

    for (cin, cout, k, s, p, hw) in [(3, 4, 3, 1, 1, 8), (3, 4, 3, 2, 1, 9), (2, 3, 5, 2, 0, 11), (3, 2, 1, 1, 0, 5)]:
        conv = N.Conv2d(cin, cout, k, stride=s, padding=p, rng=rng, dtype=f64)
        rows.append(_compare(
            f"Conv2d({cin}->{cout}, k{k}, s{s}, p{p}) on {hw}x{hw}", conv,
            lambda x, weight, bias, s=s, p=p: F.conv2d(x, weight, bias, stride=s, padding=p),
            rng.normal(size=(2, cin, hw, hw)), rng))

    rows.append(_compare("ReLU", N.ReLU(f64), torch.relu, rng.normal(size=(2, 3, 5, 5)), rng))
    rows.append(_compare("Sigmoid (inputs ~ N(0, 15^2))", N.Sigmoid(f64), torch.sigmoid,
                         rng.normal(scale=15, size=(2, 3, 5, 5)), rng))
    for k, s, hw in [(2, None, 8), (2, None, 7), (3, 2, 9)]:
        rows.append(_compare(
            f"MaxPool2d(k{k}, s{s or k}) on {hw}x{hw}", N.MaxPool2d(k, s, dtype=f64),
            lambda x, k=k, s=s: F.max_pool2d(x, k, s), rng.normal(size=(2, 3, hw, hw)), rng))
    rows.append(_compare("Flatten", N.Flatten(f64), lambda x: x.flatten(1), rng.normal(size=(2, 3, 4, 4)), rng))
    rows.append(_compare("Reshape(3, 16)", N.Reshape((3, 16), f64), lambda x: x.reshape(len(x), 3, 16),
                         rng.normal(size=(2, 3, 4, 4)), rng))

    # the loss: rows offset by +-1000, where a naive exp() would overflow or underflow
    logits = rng.normal(scale=3, size=(6, 10)) + np.array([1000, -1000, 0, 0, 0, 0])[:, None]
    labels = rng.integers(0, 10, size=6)
    ce = N.SoftmaxCrossEntropy()
    loss_np = ce(logits, labels)
    logits_t = _t(logits)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels))
    loss_t.backward()
    rows.append({"layer": "SoftmaxCrossEntropy (rows offset +-1000)", "forward": rel_error(loss_np, loss_t.item()),
                 "backward": {"input": rel_error(ce.backward(), logits_t.grad.numpy())}})

    # the whole model, end to end, against its torch twin
    from training.scratch.torch_twin import TorchTwin

    model = N.NumpyCNN(channels=(4, 8), hidden=16, seed=seed, dtype=f64)
    twin = TorchTwin.from_numpy(model, dtype=torch.float64)
    x = rng.normal(size=(3, 1, 28, 28))
    labels = rng.integers(0, 10, size=3)
    loss_np = ce(model.forward(x), labels)
    model.backward(ce.backward())
    loss_t = F.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(labels))
    loss_t.backward()
    back = {name: rel_error(p.grad, t.grad.numpy())
            for (name, p), t in zip(model.named_parameters().items(), twin.parameters())}
    rows.append({"layer": "NumpyCNN(4, 8, 16) + loss", "forward": rel_error(loss_np, loss_t.item()), "backward": back})
    return rows


def worst(rows: list[dict]) -> float:
    return max(max([r["forward"], *r["backward"].values()]) for r in rows)


def format_table(rows: list[dict]) -> str:
    lines = ["| layer | forward rel. err | backward rel. err |", "|---|---|---|"]
    for r in rows:
        back = ", ".join(f"{k} {v:.1e}" for k, v in r["backward"].items())
        lines.append(f"| {r['layer']} | {r['forward']:.1e} | {back} |")
    return "\n".join(lines)


if __name__ == "__main__":
    table = check_layers()
    print(format_table(table))
    print(f"\nworst relative error {worst(table):.2e} (tolerance {TOLERANCE:g})")
