"""What a loaded dataset is (:class:`DataSpec`), its error type and normalisation stats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

__all__ = ["DataSpec", "DataError"]

_STATS = {  # per-channel mean, std of the training split
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DataError(ValueError):
    """A dataset is missing or malformed; the message says how to get it."""


@dataclass
class DataSpec:
    """A dataset ready to train on: tensors (or loaders) and what the model needs to know."""

    name: str
    train_images: Tensor | None
    train_labels: Tensor | None
    test_images: Tensor | None
    test_labels: Tensor | None
    in_channels: int
    image_size: int
    num_classes: int
    augment: bool = False
    folder: Path | None = None  # image-folder datasets stream from disk
