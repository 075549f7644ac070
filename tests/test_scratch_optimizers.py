"""Hand-written Adam and AdaMax (training/scratch/optimizers.py) against torch.optim, step for step."""
import pytest
import torch
import torch.nn.functional as F

from models import create_model
from training.scratch.optimizers import AdaMax, Adam

STEPS = 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(make_optimizer, steps=STEPS, seed=0):
    """A small simple_cnn from the registry on fake data; the same weights and batches every call."""
    net = create_model("simple_cnn", num_classes=10, in_channels=1, image_size=16, width=4, hidden=16, seed=seed)
    opt = make_optimizer(net.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def max_param_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("mine,theirs,kw", [
    (Adam, torch.optim.Adam, dict(lr=1e-3)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    (AdaMax, torch.optim.Adamax, dict(lr=2e-3)),
    (AdaMax, torch.optim.Adamax, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
], ids=["adam", "adam-wd", "adamax", "adamax-wd"])
def test_matches_torch_after_100_steps(mine, theirs, kw):
    a = train(lambda p: mine(p, **kw))
    b = train(lambda p: theirs(p, foreach=False, **kw))
    start = create_model("simple_cnn", num_classes=10, in_channels=1, image_size=16, width=4, hidden=16, seed=0)
    assert max_param_diff(a, start) > 1e-3  # the weights did move
    assert max_param_diff(a, b) <= 1e-6


def test_state_and_param_groups_behave_like_torch():
    w = torch.nn.Parameter(torch.ones(3))
    opt = Adam([{"params": [w], "lr": 0.1}], betas=(0.5, 0.5))
    w.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    # step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps): -0.1, +0.1, 0
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, 1.1, 1.0]))
    assert opt.state[w]["step"] == 1
    opt.load_state_dict(opt.state_dict())  # the Optimizer machinery works
    with pytest.raises(ValueError, match="betas"):
        AdaMax([w], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="learning rate"):
        Adam([w], lr=-1)


def test_adamax_first_step_is_lr_times_sign():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = AdaMax([w], lr=0.5, eps=0.0)
    w.grad = torch.tensor([3.0, -0.25])
    opt.step()
    # m_1 = (1 - b1) g, u_1 = |g|, bias correction 1 - b1: theta = -lr * sign(g)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, 0.5]))
