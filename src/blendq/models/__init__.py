"""The paper's networks and small ones for the bundled data, by name.

``build_model(name, in_channels=..., num_classes=..., image_size=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .binarynet import binarynet
from .mobilenet import mobilenet_v1
from .resnet import resnet50_v1, resnet50_v2
from .small import digits_cnn, fmnist_cnn

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "fmnist_cnn": fmnist_cnn,
    "binarynet": binarynet,
    "mobilenet_v1": mobilenet_v1,
    "resnet50_v1": resnet50_v1,
    "resnet50_v2": resnet50_v2,
}


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                **kwargs) -> nn.Module:
    """Instantiate a registered model; unknown names list the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes,
                        image_size=image_size, **kwargs)
