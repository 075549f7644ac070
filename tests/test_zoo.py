"""The zoo of issue 10: residual nets, kernel-size and depth variants, block variants, ResNet-50 by hand,
and the receptive-field analysis. Small and CPU-only: ResNet-50 is built and counted, and runs on
one image at most."""
import pytest
import torch
import torch.nn as nn

from models import count_parameters, create_model, describe_model
from models.kernel_cnn import KERNELS, format_kernel_variants, kernel_variants, solve_width
from models.receptive_field import (LayerSpec, analytic_receptive_field, empirical_receptive_field)

# (name, kwargs): every new architecture and variant.
SMALL_ZOO = [
    ("resnet_small", {}),
    ("resnet_small_reg", {}),
    *[("resblock_net", {"block": b}) for b in ("basic", "bottleneck", "wide")],
    *[("kernel_cnn", {"kernel": k}) for k in KERNELS],
    *[("depth_cnn", {"depth": d, "residual": r}) for d in (2, 4, 6, 8) for r in (False, True)],
]
ZOO = SMALL_ZOO + [("resnet50", {}), ("resnet50", {"stem": "imagenet"})]


def _id(case):
    name, kw = case
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items())])


@pytest.mark.parametrize("case", ZOO, ids=_id)
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_zoo_builds_and_forwards(case, channels, size):
    name, kw = case
    net = create_model(name, num_classes=7, in_channels=channels, image_size=size, **kw).eval()
    batch = 1 if name == "resnet50" else 2
    with torch.no_grad():
        out = net(torch.randn(batch, channels, size, size))
    assert out.shape == (batch, 7) and torch.isfinite(out).all()
    assert describe_model(name)


@pytest.mark.parametrize("case", SMALL_ZOO, ids=_id)
def test_seed_decides_the_initial_weights(case):
    name, kw = case
    a, b, c = (create_model(name, seed=s, **kw).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --- residual nets ---------------------------------------------------------------------------

def test_plain_and_regularised_residual_differ_only_in_bn_and_dropout():
    plain, reg = create_model("resnet_small"), create_model("resnet_small_reg")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in reg.modules()) == 19 + 2  # every conv, 2 shortcuts
    assert any(isinstance(m, nn.Dropout) for m in reg.modules())
    convs = lambda n: [m.weight.shape for m in n.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert convs(plain) == convs(reg) and len(convs(plain)) == 19 + 2  # ResNet-20: 19 convs + FC


def test_block_variants():
    convs = {b: [m for m in create_model("resblock_net", block=b).modules() if isinstance(m, nn.Conv2d)]
             for b in ("basic", "bottleneck", "wide")}
    assert {c.kernel_size for c in convs["basic"]} == {(3, 3)} | {(1, 1)}  # 1x1: projection shortcuts
    assert sum(c.kernel_size == (1, 1) for c in convs["bottleneck"]) > len(convs["bottleneck"]) // 2
    assert [c.out_channels for c in convs["wide"]] == [4 * c.out_channels for c in convs["basic"]]


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_resnet50_has_torchvision_parameter_count(num_classes):
    torchvision = pytest.importorskip("torchvision")
    reference = count_parameters(torchvision.models.resnet50(num_classes=num_classes))
    imagenet = count_parameters(create_model("resnet50", num_classes=num_classes, stem="imagenet"))
    cifar = count_parameters(create_model("resnet50", num_classes=num_classes, stem="cifar"))
    print(f"resnet50 K={num_classes}: torchvision {reference:,}, imagenet stem {imagenet:,}, cifar stem {cifar:,}")
    assert imagenet == reference
    assert cifar == reference - (7 * 7 - 3 * 3) * 3 * 64  # only the stem conv differs


def test_resnet50_computes_torchvision_function():
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet50(num_classes=10).eval()
    net = create_model("resnet50", num_classes=10, stem="imagenet").eval()
    # Same layout, same order: torchvision's tensors load one to one.
    ours, theirs = net.state_dict(), reference.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    net.load_state_dict(dict(zip(ours, theirs.values())))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), reference(x), atol=1e-4)


def test_resnet50_stem_follows_image_size():
    assert create_model("resnet50", image_size=32).features.stem[0].kernel_size == (3, 3)
    assert create_model("resnet50", image_size=224).features.stem[0].kernel_size == (7, 7)


# --- kernel-size variants --------------------------------------------------------------------

def test_solve_width_picks_the_nearest_count():
    assert solve_width(lambda w: w * w, 50) == 7
    assert solve_width(lambda w: w * w, 56) == 7 and solve_width(lambda w: w * w, 57) == 8


@pytest.mark.parametrize("num_classes,in_channels", [(10, 3), (7, 1)])
def test_kernel_variants_agree_on_parameter_count(num_classes, in_channels):
    target = 150_000
    rows = kernel_variants(target, num_classes=num_classes, in_channels=in_channels)
    print(f"\n{num_classes} classes, {in_channels} channels:\n{format_kernel_variants(rows)}")
    counts = [r["params"] for r in rows.values()]
    assert max(counts) <= 1.05 * min(counts)
    assert all(abs(c - target) <= 0.05 * target for c in counts)
    # The registry builds exactly the solved nets, with the variant's kernels.
    for kernel, row in rows.items():
        net = create_model("kernel_cnn", kernel=kernel, num_classes=num_classes, in_channels=in_channels)
        assert count_parameters(net) == row["params"]
        sizes = [m.kernel_size[0] for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert sizes == list(KERNELS[kernel]) * 4


def test_kernel_variant_receptive_fields():
    rows = kernel_variants()
    assert {k: r["final_rf"] for k, r in rows.items()} == {"3x3": 16, "5x5": 28, "7x7": 40, "1x1+3x3": 16}
    assert rows["7x7"]["conv_rf"] == [7, 13, 26, 38]


def test_kernel_cnn_refuses_a_target_it_cannot_meet():
    with pytest.raises(ValueError, match="target"):
        create_model("kernel_cnn", kernel="7x7", target_params=2_000)


# --- receptive field -------------------------------------------------------------------------

def test_analytic_receptive_field_recurrence():
    spec = [LayerSpec("a", "conv", 3, 2), LayerSpec("b", "conv", 3, 1, dilation=2), LayerSpec("c", "pool", 3, 2),
            LayerSpec("d", "conv", 5)]
    assert [(r.rf, r.jump) for r in analytic_receptive_field(spec)] == [(3, 2), (11, 2), (15, 4), (31, 4)]


def _assert_empirical_matches_analytic(net, in_channels, image_size):
    analytic = analytic_receptive_field(net)
    assert analytic
    for layer in analytic:
        assert empirical_receptive_field(net, layer.name, in_channels, image_size) == (layer.rf, layer.rf), layer


def test_empirical_receptive_field_matches_analytic_on_a_chain():
    # Strides, a dilation, a max-pool (measured as an average pool of its geometry) and padding.
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, dilation=2, padding=2), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 5, padding=2))
    assert analytic_receptive_field(net)[-1].rf == 31
    _assert_empirical_matches_analytic(net, 1, 64)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_empirical_receptive_field_matches_analytic_on_kernel_cnn(kernel):
    _assert_empirical_matches_analytic(create_model("kernel_cnn", kernel=kernel, width=4), 3, 64)


def test_empirical_receptive_field_through_identity_skips():
    net = create_model("depth_cnn", depth=4, residual=True, width=4)
    assert analytic_receptive_field(net)[-1].rf == 4 + 3 * 2 * 2  # conv 3, pool 4, three 3x3 convs at jump 2
    _assert_empirical_matches_analytic(net, 3, 32)


# --- depth variants --------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [2, 4, 6, 8, 12])
def test_depth_variants_have_the_requested_conv_layers(depth):
    plain = create_model("depth_cnn", depth=depth, residual=False)
    residual = create_model("depth_cnn", depth=depth, residual=True)
    for net in (plain, residual):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == len(net.conv_layers()) == depth
        assert net.conv_layers() == convs  # in depth order
        assert [net.get_submodule(n) for n, _ in net.named_conv_layers()] == convs
        assert {c.out_channels for c in convs} == {32}
    assert count_parameters(plain) == count_parameters(residual)


def test_plain_deep_net_shows_vanishing_gradients_and_residual_does_not():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ratios = {}
    for residual in (False, True):
        net = create_model("depth_cnn", depth=12, residual=residual, seed=0)
        nn.functional.cross_entropy(net(x), y).backward()
        norms = [conv.weight.grad.norm().item() for conv in net.conv_layers()]
        ratios[residual] = norms[1] / norms[-1]  # first hidden layer against the last
    assert ratios[False] < 1e-2 and ratios[True] > 1e-1, ratios
