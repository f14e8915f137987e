"""Data: dataset specs, the bundled and on-disk datasets, image folders, and the one
ordering rule every loader follows (``order``)."""

from .folder import FolderLoader, ImageFolder, image_folder_spec
from .order import epoch_generator, epoch_order
from .sources import (
    DATASETS,
    FASHION_MNIST_DIR,
    TensorLoader,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from .spec import DataError, DataSpec

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "DataError", "DataSpec", "FolderLoader",
           "ImageFolder", "TensorLoader", "epoch_generator", "epoch_order",
           "image_folder_spec", "load_cifar10", "load_dataset", "load_digits",
           "load_fashion_mnist", "read_idx"]
