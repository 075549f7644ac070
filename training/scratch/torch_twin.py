"""The NumPy CNN's architecture in torch, and a timing of both on the same batches.

`TorchTwin.from_numpy(np_model)` copies the NumPy weights, so the two compute the same logits (the
comparison reports their largest difference). `compare_speed` feeds both the identical preprocessed
float32 batches and reports images/s for forward (inference: torch under no_grad) and for
forward+backward (loss and every parameter gradient; no optimizer step in either), plus the ratios
torch/NumPy. Torch runs with all the machine's cores unless told otherwise; NumPy's only
parallelism is its BLAS (OpenBLAS) in the matrix products, whose thread count is reported too.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.scratch import numpy_cnn as N
from training.scratch.numpy_cnn import blas_threads, set_blas_threads


class TorchTwin(nn.Module):
    """conv3x3-ReLU-maxpool2, conv3x3-ReLU-maxpool2, flatten, linear-ReLU, linear: NumpyCNN in torch."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def from_numpy(cls, model: N.NumpyCNN, dtype: torch.dtype = torch.float32) -> "TorchTwin":
        twin = cls(model.channels, model.hidden, model.num_classes).to(dtype)
        np_params = model.parameters()
        torch_params = list(twin.parameters())
        assert len(np_params) == len(torch_params)
        with torch.no_grad():
            for p_np, p_t in zip(np_params, torch_params):
                if p_np.data.shape != tuple(p_t.shape):
                    raise ValueError(f"shape mismatch copying weights: {p_np.data.shape} vs {tuple(p_t.shape)}")
                p_t.copy_(torch.from_numpy(np.ascontiguousarray(p_np.data)))
        return twin


def _rate(fn, batches: list, warmup: int) -> float:
    for b in batches[:warmup]:
        fn(*b)
    t0 = time.perf_counter()
    for b in batches:
        fn(*b)
    seconds = time.perf_counter() - t0
    return sum(len(b[0]) for b in batches) / seconds


def compare_speed(model: N.NumpyCNN, images: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                  n_batches: int = 30, threads: int | None = None, numpy_threads: int | None = None,
                  warmup: int = 3, repeats: int = 3, verbose: bool = True) -> dict:
    """Images/s of NumpyCNN and its TorchTwin on the same `n_batches` batches of `batch_size` images.

    images: uint8 (N, 28, 28), labels: int (N,), N >= batch_size * n_batches. Both models are float32
    with identical weights. `threads`: torch's threads (default: every core); `numpy_threads`:
    OpenBLAS's threads for the timing (default: as they are, which is every core unless
    OPENBLAS_NUM_THREADS says otherwise). Each of the four timings runs `repeats` times, interleaved, and the best
    rate counts (as timeit does: on a shared machine the slower runs measure the neighbours). Returns
    the four rates, the ratios torch/NumPy, the thread counts and the largest logit difference between
    the two on the first batch.
    """
    need = batch_size * n_batches
    if len(images) < need:
        raise ValueError(f"compare_speed needs {need} images ({n_batches} batches of {batch_size}), got {len(images)}")
    if model.dtype != np.float32:
        raise ValueError(f"compare_speed times float32 models; this one is {np.dtype(model.dtype).name}")
    x_np = model.preprocess(images[:need])
    y_np = np.asarray(labels[:need]).astype(np.int64)
    np_batches = [(x_np[i:i + batch_size], y_np[i:i + batch_size]) for i in range(0, need, batch_size)]
    t_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in np_batches]

    old_threads, old_blas = torch.get_num_threads(), blas_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if numpy_threads:
        set_blas_threads(numpy_threads)
    try:
        twin = TorchTwin.from_numpy(model)
        with torch.no_grad():
            max_diff = float((twin(t_batches[0][0]).numpy() - model.forward(np_batches[0][0])).__abs__().max())
        loss_fn = N.SoftmaxCrossEntropy()

        def np_forward(x, y):
            model.forward(x)

        def np_train(x, y):
            loss_fn(model.forward(x), y)
            model.backward(loss_fn.backward())

        def t_forward(x, y):
            with torch.no_grad():
                twin(x)

        def t_train(x, y):
            twin.zero_grad(set_to_none=True)
            F.cross_entropy(twin(x), y).backward()

        runs = {"numpy_forward": (np_forward, np_batches), "torch_forward": (t_forward, t_batches),
                "numpy_forward_backward": (np_train, np_batches), "torch_forward_backward": (t_train, t_batches)}
        rates = {k: 0.0 for k in runs}
        for _ in range(max(1, repeats)):
            for k, (fn, batches) in runs.items():
                rates[k] = max(rates[k], _rate(fn, batches, warmup))
        torch_threads, numpy_blas = torch.get_num_threads(), blas_threads()
    finally:
        torch.set_num_threads(old_threads)
        if numpy_threads and old_blas:
            set_blas_threads(old_blas)
    out = {
        "images_per_s": rates,
        "ratio_torch_over_numpy": {
            "forward": rates["torch_forward"] / rates["numpy_forward"],
            "forward_backward": rates["torch_forward_backward"] / rates["numpy_forward_backward"],
        },
        "threads": {"torch": torch_threads, "numpy_blas": numpy_blas, "cpu_count": os.cpu_count()},
        "batch_size": batch_size, "batches": n_batches, "repeats": repeats, "max_logit_diff": max_diff,
    }
    if verbose:
        print(format_speed(out))
    return out


def format_speed(r: dict) -> str:
    ips, ratio, th = r["images_per_s"], r["ratio_torch_over_numpy"], r["threads"]
    return (f"speed, best of {r.get('repeats', 1)} runs over {r['batches']} batches of {r['batch_size']} "
            f"(float32; torch threads {th['torch']}, "
            f"NumPy OpenBLAS threads {th['numpy_blas']}, {th['cpu_count']} CPUs):\n"
            f"  forward           NumPy {ips['numpy_forward']:8.0f} img/s   torch {ips['torch_forward']:8.0f} img/s"
            f"   torch/NumPy {ratio['forward']:.2f}x\n"
            f"  forward+backward  NumPy {ips['numpy_forward_backward']:8.0f} img/s   torch "
            f"{ips['torch_forward_backward']:8.0f} img/s   torch/NumPy {ratio['forward_backward']:.2f}x\n"
            f"  max |logit diff| NumPy vs torch on batch 1: {r['max_logit_diff']:.2e}")
