import pytest
import torch
from torch import nn


def small_cnn(in_ch: int = 3, classes: int = 10) -> nn.Sequential:
    """Conv, depthwise conv, grouped conv, conv1d-free CNN with BN and a Linear head."""
    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return small_cnn()


@pytest.fixture
def images():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
