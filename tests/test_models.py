import pytest
import torch

from models import TTA, count_parameters, create_model, list_models, model_defaults
from models.registry import UnknownModelError


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_every_model_builds_and_forwards(name, channels, size):
    net = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert count_parameters(net) > 0


def test_list_models_has_the_spine_models():
    assert {"mlp", "simple_cnn", "airbench"} <= set(list_models())


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as e:
        create_model("resnet9000")
    assert "valid models" in str(e.value) and "airbench" in str(e.value)


def test_unknown_kwarg_is_refused():
    with pytest.raises(TypeError, match="takes no argument"):
        create_model("mlp", n_layers=3)


@pytest.mark.parametrize("n_layers,kernel", [(1, 3), (3, 5), (5, 7)])
def test_simple_cnn_knobs(n_layers, kernel):
    net = create_model("simple_cnn", n_layers=n_layers, kernel_size=kernel, dropout=0.3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == n_layers and all(c.kernel_size == (kernel, kernel) for c in convs)
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules())


def test_simple_cnn_refuses_out_of_range_knobs():
    with pytest.raises(ValueError, match="n_layers"):
        create_model("simple_cnn", n_layers=6)
    with pytest.raises(ValueError, match="kernel_size"):
        create_model("simple_cnn", kernel_size=9)


def test_model_defaults_reports_kwargs():
    assert model_defaults("simple_cnn")["kernel_size"] == 3


def test_airbench_whitening_whitens_patches():
    torch.manual_seed(0)
    net = create_model("airbench")
    images = torch.randn(64, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    net.fit_whitening(images)
    out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])  # the positive half
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


@pytest.mark.parametrize("level", [1, 2])
def test_tta_averages_views_and_keeps_shape(level):
    net = create_model("airbench", widths=(8, 16, 16)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = TTA(net, level)(x)
        if level == 1:
            expected = 0.5 * (net(x) + net(x.flip(-1)))
            assert torch.allclose(out, expected, atol=1e-6)
    assert out.shape == (3, 10)


def test_tta_level2_matches_the_view_by_view_definition():
    torch.manual_seed(0)
    net = create_model("airbench", widths=(8, 16, 16)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        mirror = lambda v: 0.5 * (net(v) + net(v.flip(-1)))  # noqa: E731
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        expected = 0.5 * mirror(x) + 0.25 * (mirror(padded[..., :32, :32]) + mirror(padded[..., 2:, 2:]))
        assert torch.allclose(TTA(net, 2)(x), expected, atol=1e-5)
