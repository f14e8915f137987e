"""Blended layers: ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` computing with
``w' = (1 - α)·w + α·P(w)`` and a quantized input.

Each class takes exactly what its torch parent takes, plus keyword-only
``w_spec``/``a_spec``. :meth:`from_float` wraps an existing module and keeps
its Parameter objects, so an optimizer built before :func:`blendq.prepare`
still updates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .quantizers import ActQuantizer, ActSpec, WeightQuantizer, WeightSpec

__all__ = ["BlendLinear", "BlendConv1d", "BlendConv2d", "BlendMixin", "BLEND_MAP", "rebuild"]

_MODULE_STATE = {"_parameters", "_buffers", "_modules", "training"}


def rebuild(module: nn.Module, cls: type, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` instance holding ``module``'s attributes, Parameters and buffers (the same
    objects, not copies), without running ``cls.__init__``; ``drop`` names to leave out."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in module.__dict__.items()
                         if k not in _MODULE_STATE and k not in drop})
    new._parameters.update({k: v for k, v in module._parameters.items() if k not in drop})
    new._buffers.update({k: v for k, v in module._buffers.items() if k not in drop})
    new.training = module.training
    return new


class BlendMixin:
    """What every blended layer adds to its torch parent: α, the quantizers, forward."""

    alpha: Tensor
    w_quant: WeightQuantizer
    a_quant: ActQuantizer | None

    def __init__(self, *args, w_spec: WeightSpec | None = None, a_spec: ActSpec | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the torch parent's own signature
        self._setup(w_spec, a_spec)

    def _setup(self, w_spec: WeightSpec | None, a_spec: ActSpec | None) -> None:
        self.register_buffer("alpha", torch.zeros(()))
        self.w_quant = WeightQuantizer(w_spec or WeightSpec(), self.weight)
        self.a_quant = ActQuantizer(a_spec) if a_spec is not None else None

    @classmethod
    def from_float(
        cls, module: nn.Module, w_spec: WeightSpec, a_spec: ActSpec | None = None, name: str = ""
    ):
        """Wrap ``module`` (of the torch parent class); shares its Parameters and buffers."""
        new = rebuild(module, cls)
        new._setup(w_spec, a_spec)
        for quantizer in (new.w_quant, new.a_quant):
            if quantizer is not None:
                quantizer.name = name
                quantizer.to(module.weight.device).train(module.training)
        return new

    def to_float(self) -> nn.Module:
        """The plain torch module with the same Parameters (undoes ``from_float``)."""
        parent = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        return rebuild(self, parent, drop=("alpha",))

    def blended_weight(self) -> Tensor:
        return self.w_quant(self.weight, self.alpha)

    def blended_input(self, x: Tensor) -> Tensor:
        return x if self.a_quant is None else self.a_quant(x, self.alpha)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={float(self.alpha):.4g}"


class BlendLinear(BlendMixin, nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return TF.linear(self.blended_input(input), self.blended_weight(), self.bias)


class _BlendConv(BlendMixin):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.blended_input(input), self.blended_weight(), self.bias)


class BlendConv1d(_BlendConv, nn.Conv1d):
    pass


class BlendConv2d(_BlendConv, nn.Conv2d):
    pass


# Exact types only: a subclass of nn.Conv2d may change forward, so it is not swapped.
BLEND_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: BlendLinear,
    nn.Conv1d: BlendConv1d,
    nn.Conv2d: BlendConv2d,
}
