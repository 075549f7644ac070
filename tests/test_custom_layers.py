"""Hand-written-backward layers (models/custom_layers.py) and the custom_cnn model built from them."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from models.custom_layers import (SoftPool2d, SoftPoolFunction, SqueezeExcite, SqueezeExciteFunction, Swish,
                                  SwishFunction, WSConv2d, WSConv2dFunction, set_custom_mode)
from training.export import export_verified

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=f64)).requires_grad_()


# ------------------------------------------------------------------------------ gradcheck of each Function

@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, True), (2, 1, False)])
def test_ws_conv_gradcheck(stride, padding, bias):
    x, w = rand(2, 3, 7, 7), rand(4, 3, 3, 3, seed=1)
    gain = (torch.rand(4, dtype=f64) + 0.5).requires_grad_()
    b = rand(4, seed=2) if bias else None
    assert torch.autograd.gradcheck(WSConv2dFunction.apply, (x, w, gain, b, stride, padding, 1e-5))


def test_squeeze_excite_gradcheck():
    args = (rand(2, 6, 5, 4), rand(3, 6, seed=1), rand(3, seed=2), rand(6, 3, seed=3), rand(6, seed=4))
    assert torch.autograd.gradcheck(SqueezeExciteFunction.apply, args)


def test_swish_gradcheck():
    assert torch.autograd.gradcheck(SwishFunction.apply, (rand(3, 4, 5, scale=4),))


@pytest.mark.parametrize("k,size", [(2, 6), (2, 7), (3, 7)])
def test_soft_pool_gradcheck(k, size):
    assert torch.autograd.gradcheck(SoftPoolFunction.apply, (rand(2, 3, size, size, scale=3), k))


# ------------------------------------------------------------------------------ modules vs torch.nn compositions

def grads(module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_same(a, b, tol=1e-10):
    (ya, gxa, gpa), (yb, gxb, gpb) = a, b
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    torch.testing.assert_close(gxa, gxb, rtol=tol, atol=tol)
    assert gpa.keys() == gpb.keys()
    for n in gpa:
        torch.testing.assert_close(gpa[n], gpb[n], rtol=tol, atol=tol, msg=n)


class StandardisedConv(nn.Conv2d):
    """torch.nn.Conv2d whose weight passes through the same scaled standardisation (autograd does the rest)."""

    def __init__(self, cin, cout, k, stride, padding):
        super().__init__(cin, cout, k, stride=stride, padding=padding)
        self.gain = nn.Parameter(torch.ones(cout))

    def forward(self, x):
        w = self.weight.flatten(1)
        w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + 1e-5)
        w = self.gain[:, None] * w / w.shape[1] ** 0.5
        return self._conv_forward(x, w.view_as(self.weight), self.bias)


def test_ws_conv_matches_nn_conv_with_standardised_weight():
    torch.manual_seed(0)
    mine = WSConv2d(3, 5, 3, stride=2, padding=1).to(f64).set_mode("function")
    ref = StandardisedConv(3, 5, 3, 2, 1).to(f64)
    with torch.no_grad():
        mine.gain.uniform_(0.5, 1.5)
        mine.bias.normal_()
        ref.weight.copy_(mine.weight), ref.gain.copy_(mine.gain), ref.bias.copy_(mine.bias)
    x, gy = rand(2, 3, 9, 9), rand(2, 5, 5, 5, seed=1)
    assert_same(grads(mine, x, gy), grads(ref, x, gy))


def test_squeeze_excite_matches_nn_modules():
    torch.manual_seed(0)
    mine = SqueezeExcite(8, reduction=4).to(f64).set_mode("function")
    pool, fc1, fc2 = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2).to(f64), nn.Linear(2, 8).to(f64)
    fc1.load_state_dict(mine.fc1.state_dict()), fc2.load_state_dict(mine.fc2.state_dict())

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = fc1, fc2
            self.gate = nn.Sequential(pool, nn.Flatten(), fc1, nn.ReLU(), fc2, nn.Sigmoid())

        def forward(self, x):
            return x * self.gate(x)[:, :, None, None]

    x, gy = rand(3, 8, 5, 6), rand(3, 8, 5, 6, seed=1)
    assert_same(grads(mine, x, gy), grads(Ref(), x, gy))


def test_swish_matches_nn_silu():
    x, gy = rand(4, 3, 5, 5, scale=5), rand(4, 3, 5, 5, seed=1)
    assert_same(grads(Swish().set_mode("function"), x, gy), grads(nn.SiLU(), x, gy))


def test_soft_pool_matches_its_definition_and_survives_large_inputs():
    """SoftPool against the definition written with unfold: sum(softmax(window) * window)."""
    x, gy = rand(2, 3, 8, 8, scale=3), rand(2, 3, 4, 4, seed=1)

    class Definition(nn.Module):
        def forward(self, x):
            win = F.unfold(x, 2, stride=2).view(x.shape[0], x.shape[1], 4, -1)
            return (torch.softmax(win, dim=2) * win).sum(2).view(x.shape[0], x.shape[1], 4, 4)

    assert_same(grads(SoftPool2d(2).set_mode("function"), x, gy), grads(Definition(), x, gy))
    big = torch.full((1, 1, 2, 2), 1000.0, dtype=f64)
    big[0, 0, 0, 0] = 999.0
    for mode in ("function", "composition"):
        y = SoftPool2d(2).set_mode(mode)(big)
        assert torch.isfinite(y).all() and 999.0 < y.item() < 1000.0


@pytest.mark.parametrize("module", [
    lambda: WSConv2d(3, 4, 3, padding=1), lambda: SqueezeExcite(3, 2), lambda: Swish(), lambda: SoftPool2d(2)])
def test_function_and_composition_paths_agree(module):
    torch.manual_seed(0)
    m = module().to(f64)
    x, gy = rand(2, 3, 6, 6), None
    y = m(x)
    gy = rand(*y.shape, seed=1)
    assert_same(grads(m.set_mode("function"), x, gy), grads(m.set_mode("composition"), x, gy))


def test_auto_mode_uses_the_function_only_to_train():
    m = Swish()
    x = torch.randn(2, 3, requires_grad=True)
    assert m.train()(x).grad_fn.name().startswith("SwishFunction")
    assert not m.eval()(x).grad_fn.name().startswith("SwishFunction")
    with torch.no_grad():
        assert m.train()(x).grad_fn is None
    with pytest.raises(ValueError, match="mode must be one of"):
        m.set_mode("fast")


# ------------------------------------------------------------------------------ the registry model

@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_custom_cnn_uses_all_four_and_trains(channels, size):
    net = create_model("custom_cnn", num_classes=10, in_channels=channels, image_size=size, width=4, seed=0)
    kinds = {type(m) for m in net.modules()}
    assert {WSConv2d, SqueezeExcite, Swish, SoftPool2d} <= kinds
    assert net.get_classifier() is net.head
    x, y = torch.randn(4, channels, size, size), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(net.train()(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # the training graph runs through the hand-written Functions
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    assert {"WSConv2dFunctionBackward", "SqueezeExciteFunctionBackward", "SwishFunctionBackward",
            "SoftPoolFunctionBackward"} <= names


def test_custom_cnn_starts_with_a_signal_that_reaches_the_head():
    # no normalisation layer: at a default start Swish, the SE gate and SoftPool shrink the signal to std
    # 0.0025 before the head and SGD hardly moves the loss (15% on CIFAR-10); the LSUV-style gains keep
    # every WSConv's output at unit std on Gaussian images, so the pooled features stay near 0.1
    net = create_model("custom_cnn", seed=0).train()
    h = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        for layer in net.features:
            h = layer(h)
            if isinstance(layer, WSConv2d):
                assert 0.8 < h.std().item() < 1.25, (layer, h.std().item())
    assert h.std().item() > 0.05
    # the gains come from the model's seed
    a, b = create_model("custom_cnn", seed=0), create_model("custom_cnn", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_custom_cnn_paths_agree_on_the_whole_model():
    net = create_model("custom_cnn", in_channels=1, image_size=28, width=4, seed=1).double()
    x, y = torch.randn(3, 1, 28, 28, dtype=f64), torch.tensor([1, 2, 3])
    out = {}
    for mode in ("function", "composition"):
        set_custom_mode(net, mode).zero_grad(set_to_none=True)
        logits = net.train()(x)
        F.cross_entropy(logits, y).backward()
        out[mode] = (logits.detach(), [p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(out["function"][0], out["composition"][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(out["function"][1], out["composition"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_custom_cnn_exports_and_passes_the_parity_gate(tmp_path):
    net = create_model("custom_cnn", num_classes=10, in_channels=3, image_size=32, width=4, seed=0)
    with torch.no_grad():  # weights away from their initial values
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    out = export_verified(net, 0, batch, tmp_path)
    for par in out["parity"].values():
        assert par["ok"] and par["max_abs_diff"] <= 1e-3 and par["top1_agreement"] == 1.0
    model = onnx.load(str(tmp_path / "model.sim.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Sigmoid", "Exp", "AveragePool", "ReduceMax", "ReduceMean"} <= ops
    # onnxsim folded the weight standardisation: every Conv reads a constant weight
    inits = {i.name for i in model.graph.initializer}
    assert all(n.input[1] in inits for n in model.graph.node if n.op_type == "Conv")


def test_custom_cnn_trains_under_bf16_autocast():
    """The hand-written backward passes run in float32 under autocast (run_function), so a training step in
    bf16 autocast works and gives finite gradients for every parameter."""
    from models import create_model

    net = create_model("custom_cnn", num_classes=10, width=8, seed=0).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
