"""Image-folder datasets (ImageNet layout) with standard ImageNet preprocessing.

``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``. Training: random
resized crop (scale 0.08..1, ratio 3/4..4/3) and horizontal flip; evaluation:
resize the short side to ``size / 0.875`` and center-crop ``size``. Pillow only
(torchvision is not needed). Each sample's augmentation is drawn from
``(seed, epoch, index)``, so runs resume and shard deterministically.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .order import epoch_generator, epoch_order
from .spec import _STATS, DataError, DataSpec

__all__ = ["ImageFolder", "FolderLoader", "image_folder_spec"]

_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


def _scan(split_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((split_dir / c).rglob("*"))
               if f.suffix.lower() in _EXTENSIONS]
    return samples, classes


def image_folder_spec(root: Path) -> DataSpec:
    """Check the layout and count the classes; images stay on disk."""
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"image folder {root} needs {split}/ with one sub-folder per class "
                            "(the ImageNet layout); not found")
    samples, classes = _scan(root / "train")
    if not samples:
        raise DataError(f"no images ({', '.join(sorted(_EXTENSIONS))}) under {root / 'train'}")
    return DataSpec(root.name, None, None, None, None, in_channels=3, image_size=224,
                    num_classes=len(classes), folder=root)


class ImageFolder(torch.utils.data.Dataset):
    """One split of an image folder, preprocessed to ``(3, size, size)`` tensors."""

    def __init__(self, split_dir: Path, size: int, train: bool, seed: int = 0,
                 skip_bad: bool = False) -> None:
        self.samples, self.classes = _scan(split_dir)
        self.size, self.train, self.seed, self.epoch = size, train, seed, 0
        self.skip_bad = skip_bad  # an unreadable image is skipped (and counted), not fatal
        mean, std = _STATS["imagenet"]
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, label = self.samples[index]
        try:
            return self._load(path, label, index)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad files
            if self.skip_bad:
                return None
            raise DataError(f"image {path} cannot be read ({type(err).__name__}: {err}); "
                            "fix or remove it, or train with skip_bad_images=true "
                            "(--set skip_bad_images=true) to skip and count such "
                            "files") from None

    def _load(self, path: Path, label: int, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            if self.train:
                rng = random.Random(hash((self.seed, self.epoch, index)))
                img = _random_resized_crop(img, self.size, rng)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                img = _center_crop(img, self.size)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = data.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std, label


def _random_resized_crop(img, size: int, rng: random.Random):
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), box=(x0, y0, x0 + cw, y0 + ch))
    return _center_crop(img, size)


def _center_crop(img, size: int):
    w, h = img.size
    short = round(size / 0.875)
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))))
    w, h = img.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


class FolderLoader:
    """Same interface as :class:`blendq.data.TensorLoader` over an :class:`ImageFolder`."""

    def __init__(self, dataset: ImageFolder, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 0,
                 drop_last: bool = False) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def _indices(self) -> list[int]:
        gen = epoch_generator(self.seed, self.dataset.epoch)
        return epoch_order(len(self.dataset), gen, self.shuffle, self.rank,
                           self.world_size).tolist()

    def __len__(self) -> int:
        n = len(self.dataset) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.skipped = 0  # unreadable images skipped this pass (``skip_bad``)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self._indices(),
            num_workers=self.workers, drop_last=self.drop_last, collate_fn=_collate)
        for x, y, skipped in loader:
            self.skipped += skipped
            if len(y):
                yield x, y


def _collate(batch: list) -> tuple[Tensor, Tensor, int]:
    """A batch of the readable samples, and how many were skipped."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), len(batch)
    x, y = torch.utils.data.default_collate(good)
    return x, y, len(batch) - len(good)
