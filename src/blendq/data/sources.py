"""Datasets, read from local files only (no downloads, ever).

- ``digits``: scikit-learn's bundled 8×8 digits (the embedded default).
- ``fashion-mnist``: the four IDX files (``.gz`` or raw), by default where Debian's
  ``dataset-fashion-mnist`` puts them.
- ``cifar10``: the official ``cifar-10-batches-py`` layout.
- an image folder (``train/`` and ``val/`` of class sub-folders, as ImageNet is kept).

Small sets are held in memory as tensors and batched by :class:`TensorLoader`,
which shuffles from ``(seed, epoch)`` and shards across distributed ranks, so a
resumed or distributed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .order import epoch_generator, epoch_order
from .spec import _STATS, DataError, DataSpec

__all__ = ["DataSpec", "TensorLoader", "load_dataset", "DATASETS", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "cifar10", "imagenet")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class TensorLoader:
    """Batches of an in-memory ``(images, labels)`` pair.

    Order: a permutation drawn from ``seed + epoch`` (set with :meth:`set_epoch`),
    then rank ``r`` of ``w`` takes every ``w``-th sample (the tail is dropped so
    ranks see equal counts). ``augment``: random crop (zero padding ``pad``) and
    horizontal flip, drawn from the same seeded generator.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False,
                 augment: bool = False, pad: int = 4, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.pad = batch_size, shuffle, augment, pad
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, gen: torch.Generator) -> Tensor:
        return epoch_order(len(self.labels), gen, self.shuffle, self.rank, self.world_size)

    def __len__(self) -> int:
        n = len(self.labels) // self.world_size if self.world_size > 1 else len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = epoch_generator(self.seed, self.epoch)
        order = self._indices(gen)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = _crop_flip(x, self.pad, gen)
            yield x, self.labels[idx]


def _crop_flip(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def _normalize(images: Tensor, name: str) -> Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _STATS[name])
    return (images - mean) / std


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DataSpec:
    """scikit-learn's bundled digits: 1,797 images of 8×8, values 0..16; fixed split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - 0.3) / 0.4  # (N, 1, 8, 8), roughly zero mean, unit std
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DataSpec("digits", images[train], labels[train], images[test], labels[test],
                    in_channels=1, image_size=8, num_classes=10)


def _open_idx(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                return f.read()
    raise FileNotFoundError(path)


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, dims, big-endian sizes, uint8 data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"IDX file truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> DataSpec:
    """Fashion-MNIST from the four IDX files in ``root`` (``.gz`` or uncompressed)."""
    root = Path(root) if root else FASHION_MNIST_DIR
    split = {}
    for name, (img_file, lbl_file) in _FMNIST_FILES.items():
        try:
            images = read_idx(_open_idx(root / img_file))
            labels = read_idx(_open_idx(root / lbl_file))
        except FileNotFoundError as err:
            raise DataError(
                f"Fashion-MNIST not found: expected {err.args[0]}[.gz] in {root}. Install it "
                "with `apt-get install dataset-fashion-mnist` (Debian) or pass a directory "
                "holding the four IDX files") from None
        x = torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0  # (N, 1, 28, 28)
        split[name] = (_normalize(x, "fashion-mnist"), torch.from_numpy(labels.astype(np.int64)))
    return DataSpec("fashion-mnist", *split["train"], *split["test"], in_channels=1,
                    image_size=28, num_classes=10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays, lists, bytes) and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels)


def _find_cifar_dir(root: Path) -> Path:
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "test_batch").exists():
            return candidate
    raise DataError(
        f"CIFAR-10 not found: expected cifar-10-batches-py/{{data_batch_1..5,test_batch}} "
        f"under {root}. Make it from the bundled JPEG copy with `python "
        "../shared/data/cifar10/make_cifar10_batches.py DIR` and pass --data-root DIR")


def load_cifar10(root: str | os.PathLike | None = None) -> DataSpec:
    """CIFAR-10 in the official ``cifar-10-batches-py`` layout (pickled numpy batches)."""
    base = _find_cifar_dir(Path(root or "data"))
    parts = [_cifar_batch(base / f"data_batch_{i}") for i in range(1, 6)
             if (base / f"data_batch_{i}").exists()]
    if not parts:
        raise DataError(f"CIFAR-10 training batches data_batch_1..5 missing in {base}")
    test_x, test_y = _cifar_batch(base / "test_batch")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])

    def to_tensor(x: np.ndarray) -> Tensor:
        return _normalize(torch.from_numpy(x).float() / 255.0, "cifar10")

    return DataSpec("cifar10", to_tensor(train_x), torch.from_numpy(train_y).long(),
                    to_tensor(test_x), torch.from_numpy(test_y).long(), in_channels=3,
                    image_size=32, num_classes=10, augment=True)


def load_dataset(name: str, root: str | os.PathLike | None = None) -> DataSpec:
    """``digits``, ``fashion-mnist``, ``cifar10`` or a path.

    A path is Fashion-MNIST IDX files, a CIFAR-10 batch directory, or an image folder
    with ``train/`` and ``val/`` class sub-folders, recognised by what it holds.
    """
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "cifar10":
        return load_cifar10(root)
    if name == "imagenet":
        if root is None:
            raise DataError("imagenet needs --data-root DIR (or --data DIR) holding train/ and "
                            "val/ with one sub-folder per class; ImageNet is not bundled")
        name = str(root)
    path = Path(name)
    if not path.exists():
        raise DataError(f"unknown dataset {name!r}: use one of {DATASETS} or an existing "
                        "directory (Fashion-MNIST IDX files, cifar-10-batches-py, or an "
                        "image folder with train/ and val/)")
    if any(path.glob("t10k-images-idx3-ubyte*")):
        return load_fashion_mnist(path)
    if (path / "test_batch").exists() or (path / "cifar-10-batches-py").exists():
        return load_cifar10(path)
    from .folder import image_folder_spec

    return image_folder_spec(path)
