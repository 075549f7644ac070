"""Training at accelerator speed: device-resident batches, no host sync per step, speed levers, evaluation
on the device, time to accuracy and the GPU script's CPU path. All fast (seconds)."""
from __future__ import annotations

import math

import pytest
import torch

from lab.preprocess import Preprocessing
from training import data as D

SPEC = Preprocessing(size=(16, 12), channels=3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_dataset(n=300, h=16, w=12, seed=0) -> D.ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return D.ArrayDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def reference_batches(ds, spec, batch, *, seed, epoch, translate, flip, channels_last, drop_last=True):
    """The batches of the earlier, host-only BatchLoader, restated: the whole set normalised through the
    serving path, then per batch an index, random_translate and the alternating flip."""
    images = D.to_float(ds.images, spec)
    g = torch.Generator().manual_seed(seed)
    flip_mask = torch.rand(len(ds), generator=g) < 0.5
    g.manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(ds), generator=g)
    mask = flip_mask if epoch % 2 == 0 else ~flip_mask
    steps = len(ds) // batch if drop_last else math.ceil(len(ds) / batch)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        x = images[idx]
        if translate:
            x = D.random_translate(x, translate, g)
        if flip:
            x = torch.where(mask[idx].view(-1, 1, 1, 1), x.flip(-1), x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        yield x.contiguous(memory_format=fmt), ds.labels[idx]


@pytest.mark.parametrize("translate,flip,channels_last,drop_last",
                         [(2, True, True, True), (2, True, False, True), (3, False, True, True),
                          (0, True, False, True), (0, False, True, True), (1, True, True, False)])
def test_loader_gives_the_earlier_batches_bit_for_bit(translate, flip, channels_last, drop_last):
    ds = random_dataset()
    loader = D.BatchLoader(ds, SPEC, 64, train=True, translate=translate, flip=flip, seed=7,
                           channels_last=channels_last, drop_last=drop_last, device="cpu")
    for epoch in range(3):
        loader.set_epoch(epoch)
        ref = list(reference_batches(ds, SPEC, 64, seed=7, epoch=epoch, translate=translate, flip=flip,
                                     channels_last=channels_last, drop_last=drop_last))
        got = list(loader)
        assert len(got) == len(ref) == len(loader)
        for (x, y), (xr, yr) in zip(got, ref):
            assert torch.equal(x, xr) and torch.equal(y, yr)
            assert x.stride() == xr.stride() and x.dtype == torch.float32


def test_evaluation_batches_and_images_are_the_serving_path_normalisation():
    ds = random_dataset(50)
    loader = D.BatchLoader(ds, SPEC, 20, train=False)
    x = torch.cat([b for b, _ in loader])
    assert torch.equal(x, D.to_float(ds.images, SPEC)) and torch.equal(loader.images, x)
    assert torch.equal(loader.normalized(torch.tensor([3, 1])), x[[3, 1]])
    assert loader.pixels.data_ptr() == ds.images.data_ptr()  # on the CPU the loader copies nothing


def test_shards_of_the_ranks_make_up_the_single_process_batches():
    ds = random_dataset()
    single = D.BatchLoader(ds, SPEC, 60, train=True, translate=2, flip=True, seed=3)
    ranks = [D.BatchLoader(ds, SPEC, 60, train=True, translate=2, flip=True, seed=3, rank=r, world_size=3)
             for r in range(3)]
    for epoch in (0, 1):
        for lo in [single, *ranks]:
            lo.set_epoch(epoch)
        for (x, y), *parts in zip(single, *ranks):
            assert [len(p[1]) for p in parts] == [20, 20, 20]
            assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_the_same_on_every_device(device):
    ds = random_dataset()
    cpu = D.BatchLoader(ds, SPEC, 64, train=True, translate=2, flip=True, seed=1, channels_last=True)
    dev = D.BatchLoader(ds, SPEC, 64, train=True, translate=2, flip=True, seed=1, channels_last=True, device=device)
    assert dev.pixels.device.type == device
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        for (x, y), (xd, yd) in zip(cpu, dev):
            assert xd.device.type == device and yd.device.type == device
            assert torch.equal(x, xd.cpu()) and torch.equal(y, yd.cpu())
