"""Small CNNs for the bundled data: 8×8 digits and 28×28 Fashion-MNIST."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def digits_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
               width: int = 32) -> nn.Sequential:
    """3 conv layers (8×8 → 4×4), global pooling, linear head: ~20k parameters at width 32."""
    return nn.Sequential(
        *_block(in_channels, width), *_block(width, width), nn.MaxPool2d(2),
        *_block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def fmnist_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
               width: int = 32) -> nn.Sequential:
    """4 conv layers with two poolings (28 → 7), global pooling, a hidden FC, a head."""
    return nn.Sequential(
        *_block(in_channels, width), *_block(width, width), nn.MaxPool2d(2),
        *_block(width, 2 * width), *_block(2 * width, 2 * width), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )
