"""A convolutional network in NumPy alone: every layer's forward and backward side by side.

No torch anywhere in this module (tests/test_numpy_cnn.py checks that importing it loads no torch).
Each layer caches what its backward needs during forward; `backward(dy)` takes dL/d(output), stores
dL/d(parameter) in each `Param.grad` and returns dL/d(input). Arrays are NCHW like torch, and every
layer keeps the dtype it was built with (float32 for training, float64 for the gradient checks in
training/scratch/gradcheck.py, which compare every layer with torch autograd).

Layers:      Linear, Conv2d (stride, padding; im2col by stride tricks, one matrix product), ReLU,
             Sigmoid, MaxPool2d, Flatten, Reshape
Loss:        SoftmaxCrossEntropy (log-sum-exp forward, (softmax - onehot) / N backward, in one)
Optimizers:  SGD (momentum, Nesterov, L2), Adam (bias-corrected), both with torch's update rules
Model:       NumpyCNN = conv3x3-relu-pool2, conv3x3-relu-pool2, flatten, linear-relu, linear
             predict(uint8 (N, 28, 28)) -> (N, 10) logits; save(path) .npz; load(path)
Training:    train(model, images, labels, ...) with a tqdm bar; batches holding NaN/inf raise
             NonFiniteError instead of being trained on; so does a non-finite loss or gradient.
Data:        read_idx / load_mnist: MNIST's IDX files read with NumPy (no torchvision).
Threads:     blas_threads / set_blas_threads: NumPy's OpenBLAS thread count (its only parallelism).

Bad input to a layer or to predict (wrong rank, channel count, size or dtype) raises ValueError naming
what was expected.
"""
from __future__ import annotations

import ctypes
import json
import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FLOATS = (np.float32, np.float64)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the normalisation predict() applies to uint8 pixels


class NonFiniteError(ValueError):
    """A batch, loss or gradient held NaN or inf: training stops rather than learn from it."""


# ----------------------------------------------------------------------------------------------- checks

def _check_array(x, name: str, ndim: int, dtype, expect: str) -> np.ndarray:
    """x must be an ndarray of rank `ndim` and dtype `dtype`; `expect` describes the shape wanted."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array of shape {expect} and dtype {np.dtype(dtype).name}, "
                         f"got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected shape {expect}, got shape {x.shape} ({x.ndim}-d)")
    if x.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {x.dtype} "
                         f"(cast with .astype(np.{np.dtype(dtype).name}))")
    return x


def _check_grad(dy, layer: "Layer") -> np.ndarray:
    if layer._out_shape is None:
        raise RuntimeError(f"{type(layer).__name__}.backward called before forward")
    if not isinstance(dy, np.ndarray) or dy.shape != layer._out_shape or dy.dtype != layer.dtype:
        got = (f"shape {dy.shape} dtype {dy.dtype}" if isinstance(dy, np.ndarray) else type(dy).__name__)
        raise ValueError(f"{type(layer).__name__}.backward: expected dL/dy of shape {layer._out_shape} and "
                         f"dtype {np.dtype(layer.dtype).name} (the forward output), got {got}")
    return dy


def _check_dtype(dtype) -> type:
    dtype = np.dtype(dtype).type
    if dtype not in FLOATS:
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype).name}")
    return dtype


# ----------------------------------------------------------------------------------------------- layers

class Param:
    """A trainable array and the gradient backward() leaves for it (same shape and dtype)."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.grad = np.zeros_like(data)

    def __repr__(self) -> str:
        return f"Param(shape={self.data.shape}, dtype={self.data.dtype})"


class Layer:
    dtype: type = np.float32
    _out_shape: tuple | None = None

    def parameters(self) -> dict[str, Param]:
        return {}

    def astype(self, dtype) -> "Layer":
        self.dtype = _check_dtype(dtype)
        for p in self.parameters().values():
            p.data = p.data.astype(self.dtype)
            p.grad = np.zeros_like(p.data)
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class Linear(Layer):
    """y = x W^T + b for x of shape (N, in_features); W is (out, in) like torch."""

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        rng = rng or np.random.default_rng()
        self.in_features, self.out_features, self.dtype = in_features, out_features, _check_dtype(dtype)
        bound = 1.0 / math.sqrt(in_features)  # torch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        self.weight = Param(rng.uniform(-bound, bound, (out_features, in_features)).astype(self.dtype))
        self.bias = Param(rng.uniform(-bound, bound, out_features).astype(self.dtype))

    def parameters(self) -> dict[str, Param]:
        return {"weight": self.weight, "bias": self.bias}

    def forward(self, x):
        _check_array(x, "Linear", 2, self.dtype, f"(N, {self.in_features})")
        if x.shape[1] != self.in_features:
            raise ValueError(f"Linear: expected shape (N, {self.in_features}), got {x.shape}")
        self._x = x                                            # kept for dL/dW
        y = x @ self.weight.data.T + self.bias.data            # (N, in) @ (in, out) + (out,)
        self._out_shape = y.shape
        return y

    def backward(self, dy):
        _check_grad(dy, self)
        self.weight.grad[...] = dy.T @ self._x                 # dL/dW = dy^T x          (out, in)
        self.bias.grad[...] = dy.sum(axis=0)                   # dL/db = sum over batch  (out,)
        return dy @ self.weight.data                           # dL/dx = dy W            (N, in)


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Conv2d(Layer):
    """2-D cross-correlation like torch.nn.Conv2d (square kernel, stride, zero padding), by im2col.

    forward:  pad x, view every kernel-sized window with stride tricks (no copy), gather the windows
              into a (N*Ho*Wo, C*k*k) matrix (one copy), multiply by the (C*k*k, F) filter matrix.
    backward: dW = cols^T dy and db = sum dy (the same matrix product run backwards); dx: dcols = dy W,
              then col2im scatters each of the k*k kernel offsets back onto the padded input (a loop over
              the k*k offsets, each a whole-array strided add; never a loop over pixels), then unpad.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, rng: np.random.Generator | None = None, dtype=np.float32,
                 input_grad: bool = True):
        if kernel_size < 1 or stride < 1 or padding < 0:
            raise ValueError(f"Conv2d: kernel_size >= 1, stride >= 1, padding >= 0 required, got "
                             f"{kernel_size}, {stride}, {padding}")
        rng = rng or np.random.default_rng()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.k, self.stride, self.padding, self.dtype = kernel_size, stride, padding, _check_dtype(dtype)
        self.input_grad = input_grad   # False for a first layer: backward skips dL/dx and returns None
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)  # torch's default init range
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Param(rng.uniform(-bound, bound, shape).astype(self.dtype))
        self.bias = Param(rng.uniform(-bound, bound, out_channels).astype(self.dtype))

    def parameters(self) -> dict[str, Param]:
        return {"weight": self.weight, "bias": self.bias}

    def forward(self, x):
        _check_array(x, "Conv2d", 4, self.dtype, f"(N, {self.in_channels}, H, W)")
        n, c, h, w = x.shape
        k, s, p = self.k, self.stride, self.padding
        if c != self.in_channels:
            raise ValueError(f"Conv2d: expected shape (N, {self.in_channels}, H, W), got {x.shape}")
        if h + 2 * p < k or w + 2 * p < k:
            raise ValueError(f"Conv2d: input {h}x{w} with padding {p} is smaller than the {k}x{k} kernel")
        ho, wo = _out_size(h, k, s, p), _out_size(w, k, s, p)
        # 1. zero-pad H and W
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        # 2. every k x k window as a view: (N, C, H', W', k, k), then keep every stride-th window
        win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        # 3. im2col: rows = output pixels (n, i, j), columns = (c, ki, kj), matching W's layout
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
        # 4. one matrix product with the filters, bias added per output channel
        y = cols @ self.weight.data.reshape(self.out_channels, -1).T + self.bias.data
        self._cols, self._xshape = cols, x.shape
        # (N*Ho*Wo, F) -> (N, F, Ho, Wo): a view; memory stays channels-last, which the next
        # element-wise layers keep, and which backward's reshape then reads without a copy
        y = y.reshape(n, ho, wo, self.out_channels).transpose(0, 3, 1, 2)
        self._out_shape = y.shape
        return y

    def backward(self, dy):
        _check_grad(dy, self)
        n, c, h, w = self._xshape
        k, s, p = self.k, self.stride, self.padding
        ho, wo = dy.shape[2:]
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)       # (N*Ho*Wo, F)
        # parameter gradients: the forward product y = cols W^T + b, differentiated
        self.weight.grad[...] = (dy2.T @ self._cols).reshape(self.weight.data.shape)
        self.bias.grad[...] = dy2.sum(axis=0)
        if not self.input_grad:
            return None
        # input gradient: dcols = dy W, then col2im (each window's gradient added back where it came from)
        dcols = (dy2 @ self.weight.data.reshape(self.out_channels, -1)).reshape(n, ho, wo, c, k, k)
        dxp = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=self.dtype)
        for i in range(k):
            for j in range(k):
                dxp[:, :, i:i + s * ho:s, j:j + s * wo:s] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, p:p + h, p:p + w] if p else dxp


class ReLU(Layer):
    """y = max(x, 0); dL/dx = dL/dy where x > 0, else 0 (the subgradient 0 at x = 0, as torch)."""

    def __init__(self, dtype=np.float32):
        self.dtype = _check_dtype(dtype)

    def forward(self, x):
        if not isinstance(x, np.ndarray) or x.dtype != self.dtype:
            _check_array(x, "ReLU", getattr(x, "ndim", 0), self.dtype, "(any)")
        y = np.maximum(x, self.dtype(0))
        self._y = y                               # y > 0 exactly where x > 0
        self._out_shape = y.shape
        return y

    def backward(self, dy):
        _check_grad(dy, self)
        return dy * (self._y > 0)


class Sigmoid(Layer):
    """y = 1 / (1 + e^-x), computed without overflow; dL/dx = dL/dy * y (1 - y)."""

    def __init__(self, dtype=np.float32):
        self.dtype = _check_dtype(dtype)

    def forward(self, x):
        if not isinstance(x, np.ndarray) or x.dtype != self.dtype:
            _check_array(x, "Sigmoid", getattr(x, "ndim", 0), self.dtype, "(any)")
        e = np.exp(-np.abs(x))                    # in (0, 1]: never overflows
        y = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        self._y = y
        self._out_shape = y.shape
        return y

    def backward(self, dy):
        _check_grad(dy, self)
        return dy * self._y * (1 - self._y)


class MaxPool2d(Layer):
    """Max over k x k windows every `stride` pixels (default stride = k; floor mode, no padding).

    forward:  the windows by stride tricks; a running np.maximum over the k*k window offsets (each a
              whole-array strided view: a loop over offsets, never over pixels).
    backward: dL/dy goes to the one input per window that was the maximum: the first offset, in
              row-major window order, whose value equals the max (torch's tie rule), scattered back with
              the same offset loop; inputs in no window (floor mode) get 0.
    """

    def __init__(self, kernel_size: int = 2, stride: int | None = None, dtype=np.float32):
        self.k, self.stride, self.dtype = kernel_size, stride or kernel_size, _check_dtype(dtype)

    def _offsets(self, x, ho, wo):
        """(i, j, view): the input value at window offset (i, j) of every window, shape (N, C, Ho, Wo)."""
        k, s = self.k, self.stride
        for i in range(k):
            for j in range(k):
                yield i, j, x[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]

    def forward(self, x):
        _check_array(x, "MaxPool2d", 4, self.dtype, "(N, C, H, W)")
        n, c, h, w = x.shape
        k, s = self.k, self.stride
        if h < k or w < k:
            raise ValueError(f"MaxPool2d: input {h}x{w} is smaller than the {k}x{k} window")
        ho, wo = _out_size(h, k, s, 0), _out_size(w, k, s, 0)
        y = None
        for _, _, v in self._offsets(x, ho, wo):
            y = v.copy() if y is None else np.maximum(y, v, out=y)
        self._x = x
        self._out_shape = y.shape
        self._y = y
        return y

    def backward(self, dy):
        _check_grad(dy, self)
        ho, wo = dy.shape[2:]
        k, s = self.k, self.stride
        dx = np.zeros_like(self._x)                       # same memory layout as x (channels-last here)
        taken = None                                      # windows whose maximum is already routed
        for n_off, (i, j, v) in enumerate(self._offsets(self._x, ho, wo)):
            first = v == self._y                          # this offset holds a maximum ...
            if taken is not None:
                first &= ~taken                           # ... and no earlier offset did
            if n_off < k * k - 1:
                taken = first if taken is None else taken | first
            dxv = dx[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]
            if s >= k:                                    # windows do not overlap: plain writes
                dxv[...] = dy * first
            else:
                dxv += dy * first
        return dx


class Reshape(Layer):
    """Reshape each sample to `shape` (the batch axis is kept); backward restores the input shape."""

    def __init__(self, shape: Sequence[int], dtype=np.float32):
        self.shape, self.dtype = tuple(shape), _check_dtype(dtype)

    def forward(self, x):
        if not isinstance(x, np.ndarray) or x.dtype != self.dtype or x.ndim < 1:
            _check_array(x, type(self).__name__, max(getattr(x, "ndim", 1), 1), self.dtype, "(N, ...)")
        per_sample = int(np.prod(x.shape[1:]))
        if -1 not in self.shape and per_sample != int(np.prod(self.shape)):
            raise ValueError(f"{type(self).__name__}: cannot reshape {x.shape} to (N, "
                             f"{', '.join(map(str, self.shape))}): {per_sample} values per sample")
        self._xshape = x.shape
        y = x.reshape(x.shape[0], *self.shape)
        self._out_shape = y.shape
        return y

    def backward(self, dy):
        _check_grad(dy, self)
        return dy.reshape(self._xshape)


class Flatten(Reshape):
    """(N, C, H, W) -> (N, C*H*W)."""

    def __init__(self, dtype=np.float32):
        super().__init__((-1,), dtype)


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels, forward and backward in one.

    forward:  z = logits - max(logits) (no overflow), log softmax = z - log(sum(exp(z))),
              loss = -mean(log softmax[label])
    backward: dL/dlogits = (softmax - onehot(label)) / N
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.dtype not in FLOATS:
            got = f"{logits.shape} {logits.dtype}" if isinstance(logits, np.ndarray) else type(logits).__name__
            raise ValueError(f"SoftmaxCrossEntropy: expected float logits of shape (N, classes), got {got}")
        n, k = logits.shape
        if (not isinstance(labels, np.ndarray) or labels.shape != (n,)
                or not np.issubdtype(labels.dtype, np.integer)):
            got = f"{labels.shape} {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
            raise ValueError(f"SoftmaxCrossEntropy: expected integer labels of shape ({n},), got {got}")
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"SoftmaxCrossEntropy: labels must lie in [0, {k}), got {labels.min()}..{labels.max()}")
        z = logits - logits.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(z).sum(axis=1, keepdims=True))
        log_p = z - log_sum                                   # log softmax, stable
        self._p, self._labels = np.exp(log_p), labels
        return float(-log_p[np.arange(n), labels].mean())

    def backward(self) -> np.ndarray:
        n = len(self._labels)
        d = self._p.copy()
        d[np.arange(n), self._labels] -= 1                    # softmax - onehot
        return d / n

    __call__ = forward


# ----------------------------------------------------------------------------------------------- optimizers

class SGD:
    """torch.optim.SGD's rule: g = grad + wd*p; b = mu*b + g (b = g at step 1); p -= lr * (g + mu*b if
    nesterov else b)."""

    def __init__(self, params: Iterable[Param], lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self._buf: list[np.ndarray | None] = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                if self._buf[i] is None:
                    self._buf[i] = g.copy()
                else:
                    self._buf[i] = self.momentum * self._buf[i] + g
                g = g + self.momentum * self._buf[i] if self.nesterov else self._buf[i]
            p.data -= (self.lr * g).astype(p.data.dtype, copy=False)


class Adam:
    """Adam (Kingma & Ba) as torch computes it: g = grad + wd*p; m = b1 m + (1-b1) g;
    v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""

    def __init__(self, params: Iterable[Param], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.weight_decay, self.t = weight_decay, 0
        self._m = [np.zeros_like(p.data) for p in self.params]
        self._v = [np.zeros_like(p.data) for p in self.params]

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t               # bias corrections
        for p, m, v in zip(self.params, self._m, self._v):
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            m *= b1
            m += (1 - b1) * g                                         # first moment
            v *= b2
            v += (1 - b2) * g * g                                     # second moment
            denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
            p.data -= ((self.lr / bc1) * m / denom).astype(p.data.dtype, copy=False)


# ----------------------------------------------------------------------------------------------- model

class Sequential:
    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def named_parameters(self) -> dict[str, Param]:
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers)
                for name, p in layer.parameters().items()}

    def parameters(self) -> list[Param]:
        return list(self.named_parameters().values())


class NumpyCNN(Sequential):
    """conv3x3(1->c1, pad 1)-ReLU-maxpool2, conv3x3(c1->c2, pad 1)-ReLU-maxpool2, flatten,
    linear(c2*7*7 -> hidden)-ReLU, linear(hidden -> 10), for 1x28x28 images (MNIST)."""

    image_size, num_classes = 28, 10

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128, seed: int = 0,
                 dtype=np.float32):
        self.channels, self.hidden, self.seed = tuple(int(c) for c in channels), int(hidden), seed
        self.dtype = _check_dtype(dtype)
        c1, c2 = self.channels
        rng = np.random.default_rng(seed)
        d = self.dtype
        super().__init__([
            Conv2d(1, c1, 3, padding=1, rng=rng, dtype=d, input_grad=False), ReLU(d), MaxPool2d(2, dtype=d),
            Conv2d(c1, c2, 3, padding=1, rng=rng, dtype=d), ReLU(d), MaxPool2d(2, dtype=d),
            Flatten(d),
            Linear(c2 * 7 * 7, hidden, rng=rng, dtype=d), ReLU(d),
            Linear(hidden, self.num_classes, rng=rng, dtype=d),
        ])

    def config(self) -> dict:
        return {"arch": "NumpyCNN", "channels": list(self.channels), "hidden": self.hidden,
                "seed": self.seed, "dtype": np.dtype(self.dtype).name,
                "normalize": [MNIST_MEAN, MNIST_STD]}

    def astype(self, dtype) -> "NumpyCNN":
        self.dtype = _check_dtype(dtype)
        for layer in self.layers:
            layer.astype(self.dtype)
        return self

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> normalised (N, 1, 28, 28) in the model's dtype."""
        s = self.image_size
        if not isinstance(images, np.ndarray):
            raise ValueError(f"expected uint8 images as a numpy array of shape (N, {s}, {s}), "
                             f"got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected dtype uint8 (raw 0-255 pixels) of shape (N, {s}, {s}), got {images.dtype}")
        if images.ndim != 3 or images.shape[1:] != (s, s):
            raise ValueError(f"expected uint8 images of shape (N, {s}, {s}), got shape {images.shape}")
        x = images.astype(self.dtype)[:, None]
        x *= self.dtype(1 / (255 * MNIST_STD))
        x -= self.dtype(MNIST_MEAN / MNIST_STD)
        return x

    def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """uint8 images (N, 28, 28) -> float logits (N, 10)."""
        x = self.preprocess(images)
        if len(x) == 0:
            return np.zeros((0, self.num_classes), dtype=self.dtype)
        return np.concatenate([self.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def save(self, path) -> Path:
        path = Path(path)
        arrays = {name: p.data for name, p in self.named_parameters().items()}
        np.savez(path, __config__=np.array(json.dumps(self.config())), **arrays)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def load(path) -> NumpyCNN:
    """A NumpyCNN from a save()d .npz (no pickle: the config travels as a JSON string)."""
    with np.load(Path(path), allow_pickle=False) as f:
        if "__config__" not in f:
            raise ValueError(f"{path}: not a NumpyCNN file (no __config__ entry)")
        cfg = json.loads(str(f["__config__"]))
        if cfg.get("arch") != "NumpyCNN":
            raise ValueError(f"{path}: architecture {cfg.get('arch')!r}, expected 'NumpyCNN'")
        model = NumpyCNN(tuple(cfg["channels"]), cfg["hidden"], cfg["seed"], np.dtype(cfg["dtype"]).type)
        for name, p in model.named_parameters().items():
            if name not in f:
                raise ValueError(f"{path}: missing parameter {name}")
            arr = f[name]
            if arr.shape != p.data.shape:
                raise ValueError(f"{path}: parameter {name} has shape {arr.shape}, expected {p.data.shape}")
            p.data = arr.astype(model.dtype)
    return model


# ----------------------------------------------------------------------------------------------- training

def _check_finite(name: str, arr: np.ndarray, where: str) -> None:
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)) if arr.ndim > 1 else []
        rows = f" (samples {', '.join(map(str, bad[:8]))}{'...' if len(bad) > 8 else ''} of the batch)" if len(bad) else ""
        raise NonFiniteError(f"{where}: {name} holds NaN or inf{rows}; refusing to train on it")


def train(model: NumpyCNN, images: np.ndarray, labels: np.ndarray, epochs: int = 3, batch_size: int = 64,
          lr: float = 1e-3, optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
          seed: int = 0, progress: bool = True, max_steps: int | None = None) -> dict:
    """Mini-batch training with a fresh shuffle each epoch.

    images: uint8 (N, 28, 28) raw pixels (normalised here), or already-normalised floats
    (N, 1, 28, 28) in the model's dtype. Returns {"step_loss": [...], "epoch_loss": [...],
    "seconds": s, "steps": n, "images_per_s": r}. A batch with NaN/inf, or a non-finite loss or
    gradient, raises NonFiniteError naming the epoch and step.
    """
    if images.dtype == np.uint8:
        x_all = model.preprocess(images)
    else:
        x_all = _check_array(images, "train images", 4, model.dtype, f"(N, 1, {model.image_size}, {model.image_size})")
    labels = np.asarray(labels)
    if labels.shape != (len(x_all),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integers of shape ({len(x_all)},), got {labels.shape} {labels.dtype}")
    if optimizer == "adam":
        opt = Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    loss_fn = SoftmaxCrossEntropy()
    rng = np.random.default_rng(seed)
    n = len(x_all)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    step_loss: list[float] = []
    epoch_loss: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="numpy-cnn", unit="step", leave=False)
    t0 = time.perf_counter()
    seen = 0
    try:
        for epoch in range(epochs):
            order = rng.permutation(n)
            losses = []
            for b in range(steps_per_epoch):
                if len(step_loss) >= total:
                    break
                idx = order[b * batch_size:(b + 1) * batch_size]
                x, y = x_all[idx], labels[idx]
                where = f"epoch {epoch + 1}, step {b + 1}"
                _check_finite("the input batch", x, where)
                loss = loss_fn(model.forward(x), y)
                if not math.isfinite(loss):
                    raise NonFiniteError(f"{where}: the loss is {loss}; training diverged (lower the learning rate)")
                model.backward(loss_fn.backward())
                for name, p in model.named_parameters().items():
                    _check_finite(f"the gradient of {name}", p.grad, where)
                opt.step()
                step_loss.append(loss)
                losses.append(loss)
                seen += len(idx)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
            if losses:
                epoch_loss.append(float(np.mean(losses)))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {"step_loss": step_loss, "epoch_loss": epoch_loss, "seconds": seconds, "steps": len(step_loss),
            "images_per_s": seen / seconds if seconds else float("nan")}


def accuracy(model: NumpyCNN, images: np.ndarray, labels: np.ndarray) -> float:
    return float((model.predict(images).argmax(axis=1) == labels).mean())


# ----------------------------------------------------------------------------------------------- threads

def _openblas(suffix: str):
    """OpenBLAS's `openblas_<suffix>` function in the library NumPy loaded (None when not found)."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
        for lib in libs:
            handle = ctypes.CDLL(lib)
            for name in (f"scipy_openblas_{suffix}64_", f"openblas_{suffix}64_", f"openblas_{suffix}"):
                if hasattr(handle, name):
                    return getattr(handle, name)
    except OSError:
        pass
    return None


def blas_threads() -> int | None:
    """The thread count of the OpenBLAS NumPy uses (None when it cannot be asked)."""
    fn = _openblas("get_num_threads")
    return int(fn()) if fn else None


def set_blas_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count; False when this NumPy's BLAS cannot be told."""
    fn = _openblas("set_num_threads")
    if fn is None:
        return False
    fn(ctypes.c_int(n))
    return True


# ----------------------------------------------------------------------------------------------- data

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST's format): magic 0x0000 TT DD (type, number of dims), DD big-endian int32
    sizes, then the values in C order. Gzipped files (.gz) are read too."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        import gzip
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for shape {dims} of {dtype}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def mnist_dir(root) -> Path:
    """The folder holding MNIST's IDX files: `root` itself, root/raw, or root/MNIST/raw."""
    root = Path(root)
    for cand in (root, root / "raw", root / "MNIST" / "raw"):
        if (cand / "t10k-labels-idx1-ubyte").exists() or (cand / "t10k-labels-idx1-ubyte.gz").exists():
            return cand
    raise FileNotFoundError(f"no MNIST IDX files under {root} (looked in ., raw/ and MNIST/raw/ for "
                            "t10k-labels-idx1-ubyte); pass the data root that holds MNIST/raw/")


def load_mnist(root, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' (60,000) or 'test' (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = mnist_dir(root)

    def find(name):
        p = d / name
        return p if p.exists() else d / (name + ".gz")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(f"{d}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels
