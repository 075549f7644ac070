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
