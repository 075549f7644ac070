import os
import time

import numpy as np
import pytest
import torch

from lab.preprocess import Preprocessing
from tests.conftest import SHARED_DATA, real_cifar, real_mnist
from tests.fakedata import CIFAR_CLASSES, write_image_folder, write_mnist
from training import data as D


def test_cifar_pickles_through_torchvision_reader(cifar_root, tmp_path):
    train = D.load_dataset("cifar10", "train", cifar_root, cache_dir=tmp_path, progress=False)
    test = D.load_dataset("cifar10", "test", cifar_root, cache_dir=tmp_path, progress=False)
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (100, 3, 32, 32)
    assert train.classes == CIFAR_CLASSES
    assert train.labels.dtype == torch.int64 and int(train.labels.max()) <= 9


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_idx_files(tmp_path, name, folder):
    root = write_mnist(tmp_path / "root", folder=folder, train=50, test=20)
    ds = D.load_dataset(name, "train", root, cache_dir=tmp_path / "c", progress=False)
    assert ds.images.shape == (50, 1, 28, 28)
    assert len(ds.classes) == 10
    assert len(D.load_dataset(name, "test", root, cache_dir=tmp_path / "c", progress=False)) == 20


def test_image_folder_resizes_and_labels_by_folder(tmp_path):
    root = write_image_folder(tmp_path / "cars", size=(40, 30), fmt="jpg")
    ds = D.load_dataset("imagefolder", "train", root, image_size=24, cache_dir=tmp_path / "c",
                        progress=False)
    assert ds.images.shape == (36, 3, 24, 24)
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12  # class-sorted on disk ...
    shuffled = D.shuffled(ds, seed=0)
    assert shuffled.labels[:12].tolist() != [0] * 12  # ... so shuffle before taking "the first N"


def test_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "cache"
    a = D.load_dataset("imagefolder", "train", root, image_size=16, cache_dir=cache, progress=False)
    entries = list(cache.glob("*.npz"))
    assert len(entries) == 1
    b = D.load_dataset("imagefolder", "train", root, image_size=16, cache_dir=cache, progress=False)
    assert torch.equal(a.images, b.images) and list(cache.glob("*.npz")) == entries
    # change one source image: the cache key changes and the new pixels are read
    victim = sorted((root / "train" / "cat").iterdir())[0]
    from PIL import Image
    Image.new("RGB", (40, 30), (255, 0, 0)).save(victim)
    os.utime(victim, (time.time() + 5, time.time() + 5))
    c = D.load_dataset("imagefolder", "train", root, image_size=16, cache_dir=cache, progress=False)
    assert not torch.equal(a.images, c.images)
    assert c.images[0, 0].float().mean() > 250  # the red image, now first
    assert len(list(cache.glob("*.npz"))) == 1  # the stale entry is gone


def test_split_is_reproducible_and_disjoint(cifar_root, tmp_path):
    ds = D.load_dataset("cifar10", "train", cifar_root, cache_dir=tmp_path, progress=False)
    ds = ds.subset(slice(None))
    ds.images[:, 0, 0, 0] = torch.arange(len(ds)).to(torch.uint8)  # tag each image
    tr1, va1 = D.train_val_split(ds, 50, seed=3)
    tr2, va2 = D.train_val_split(ds, 50, seed=3)
    _, va3 = D.train_val_split(ds, 50, seed=4)
    assert torch.equal(va1.images, va2.images) and torch.equal(tr1.images, tr2.images)
    assert not torch.equal(va1.images, va3.images)
    assert len(tr1) == 150 and len(va1) == 50
    assert not set(tr1.images[:, 0, 0, 0].tolist()) & set(va1.images[:, 0, 0, 0].tolist())


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load_dataset("cifar10", "train", tmp_path / "nothing", cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert str(tmp_path / "nothing") in msg and "--data-root" in msg and "LAB_DATA_ROOT" in msg


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    with pytest.raises(D.DataError, match="valid datasets: cifar10, mnist"):
        D.load_dataset("imagenet", "train", tmp_path)


def test_download_offline_fails_clearly(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError, match="could not download MNIST.*no network"):
        D.load_dataset("mnist", "train", tmp_path / "dl", download=True, cache_dir=tmp_path, progress=False)


def test_batch_loader_augments_whole_batches():
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8) % 256
    ds = D.ArrayDataset(images.to(torch.uint8), torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"])
    spec = Preprocessing(size=(8, 8), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    plain = D.BatchLoader(ds, spec, 4, train=False)
    x, y = next(iter(plain))
    expected = (images / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5) and y.tolist() == [0, 1, 2, 3]
    # alternating flip: each image is flipped in exactly one of two consecutive epochs
    flip = D.BatchLoader(ds, spec, 4, train=True, flip=True, seed=1)
    seen = []
    for epoch in (0, 1):
        flip.set_epoch(epoch)
        xb, yb = next(iter(flip))
        order = yb.argsort()
        seen.append([not torch.allclose(xb[order][i], expected[i], atol=1e-5) for i in range(4)])
    assert all(a != b for a, b in zip(*seen))
    # translation keeps the shape and moves pixels by at most r
    shifted = D.random_translate(expected, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == expected.shape


@real_cifar
def test_real_cifar10_jpg_copy():
    test = D.load_dataset("cifar10", "test", SHARED_DATA, progress=False)
    assert test.images.shape == (10000, 3, 32, 32)
    assert test.classes == CIFAR_CLASSES
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10


@real_mnist
def test_real_mnist_copy():
    train = D.load_dataset("mnist", "train", SHARED_DATA, progress=False)
    test = D.load_dataset("mnist", "test", SHARED_DATA, progress=False)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    mean, std = train.mean_std()
    assert abs(mean[0] - 0.1307) < 0.002 and abs(std[0] - 0.3081) < 0.002
