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


def converted_and_exported(model: nn.Module, x: torch.Tensor, path):
    """``convert`` of a copy of ``model`` (checked bit for bit against its α = 1 view)
    and ONNX Runtime's output on ``x`` from its export to ``path``; returns
    ``(alpha_one_output, onnx_runtime_output)``."""
    import copy

    import blendq
    from blendq.export import export_onnx, onnx_session, run_onnx

    with blendq.quantized(model) as alpha_one:
        ref = alpha_one(x)
    converted = blendq.convert(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(converted(x), ref)
    return ref, run_onnx(onnx_session(export_onnx(converted, path, x)), x)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return small_cnn()


@pytest.fixture
def images():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
