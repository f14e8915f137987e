"""ResNet-50 v1 (He et al. 2016a) and v2, pre-activation (He et al. 2016b).

Bottleneck blocks [3, 4, 6, 3]; v1 puts batch norm and ReLU after each
convolution and the stride on the 3×3 conv (the "v1.5" placement that
TensorFlow's and torchvision's models use); v2 puts batch norm and ReLU before
each convolution. On small images (< 64 px) the stem is a 3×3 stride-1 conv
without max pooling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_STAGES = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, preact: bool) -> None:
        super().__init__()
        cout = mid * self.expansion
        self.preact = preact
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin if preact else mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.bn3 = nn.BatchNorm2d(mid if preact else cout)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))
            if not preact:
                self.shortcut.append(nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            out = self.relu(self.bn1(x))
            identity = x if self.shortcut is None else self.shortcut(out)
            out = self.conv1(out)
            out = self.conv2(self.relu(self.bn2(out)))
            out = self.conv3(self.relu(self.bn3(out)))
            return out + identity
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, preact: bool,
                 width: float = 1.0) -> None:
        super().__init__()
        base = max(8, int(64 * width))
        small = image_size < 64
        if small:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, 1, 1, bias=False))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 7, 2, 3, bias=False))
        if not preact:
            self.stem.extend([nn.BatchNorm2d(base), nn.ReLU()])
        if not small:
            self.stem.append(nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], base
        for mid, count, stride in _STAGES:
            mid = max(2, int(mid * width))
            for i in range(count):
                blocks.append(Bottleneck(cin, mid, stride if i == 0 else 1, preact))
                cin = mid * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.head_norm = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU()) if preact else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        if self.head_norm is not None:
            x = self.head_norm(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet50_v1(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224,
                width: float = 1.0) -> ResNet50:
    return ResNet50(in_channels, num_classes, image_size, preact=False, width=width)


def resnet50_v2(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224,
                width: float = 1.0) -> ResNet50:
    return ResNet50(in_channels, num_classes, image_size, preact=True, width=width)
