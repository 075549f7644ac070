"""Datasets as uint8 tensors: decode once, cache, split reproducibly, augment batch-wise.

Readers:
  cifar10        the canonical pickles when they are in the data root (cifar-10-batches-py/, read
                 here: the format is a documented dict per batch), else an image-folder tree
                 (cifar10-jpg/{train,test}/<class>/)
  mnist          torchvision's MNIST reader (MNIST/raw/ idx files)
  fashion_mnist  torchvision's FashionMNIST reader (FashionMNIST/raw/)
  imagefolder    any <root>/{train,test}/<class>/<image> tree (Stanford Cars, say), resized by the
                 preprocessing rule that then travels in the model card

Every image is decoded through lab.preprocess (the serving path), so the cached pixels are the
pixels the service would compute from the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.paths import default_cache_dir, default_data_root  # noqa: F401  (re-exported)
from lab.preprocess import ImageError, Preprocessing, decode_uint8

DATASETS = ("cifar10", "mnist", "fashion_mnist", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class DataError(RuntimeError):
    """No data where we looked: the message says where and how to point elsewhere."""



@dataclass
class ArrayDataset:
    """Images as one uint8 tensor (N, C, H, W) with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray | slice) -> "ArrayDataset":
        index = torch.as_tensor(index) if not isinstance(index, slice) else index
        return ArrayDataset(self.images[index], self.labels[index], self.classes, self.name)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def mean_std(self) -> tuple[list[float], list[float]]:
        x = self.images.to(torch.float64) / 255.0
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


# ---------------------------------------------------------------- loading


def load_dataset(name: str, split: str, root: Path | str | None = None, *, image_size: int = 32,
                 download: bool = False, cache_dir: Path | None = None,
                 progress: bool = True) -> ArrayDataset:
    """Load `split` ('train' or 'test') of a dataset as uint8 tensors, through the cache."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; valid: train, test")
    root = Path(root) if root is not None else default_data_root()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name == "cifar10":
        pickles = root / "cifar-10-batches-py"
        if pickles.is_dir() or (download and not (root / "cifar10-jpg").is_dir()):
            if download and not pickles.is_dir():
                _torchvision_download("CIFAR10", root)
            return _cifar_pickles(pickles, split, cache_dir)
        return _image_folder(root / "cifar10-jpg", split, "cifar10", image_size, cache_dir, progress,
                             hint=f"expected {pickles}/ (canonical pickles) or "
                                  f"{root / 'cifar10-jpg'}/{{train,test}}/<class>/*.jpg")
    if name == "mnist":
        return _torchvision_dataset("MNIST", root, split, download, cache_dir)
    if name == "fashion_mnist":
        return _torchvision_dataset("FashionMNIST", root, split, download, cache_dir)
    return _image_folder(root, split, "imagefolder", image_size, cache_dir, progress,
                         hint=f"expected {root}/{{train,test}}/<class>/<image files>")


def _missing(what: str, looked: str) -> DataError:
    return DataError(
        f"no {what} data: {looked}. Point elsewhere with --data-root DIR or LAB_DATA_ROOT=DIR "
        f"(the offline copies live in ../shared/data), or pass --download where there is network.")


def _torchvision_download(cls_name: str, root: Path) -> None:
    import torchvision

    try:
        getattr(torchvision.datasets, cls_name)(str(root), train=True, download=True)
    except Exception as e:  # URLError, HTTPError, socket errors
        raise DataError(f"could not download {cls_name} into {root}: {type(e).__name__}: {e}. "
                        f"There may be no network; use an offline copy with --data-root DIR.") from None


def _cifar_pickles(folder: Path, split: str, cache_dir: Path) -> ArrayDataset:
    """The canonical CIFAR-10 python batches: data_batch_1..5 / test_batch, each a pickled dict with
    "data" (N x 3072 uint8, channel-major) and "labels"; batches.meta names the classes."""
    import pickle

    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    sources = [folder / n for n in names] + [folder / "batches.meta"]
    missing = [p.name for p in sources if not p.is_file()]
    if missing:
        raise _missing("CIFAR10", f"{folder} lacks {', '.join(missing)}")
    key = _files_key(sources, extra=f"cifar-pickles-{split}")
    cached = _cache_read(cache_dir, f"cifar10-{split}", key)
    if cached is not None:
        return cached
    images, labels = [], []
    try:
        for p in sources[:-1]:
            with open(p, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        with open(sources[-1], "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")["label_names"])
    except Exception as e:
        raise DataError(f"cannot read the CIFAR-10 batches in {folder}: {type(e).__name__}: {e}") from None
    result = ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.as_tensor(labels, dtype=torch.int64),
                          classes, "cifar10")
    _cache_write(cache_dir, f"cifar10-{split}", key, result)
    return result


def _torchvision_dataset(cls_name: str, root: Path, split: str, download: bool,
                         cache_dir: Path) -> ArrayDataset:
    """MNIST and Fashion-MNIST through torchvision's public dataset classes."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    folder = root / f"{cls_name}/raw"
    sources = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    key = _files_key(sources, extra=f"{cls_name}-{split}")
    cached = _cache_read(cache_dir, f"{cls_name.lower()}-{split}", key)
    if cached is not None:
        return cached
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. ..." or "Error downloading ..."
        if not download:
            raise _missing(cls_name, f"looked in {folder} ({e})") from None
        raise DataError(f"could not download {cls_name} into {root}: {' '.join(str(e).split())}. "
                        f"There may be no network; use an offline copy with --data-root DIR.") from None
    except Exception as e:  # download failures: URLError, HTTPError, socket errors
        raise DataError(f"could not download {cls_name} into {root}: {type(e).__name__}: {e}. "
                        f"There may be no network; use an offline copy with --data-root DIR.") from None
    data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
    if data.ndim == 3:  # MNIST-like (N, H, W) -> (N, H, W, 1)
        data = data[..., None]
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    result = ArrayDataset(images, labels, list(ds.classes), cls_name.lower())
    # key over the files now present (a download may have added them)
    key = _files_key(sorted(p for p in folder.glob("*") if p.is_file()), extra=f"{cls_name}-{split}")
    _cache_write(cache_dir, f"{cls_name.lower()}-{split}", key, result)
    return result


def _list_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((folder / c).iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                files.append(p)
                labels.append(i)
    return files, labels, classes


def _image_folder(root: Path, split: str, name: str, image_size: int, cache_dir: Path,
                  progress: bool, hint: str) -> ArrayDataset:
    folder = root / split
    if not folder.is_dir():
        raise _missing(name, f"{folder} does not exist; {hint}")
    files, labels, classes = _list_image_folder(folder)
    if not files:
        raise _missing(name, f"{folder} holds no image files; {hint}")
    spec = image_folder_spec(image_size)
    key = _files_key(files, extra=f"{name}-{split}-{json.dumps(spec.to_dict(), sort_keys=True)}")
    cache_name = f"{name}-{split}" if name != "imagefolder" else f"imagefolder-{root.name}-{split}"
    cached = _cache_read(cache_dir, cache_name, key)
    if cached is not None:
        return cached
    images = _decode_all(files, spec, progress, desc=f"decoding {name}/{split}")
    result = ArrayDataset(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                          torch.as_tensor(labels, dtype=torch.int64), classes, name)
    _cache_write(cache_dir, cache_name, key, result)
    return result


def image_folder_spec(image_size: int) -> Preprocessing:
    """The decode rule for image-folder data (RGB, shorter side then centre crop); mean/std are
    placeholders here: the model card gets the training set's own statistics."""
    return Preprocessing(size=(image_size, image_size), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def _decode_one(args: tuple[str, Preprocessing]) -> np.ndarray:
    path, spec = args
    try:
        return decode_uint8(Path(path).read_bytes(), spec)
    except ImageError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _decode_all(files: list[Path], spec: Preprocessing, progress: bool, desc: str) -> np.ndarray:
    from tqdm import tqdm

    h, w = spec.size
    out = np.empty((len(files), h, w, spec.channels), dtype=np.uint8)
    workers = max(1, min(os.cpu_count() or 1, 8))
    jobs = [(str(p), spec) for p in files]
    with ProcessPoolExecutor(workers) as pool:
        it = pool.map(_decode_one, jobs, chunksize=256)
        for i, arr in enumerate(tqdm(it, total=len(files), desc=desc, disable=not progress,
                                     file=sys.stderr, mininterval=1.0)):
            out[i] = arr
    return out


# ---------------------------------------------------------------- cache


def decoder_version() -> str:
    """A hash of the code that turns source files into cached pixels: editing it invalidates the cache."""
    import inspect

    import lab.preprocess

    h = hashlib.sha256(inspect.getsource(lab.preprocess).encode())
    for fn in (_cifar_pickles, _torchvision_dataset, _image_folder, _decode_one, _decode_all, image_folder_spec):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def _files_key(files: list[Path], extra: str = "") -> str:
    """Changes when any source file is added, removed, resized or touched, or the decoding code changes.

    With LAB_CACHE_VERIFY=content the key also covers every file's bytes (slower: reads them all)."""
    by_content = os.environ.get("LAB_CACHE_VERIFY", "") == "content"
    h = hashlib.sha256(f"{extra}\0{decoder_version()}\0{by_content}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if by_content:
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _cache_read(cache_dir: Path, name: str, key: str) -> ArrayDataset | None:
    path = cache_dir / f"{name}-{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return ArrayDataset(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                [str(c) for c in z["classes"]], str(z["name"]))
    except Exception:  # unreadable or half-written cache (BadZipFile, OSError, ...): rebuild it
        return None


def _cache_write(cache_dir: Path, name: str, key: str, ds: ArrayDataset) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob(f"{name}-*.npz"):  # one entry per source: drop stale keys
        old.unlink(missing_ok=True)
    path = cache_dir / f"{name}-{key}.npz"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=ds.images.numpy(), labels=ds.labels.numpy(),
                 classes=np.array(ds.classes), name=np.array(ds.name))
    os.replace(tmp, path)


# ---------------------------------------------------------------- splits and batches


def shuffled(ds: ArrayDataset, seed: int) -> ArrayDataset:
    """Image-folder trees come class-sorted: shuffle before anyone takes "the first N"."""
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=g))


def train_val_split(ds: ArrayDataset, val_size: int | float, seed: int
                    ) -> tuple[ArrayDataset, ArrayDataset | None]:
    """A reproducible split: the same seed gives the same validation images."""
    n_val = int(round(val_size * len(ds))) if isinstance(val_size, float) else int(val_size)
    if n_val <= 0:
        return ds, None
    if n_val >= len(ds):
        raise DataError(f"validation size {n_val} leaves no training images (dataset has {len(ds)})")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[n_val:]), ds.subset(perm[:n_val])


def to_float(images_uint8: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 NCHW -> normalised float32 NCHW, through the serving path's `normalize`."""
    from lab.preprocess import normalize

    nhwc = images_uint8.permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(normalize(nhwc, spec))


class BatchLoader:
    """Normalised batches from a uint8 dataset, augmented batch-wise on tensors, on any device.

    The uint8 images live on `device` (the CPU by default; the GPU when training there): each batch is
    gathered, translated and flipped there as uint8 and normalised there, so a GPU run does no per-batch
    host work and no host-to-device copies of pixels. The random draws (order, shifts, flips) come from
    a CPU torch.Generator, in the same sequence as before, and travel to the device as small index
    tensors once per epoch: for a seed, the batches are the same on every device.

    Augmentations (all on whole batches, no per-image PIL work):
      translate=r  random crop of the reflect-padded image, shifts in [-r, r] on each axis
      flip         "alternating" horizontal flip: a random half is flipped in even epochs and exactly
                   the other half in odd epochs, so each image is seen both ways every two epochs.

    Sharding (data-parallel training): with world_size N, `batch_size` is the global batch; rank r gets
    the r-th of N disjoint slices of every global batch (the draws are the same on every rank), so the
    N ranks together see exactly the batches of a single process.
    """

    def __init__(self, ds: ArrayDataset, spec: Preprocessing, batch_size: int, *, train: bool,
                 translate: int = 0, flip: bool = False, seed: int = 0, drop_last: bool | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                 targets: torch.Tensor | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        h, w = ds.images.shape[2:]
        if translate and translate >= min(h, w):
            raise ValueError(f"translation by {translate} pixels needs images larger than {translate}x{translate}")
        self.ds, self.batch_size, self.train = ds, batch_size, train
        self.translate, self.flip = translate, flip
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last, self.dtype = channels_last, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rank, self.world_size = rank, world_size
        # the only copy of the pixels (on the CPU this is the dataset's own tensor: no copy at all)
        self.pixels = ds.images.to(self.device).contiguous()
        self.labels = ds.labels.to(self.device)
        # per-image soft targets (a teacher's logits, N x K): yielded third, for the same images as y
        self.targets = targets.to(self.device) if targets is not None else None
        self._mean, self._inv_std = normalization_constants(spec, self.device)
        self._arange = {n: torch.arange(n, device=self.device) for n in {ds.images.shape[1], h, w}}
        self._images = None
        self.seed, self.epoch = seed, 0
        self.generator = torch.Generator().manual_seed(seed)
        self._flip_mask = (torch.rand(len(ds), generator=self.generator) < 0.5).to(self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def images(self) -> torch.Tensor:
        """The whole dataset normalised (float NCHW on the loader's device), as earlier versions held it;
        computed on first use. Prefer `normalized(index)` for a part of it."""
        if self._images is None:
            self._images = self.normalized(slice(None))
        return self._images

    def normalized(self, index, channels_last: bool = False) -> torch.Tensor:
        """Images `index` (a slice or index tensor) normalised, without augmentation."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.device)
        return normalize_batch(self.pixels[index], self._mean, self._inv_std, channels_last=channels_last,
                               dtype=self.dtype)

    def set_epoch(self, epoch: int) -> None:
        """Makes the batches of `epoch` reproducible, also after a resume."""
        self.epoch = epoch
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def _local(self, lo: int, hi: int) -> tuple[int, int]:
        """This rank's part of the global batch [lo, hi) (torch.tensor_split's sizes)."""
        if self.world_size == 1:
            return lo, hi
        q, rem = divmod(hi - lo, self.world_size)
        start = lo + self.rank * q + min(self.rank, rem)
        return start, start + q + (self.rank < rem)

    def __iter__(self):
        n, b, steps = len(self.labels), self.batch_size, len(self)
        order = shifts = flip = None
        if self.train:
            # every draw of the epoch, in the order earlier versions made them (order, then each batch's
            # shifts), on the CPU generator; then one small copy each to the device
            order = torch.randperm(n, generator=self.generator)
            if self.translate:
                shifts = torch.cat([torch.randint(0, 2 * self.translate + 1, (min(b, n - i * b), 2),
                                                  generator=self.generator) for i in range(steps)])
                shifts = shifts.to(self.device, non_blocking=True)
            order = order.to(self.device, non_blocking=True)
            if self.flip:
                flip = self._flip_mask if self.epoch % 2 == 0 else ~self._flip_mask
        for i in range(steps):
            lo, hi = self._local(i * b, min((i + 1) * b, n))
            idx = slice(lo, hi) if order is None else order[lo:hi]
            if order is None:
                x = self.pixels[idx]
            else:
                x = self._gather(idx, shifts[lo:hi] if shifts is not None else None,
                                 flip[idx] if flip is not None else None)
            x = normalize_batch(x, self._mean, self._inv_std, channels_last=self.channels_last, dtype=self.dtype)
            if self.targets is None:
                yield x, self.labels[idx]
            else:
                yield x, self.labels[idx], self.targets[idx]

    def _gather(self, idx: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
        """uint8 images `idx`, each shifted by (dy, dx) = shifts - r with reflect padding and then mirrored
        where `flips`: one gather of rows and one of columns, the same pixels as padding, cropping and
        flipping the batch (random_translate and a flip)."""
        if shifts is None and flips is None:
            return self.pixels[idx]
        c, h, w = self.pixels.shape[1:]
        n, r = len(idx), self.translate
        if shifts is not None:
            rows = _reflect(self._arange[h] + (shifts[:, :1] - r), h)                       # n, h
            x = self.pixels[idx[:, None, None], self._arange[c][None, :, None], rows[:, None, :]]
        else:
            x = self.pixels[idx]
        cols = self._arange[w].expand(n, w)
        if flips is not None:
            cols = torch.where(flips[:, None], (w - 1) - cols, cols)
        if shifts is not None:
            cols = _reflect(cols + (shifts[:, 1:] - r), w)
        return torch.gather(x, 3, cols[:, None, None, :].expand(n, c, h, w))


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside [0, n) mirrored back as F.pad(mode="reflect") does (for shifts < n)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def normalization_constants(spec: Preprocessing, device: torch.device | str = "cpu"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (x255) and 1/(std x255) of lab.preprocess.normalize, computed the same way, as (1, C, 1, 1)."""
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(spec.std, dtype=np.float32) * 255.0)
    return (torch.from_numpy(mean.astype(np.float32)).view(1, -1, 1, 1).to(device),
            torch.from_numpy(inv_std.astype(np.float32)).view(1, -1, 1, 1).to(device))


def normalize_batch(pixels: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, *,
                    channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> normalised float on the pixels' device: (x - mean) * inv_std in float32, the
    arithmetic of lab.preprocess.normalize (so the values are bit-identical to the serving path's)."""
    fmt = torch.channels_last if channels_last and pixels.dim() == 4 else torch.contiguous_format
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device, memory_format=fmt)
    out.copy_(pixels)
    out.sub_(mean).mul_(inv_std)
    return out if dtype == torch.float32 else out.to(dtype)


def random_translate(x: torch.Tensor, r: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) in [-r, r]^2 with reflect padding: one gather per shift value."""
    n, c, h, w = x.shape
    padded = F.pad(x, (r, r, r, r), mode="reflect")
    shifts = torch.randint(0, 2 * r + 1, (n, 2), generator=generator)
    rows = torch.empty((n, c, h, w + 2 * r), dtype=x.dtype)
    for s in range(2 * r + 1):
        m = shifts[:, 0] == s
        rows[m] = padded[m, :, s:s + h, :]
    out = torch.empty_like(x)
    for s in range(2 * r + 1):
        m = shifts[:, 1] == s
        out[m] = rows[m, :, :, s:s + w]
    return out
