"""Pruning to a MAC budget (training/compress/prune.py) and the per-conv airbench widths it rebuilds from."""
from __future__ import annotations

import pytest
import torch

from models import create_model


def test_airbench_six_equal_widths_are_the_three_group_widths():
    three = create_model("airbench", seed=0, widths=[16, 32, 32]).eval()
    six = create_model("airbench", seed=0, widths=[16, 16, 32, 32, 32, 32]).eval()
    a, b = three.state_dict(), six.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert three.logit_scale == six.logit_scale == 1 / 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(three(x), six(x))


def test_airbench_per_conv_widths_and_logit_scale():
    net = create_model("airbench", widths=[8, 16, 24, 16, 8, 24], logit_scale=0.25).eval()
    convs = [(g.conv1, g.conv2) for g in net.features[1:4]]
    assert [c.out_channels for pair in convs for c in pair] == [8, 16, 24, 16, 8, 24]
    assert [g.norm1.num_features for g in net.features[1:4]] == [8, 24, 8]
    assert net.head.in_features == 24 and net.logit_scale == 0.25
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="3 widths .* or 6"):
        create_model("airbench", widths=[8, 16])


# ---------------------------------------------------------------- pruning to a MAC budget

SHAPE = (3, 32, 32)
CONVS = [f"features.{g}.conv{c}" for g in (1, 2, 3) for c in (1, 2)]


def small_airbench() -> torch.nn.Module:
    return create_model("airbench", seed=0, widths=[16, 32, 32])


def randomized(net: torch.nn.Module) -> torch.nn.Module:
    """Every weight and BatchNorm statistic distinct (a fresh net's Dirac filters and BN stats repeat), so
    that a kept channel can be told from the others by its values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and not name.endswith("norm1.weight") and not name.endswith("norm2.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return net


def copy_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_prune_to_half_the_macs_rebuilds_from_kwargs():
    from training.compress.prune import macs, prune_to_macs

    net = small_airbench().train()
    original = copy_of(net)
    before = macs(net, SHAPE)
    logs: list[str] = []
    pruned = prune_to_macs(net, SHAPE, before // 2, log=logs.append)

    assert pruned.architecture == "airbench" and pruned.importance == "magnitude"
    assert pruned.macs_before == before and 0 < pruned.macs_after <= before // 2
    assert pruned.macs_after == macs(pruned.net, SHAPE) and not pruned.net.training
    assert set(pruned.channels) == set(CONVS)
    widths = pruned.kwargs["widths"]
    assert [pruned.channels[c][1] for c in CONVS] == widths
    assert all(w % 8 == 0 and w >= 8 for w in widths) and sum(widths) < 16 * 2 + 32 * 4
    assert pruned.kwargs["logit_scale"] == 1 / 32 and pruned.kwargs["num_classes"] == 10
    assert len(logs) == 1 and f"{before:,}" in logs[0]

    rebuilt = create_model("airbench", **pruned.kwargs).eval()
    rebuilt.load_state_dict(pruned.net.state_dict(), strict=True)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), pruned.net(x), rtol=1e-5, atol=1e-6)

    # the head's outputs and the whitening stay; the frozen BN scale stays frozen
    assert pruned.net.head.out_features == 10
    assert torch.equal(pruned.net.whiten.weight, original["whiten.weight"])
    assert not pruned.net.whiten.weight.requires_grad
    assert not any(m.weight.requires_grad for m in pruned.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the caller's net is as it was
    assert net.training and all(torch.equal(v, original[k]) for k, v in net.state_dict().items())


def test_pruned_net_is_a_sub_network_of_the_original():
    """Every kept channel keeps its conv filter (restricted to the kept inputs), its BatchNorm bias and
    running statistics, and its column of the head: BN is pruned with the conv before it."""
    from training.compress.prune import macs, prune_to_macs

    net = randomized(small_airbench()).eval()
    result = prune_to_macs(net, SHAPE, macs(net, SHAPE) * 6 // 10, log=lambda _: None)
    pruned = result.net
    assert any(after < before for before, after in result.channels.values())

    def kept(rows: torch.Tensor, new_rows: torch.Tensor) -> list[int]:
        return [next(i for i, r in enumerate(rows) if torch.equal(r, new)) for new in new_rows]

    inputs = list(range(net.whiten.out_channels))
    for old_group, new_group in zip(net.features[1:4], pruned.features[1:4]):
        for conv, norm in (("conv1", "norm1"), ("conv2", "norm2")):
            old_conv, new_conv = getattr(old_group, conv), getattr(new_group, conv)
            outputs = kept(old_conv.weight[:, inputs], new_conv.weight)
            old_norm, new_norm = getattr(old_group, norm), getattr(new_group, norm)
            for t in ("bias", "running_mean", "running_var"):
                assert torch.equal(getattr(new_norm, t), getattr(old_norm, t)[outputs]), (conv, t)
            inputs = outputs
    assert torch.equal(pruned.head.weight, net.head.weight[:, inputs])


def test_macs_is_half_of_count_flops():
    from training.compress.prune import macs
    from training.pipeline import count_flops

    for net in (small_airbench(), create_model("airbench", widths=[8, 16, 24, 16, 8, 24])):
        assert macs(net, SHAPE) == count_flops(net, SHAPE) // 2 > 0


def test_a_budget_below_min_channels_is_refused_naming_the_layer():
    from training.compress.prune import PruneError, prune_to_macs

    net = small_airbench()
    original = copy_of(net)
    with pytest.raises(PruneError, match=r"would leave features\.\d\.conv\d with 0 channels \(min_channels 8\)"):
        prune_to_macs(net, SHAPE, 1, log=lambda _: None)
    with pytest.raises(PruneError, match=r"with 12 channels \(min_channels 16\)"):
        prune_to_macs(net, SHAPE, 1, round_to=4, min_channels=16, log=lambda _: None)
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())


def test_a_budget_out_of_range_is_refused():
    from training.compress.prune import PruneError, macs, prune_to_macs

    net = small_airbench()
    for target in (0, -5):
        with pytest.raises(PruneError, match="must be positive"):
            prune_to_macs(net, SHAPE, target)
    for target in (macs(net, SHAPE), 10**12):
        with pytest.raises(PruneError, match="nothing to prune: airbench already takes"):
            prune_to_macs(net, SHAPE, target)


def test_a_model_that_cannot_be_rebuilt_is_refused():
    from training.compress.prune import PruneError, prune_to_macs

    with pytest.raises(PruneError, match="only airbench can be rebuilt"):
        prune_to_macs(create_model("simple_cnn"), SHAPE, 1000)


def test_pruned_net_exports_to_onnx_with_parity(tmp_path):
    import numpy as np

    from training.compress.prune import macs, prune_to_macs
    from training.export import export_verified

    net = randomized(small_airbench())
    pruned = prune_to_macs(net, SHAPE, macs(net, SHAPE) // 2, log=lambda _: None)
    batch = np.random.default_rng(0).standard_normal((8, *SHAPE)).astype(np.float32)
    out = export_verified(pruned.net, 0, batch, tmp_path)
    assert all(p["max_abs_diff"] < 1e-3 for p in out["parity"].values()), out["parity"]
