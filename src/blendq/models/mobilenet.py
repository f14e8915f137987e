"""MobileNet v1 (Howard et al. 2017) with width multiplier, at any input resolution.

Standard 3×3 conv (stride 2), then 13 depthwise-separable blocks, global average
pooling and a linear classifier; batch norm and ReLU6 after every convolution.
On small images (< 64 px, e.g. CIFAR-10) the first conv and the first stride-2
block use stride 1, so the 32×32 input is not reduced to 1×1.
"""

from __future__ import annotations

from torch import nn

# (output channels, stride) of the 13 depthwise-separable blocks
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU6()]


def mobilenet_v1(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224,
                 width: float = 1.0) -> nn.Sequential:
    if width not in (1.0, 0.75, 0.5, 0.25):
        raise ValueError(f"width must be one of 1.0, 0.75, 0.5, 0.25, got {width}")
    small = image_size < 64
    cin = int(32 * width)
    layers = _conv_bn(in_channels, cin, 3, 1 if small else 2)
    for i, (cout, stride) in enumerate(_BLOCKS):
        cout = int(cout * width)
        stride = 1 if small and i == 1 else stride
        layers += _conv_bn(cin, cin, 3, stride, groups=cin)  # depthwise
        layers += _conv_bn(cin, cout, 1, 1)  # pointwise
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
