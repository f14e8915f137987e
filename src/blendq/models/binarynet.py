"""BinaryNet for CIFAR-10 (Hubara et al. 2016), as in the paper's Figure 5.

2×128C3, MP2, 2×256C3, MP2, 2×512C3, MP2, 2×1024 FC, 10; batch norm after every
layer and hardtanh between them (the sign of the next layer's input quantizer
binarizes it). No biases: batch norm follows each layer. The first layer's input
stays real-valued (policy rule ``first_layer=(1, None)``).
"""

from __future__ import annotations

from torch import nn


def binarynet(in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
              width: float = 1.0) -> nn.Sequential:
    c1, c2, c3, fc = (max(1, round(c * width)) for c in (128, 256, 512, 1024))
    side = image_size // 8  # three 2×2 poolings

    def conv(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
        layers += [nn.MaxPool2d(2)] if pool else []
        return layers + [nn.BatchNorm2d(cout), nn.Hardtanh()]

    return nn.Sequential(
        *conv(in_channels, c1, False), *conv(c1, c1, True),
        *conv(c1, c2, False), *conv(c2, c2, True),
        *conv(c2, c3, False), *conv(c3, c3, True),
        nn.Flatten(),
        nn.Linear(c3 * side * side, fc, bias=False), nn.BatchNorm1d(fc), nn.Hardtanh(),
        nn.Linear(fc, fc, bias=False), nn.BatchNorm1d(fc), nn.Hardtanh(),
        nn.Linear(fc, num_classes, bias=False), nn.BatchNorm1d(num_classes),
    )
