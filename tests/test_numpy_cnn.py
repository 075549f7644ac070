"""The NumPy CNN (training/scratch/numpy_cnn.py): every layer against torch, training, save/load, bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, SHARED_DATA, real_mnist
from training.scratch import gradcheck
from training.scratch import numpy_cnn as N


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_numpy_module_imports_no_torch():
    code = ("import sys; import training.scratch.numpy_cnn as N, training.scratch.numpy_cnn_run; "
            "assert 'torch' not in sys.modules, 'numpy_cnn (or its run entry point) imported torch'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    assert "import torch" not in (REPO / "training" / "scratch" / "numpy_cnn.py").read_text()


@pytest.fixture(scope="module")
def layer_table():
    return gradcheck.check_layers(seed=0)


def test_every_layer_matches_torch_in_float64(layer_table):
    names = " ".join(r["layer"] for r in layer_table)
    for layer in ("Linear", "Conv2d", "ReLU", "Sigmoid", "MaxPool2d", "Flatten", "Reshape",
                  "SoftmaxCrossEntropy", "NumpyCNN"):
        assert layer in names
    assert any("s2" in r["layer"] and r["layer"].startswith("Conv2d") for r in layer_table)  # stride
    for r in layer_table:
        assert r["forward"] <= gradcheck.TOLERANCE, (r["layer"], r["forward"])
        for what, err in r["backward"].items():
            assert err <= gradcheck.TOLERANCE, (r["layer"], what, err)
    table = gradcheck.format_table(layer_table)
    assert table.count("\n") == len(layer_table) + 1 and "forward rel. err" in table


def test_rel_error_is_not_blind():
    assert gradcheck.rel_error([1.0, 2.0], [1.0, 2.0]) == 0
    assert gradcheck.rel_error([1.0, 2.0], [1.0, 2.1]) > 1e-3


def test_maxpool_routes_ties_to_the_first_maximum_like_torch():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = 1.0  # one window of four equal maxima, three windows of zeros
    pool = N.MaxPool2d(2, dtype=np.float64)
    pool.forward(x)
    dx = pool.backward(np.ones((1, 1, 2, 2)))
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 2).sum().backward()
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def fake_digits(n, seed=0):
    """Learnable fake digits: class c lights up a c-dependent stripe."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4: 2 * c + 7, 4:24] = 220
    return images, labels


def test_a_few_training_steps_lower_the_loss():
    images, labels = fake_digits(256)
    model = N.NumpyCNN(channels=(4, 8), hidden=32, seed=0)
    loss = N.SoftmaxCrossEntropy()
    before = loss(model.predict(images), labels)
    hist = N.train(model, images, labels, epochs=2, batch_size=32, lr=3e-3, progress=False)
    after = loss(model.predict(images), labels)
    assert len(hist["step_loss"]) == 16 and len(hist["epoch_loss"]) == 2
    assert after < 0.5 * before
    assert np.mean(hist["step_loss"][-4:]) < np.mean(hist["step_loss"][:4])


def test_sgd_with_momentum_trains_too():
    images, labels = fake_digits(128, seed=1)
    model = N.NumpyCNN(channels=(4, 8), hidden=32, seed=1)
    hist = N.train(model, images, labels, epochs=3, batch_size=32, lr=0.05, optimizer="sgd", progress=False)
    assert hist["epoch_loss"][-1] < hist["epoch_loss"][0]


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_numpy_optimizers_follow_torch(name):
    rng = np.random.default_rng(0)
    p = N.Param(rng.normal(size=(5, 3)))
    pt = torch.tensor(p.data.copy(), requires_grad=True)
    if name == "sgd":
        mine = N.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
        ref = torch.optim.SGD([pt], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    else:
        mine = N.Adam([p], lr=0.01, betas=(0.8, 0.99), weight_decay=0.01)
        ref = torch.optim.Adam([pt], lr=0.01, betas=(0.8, 0.99), weight_decay=0.01)
    for _ in range(20):
        g = rng.normal(size=(5, 3))
        p.grad[...] = g
        pt.grad = torch.tensor(g)
        mine.step()
        ref.step()
    np.testing.assert_allclose(p.data, pt.detach().numpy(), rtol=0, atol=1e-12)


def test_predict_and_load_round_trip(tmp_path):
    images, labels = fake_digits(40)
    model = N.NumpyCNN(channels=(4, 8), hidden=16, seed=3)
    N.train(model, images, labels, epochs=1, batch_size=20, progress=False)
    logits = model.predict(images)
    assert logits.shape == (40, 10) and logits.dtype == np.float32
    path = model.save(tmp_path / "numpy_cnn.npz")
    assert path == tmp_path / "numpy_cnn.npz" and path.exists()
    again = N.load(path)
    assert again.config() == model.config()
    np.testing.assert_array_equal(again.predict(images), logits)
    # batching does not matter, up to float32 rounding: BLAS picks its blocking (and so its order of
    # summation) by matrix shape, and on some CPUs a batch of 7 differs from 40 in the last bit
    np.testing.assert_allclose(model.predict(images, batch_size=7), logits, rtol=1e-5, atol=1e-6)
    assert model.predict(images[:0]).shape == (0, 10)


def test_load_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a NumpyCNN"):
        N.load(tmp_path / "other.npz")


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 28, 28), np.float32), "uint8"),
    (np.zeros((2, 1, 28, 28), np.uint8), r"\(N, 28, 28\)"),
    (np.zeros((2, 32, 32), np.uint8), r"\(N, 28, 28\)"),
    ([[0] * 28] * 28, "numpy array"),
])
def test_predict_refuses_bad_input(images, match):
    with pytest.raises(ValueError, match=match):
        N.NumpyCNN(channels=(2, 2), hidden=4).predict(images)


def test_layers_refuse_bad_shapes_and_dtypes():
    conv = N.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"expected shape \(N, 3, H, W\)"):
        conv.forward(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(N, 3, H, W\)"):
        conv.forward(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expected dtype float32"):
        conv.forward(np.zeros((2, 3, 8, 8), np.float64))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        conv.forward(np.zeros((2, 3, 2, 2), np.float32))
    lin = N.Linear(5, 2)
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        lin.forward(np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match="expected dtype float32"):
        lin.forward(np.zeros((2, 5), np.int64))
    lin.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected dL/dy of shape \(2, 2\)"):
        lin.backward(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        N.MaxPool2d(2).forward(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="expected dtype float64"):
        N.ReLU(np.float64).forward(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="integer labels"):
        N.SoftmaxCrossEntropy()(np.zeros((2, 10)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        N.SoftmaxCrossEntropy()(np.zeros((2, 10)), np.array([0, 10]))
    with pytest.raises(ValueError, match="float32 or float64"):
        N.Linear(2, 2, dtype=np.float16)


def test_nan_in_a_batch_is_reported_not_trained_on():
    images, labels = fake_digits(64)
    model = N.NumpyCNN(channels=(2, 4), hidden=8, seed=0)
    x = model.preprocess(images)
    x[37, 0, 5, 5] = np.nan
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(N.NonFiniteError, match=r"epoch 1, step \d+: the input batch holds NaN or inf \(samples \d+"):
        N.train(model, x, labels, epochs=1, batch_size=64, progress=False)
    for b, p in zip(before, model.parameters()):  # not one step was taken on it
        np.testing.assert_array_equal(b, p.data)
    x[37, 0, 5, 5] = np.inf
    with pytest.raises(N.NonFiniteError, match="NaN or inf"):
        N.train(model, x, labels, epochs=1, batch_size=16, progress=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's own warning about the inf - inf
def test_divergence_is_reported():
    images, labels = fake_digits(64)
    model = N.NumpyCNN(channels=(2, 4), hidden=8, seed=0)
    model.layers[-1].bias.data[0] = np.inf  # as if an earlier step had blown up
    with pytest.raises(N.NonFiniteError, match="epoch 1, step 1: the loss is nan; training diverged"):
        N.train(model, images, labels, epochs=1, batch_size=32, progress=False)


def test_idx_reader_reads_what_it_is_given(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "imgs").write_bytes(b"\x00\x00\x08\x03" + np.array([2, 3, 4], ">i4").tobytes() + images.tobytes())
    np.testing.assert_array_equal(N.read_idx(tmp_path / "imgs"), images)
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x03" + np.array([2, 3, 4], ">i4").tobytes() + images.tobytes()[:-1])
    with pytest.raises(ValueError, match="expected"):
        N.read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        N.read_idx(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        N.load_mnist(tmp_path)


@real_mnist
def test_real_mnist_reads_like_torchvision():
    images, labels = N.load_mnist(SHARED_DATA, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and labels.shape == (10000,)
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.datasets.MNIST(str(SHARED_DATA), train=False, download=False)
    np.testing.assert_array_equal(images[:100], ref.data[:100].numpy())
    np.testing.assert_array_equal(labels, ref.targets.numpy())


def test_speed_comparison_reports_both(tmp_path):
    from training.scratch.torch_twin import compare_speed, format_speed

    images, labels = fake_digits(64)
    model = N.NumpyCNN(channels=(4, 8), hidden=16, seed=0)
    r = compare_speed(model, images, labels, batch_size=16, n_batches=4, warmup=1, threads=1, repeats=2,
                      verbose=False)
    assert set(r["images_per_s"]) == {"numpy_forward", "torch_forward", "numpy_forward_backward",
                                      "torch_forward_backward"}
    assert all(v > 0 for v in r["images_per_s"].values())
    assert r["threads"]["torch"] == 1 and r["max_logit_diff"] < 1e-4
    assert "torch/NumPy" in format_speed(r)


def test_run_numpy_cnn_end_to_end(tmp_path):
    """The entry point on a tiny fake MNIST written in the real IDX layout."""
    from training.scratch.numpy_cnn_run import run_numpy_cnn

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 96, 0), ("t10k", 64, 1)):
        images, labels = fake_digits(n, seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            b"\x00\x00\x08\x03" + np.array(images.shape, ">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            b"\x00\x00\x08\x01" + np.array([n], ">i4").tobytes() + labels.astype(np.uint8).tobytes())
    out = tmp_path / "out"
    r = run_numpy_cnn(tmp_path / "data", out, epochs=2, train_limit=64, seed=0, batch_size=16, lr=3e-3,
                      channels=(4, 8), hidden=16, speed_batches=2, progress=False)
    assert r["train_images"] == 64 and r["test_images"] == 64 and r["steps"] == 8
    assert 0 <= r["test_accuracy"] <= 1 and r["train_seconds"] > 0
    assert {"images_per_s", "ratio_torch_over_numpy", "threads"} <= set(r["speed"])
    assert r["speed_1_thread"]["threads"]["torch"] == 1
    assert (out / "numpy_cnn.npz").exists() and (out / "numpy_cnn_loss.png").stat().st_size > 1000
    assert (out / "numpy_cnn.json").exists()
    assert N.load(out / "numpy_cnn.npz").channels == (4, 8)


def test_blas_threads_can_be_read_and_set():
    n = N.blas_threads()
    if n is None:
        pytest.skip("this NumPy's BLAS does not report its threads")
    assert N.set_blas_threads(1) and N.blas_threads() == 1
    N.set_blas_threads(n)
    assert N.blas_threads() == n


@real_mnist
def test_the_numpy_cnn_learns_real_digits(tmp_path):
    """On real MNIST a small NumPy CNN, 2,000 training images, 2 epochs: far above chance on the 10,000 test
    digits (a broken backward pass or optimizer stays near 10 %)."""
    from training.scratch.numpy_cnn_run import run_numpy_cnn

    r = run_numpy_cnn(SHARED_DATA, tmp_path / "out", epochs=2, train_limit=2000, seed=0, batch_size=16, lr=3e-3,
                      channels=(4, 8), hidden=16, speed_batches=1, progress=False)
    assert r["test_images"] == 10000 and r["test_accuracy"] > 0.8, r["test_accuracy"]
