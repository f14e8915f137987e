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

from . import functional as F
from .quantizers import ActQuantizer, ActSpec, WeightQuantizer, WeightSpec

__all__ = ["BlendLinear", "BlendConv1d", "BlendConv2d", "BlendMixin", "BLEND_MAP", "rebuild",
           "FoldedBatchNorm1d", "FoldedBatchNorm2d", "FOLDED_BN_MAP", "bn_affine"]

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
    bias_folded = False  # a FoldedBatchNorm right after rounds the folded bias instead

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

    def accumulator_unit(self) -> Tensor | None:
        """``γ_w·γ_a`` per output channel (float64), as evaluation computes it, where the
        layer runs on an integer grid; ``None`` for a float or sign (±1) input, which
        runtimes compute with a float bias, or an activation scale never calibrated."""
        a = self.a_quant
        if a is None or (a.spec.bits == 1 and a.is_signed) or not bool(a.initialized):
            return None
        return self.w_quant.eval_projection(self.weight)[1].double().reshape(-1) * \
            a.scale.double()

    def layer_bias(self) -> Tensor | None:
        """The bias added. In evaluation it is blended toward whole accumulator units,
        ``b + α·(R(b) - b)``, as int8 runtimes add it to the int32 accumulator (unless
        a batch norm right after does that for the folded bias)."""
        return rounded_bias(self, self.alpha) if not self.training else self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={float(self.alpha):.4g}"


def rounded_bias(layer: nn.Module, alpha: Tensor | None) -> Tensor | None:
    """``layer``'s bias in whole accumulator units, blended by ``alpha`` (``None``: fully);
    the bias as is where a batch norm after the layer rounds instead, or no unit applies."""
    bias = layer.bias
    if bias is None or layer.bias_folded:
        return bias
    unit = layer.accumulator_unit()
    if unit is None:
        return bias
    rounded = F.round_bias(bias.detach(), unit).to(bias.dtype)
    return rounded if alpha is None else torch.lerp(bias, rounded, alpha.to(bias.dtype))


class BlendLinear(BlendMixin, nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return TF.linear(self.blended_input(input), self.blended_weight(), self.layer_bias())


class _BlendConv(BlendMixin):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.blended_input(input), self.blended_weight(),
                                  self.layer_bias())


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


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Batch norm in evaluation as ``k·x + t`` per channel, float64 (running statistics)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    weight = torch.ones_like(var) if bn.weight is None else bn.weight.detach().double()
    bias = torch.zeros_like(var) if bn.bias is None else bn.bias.detach().double()
    k = weight / torch.sqrt(var + bn.eps)
    return k, bias - mean * k


class _FoldedBatchNorm:
    """A batch norm right after a quantized layer (linked by ``prepare``/``convert``;
    the link is ``producer``, not a submodule). Export folds it into that layer: one
    rescale ``k·γ_w·γ_a`` and one bias ``k·b + t`` per channel. In evaluation it rounds
    that folded bias to whole accumulator units (blended with the layer's α), as int8
    runtimes do, so the α = 1 model computes what they compute. Training is untouched.
    """

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        layer = self.__dict__.get("producer")
        if self.training or layer is None or self.running_mean is None:
            return out
        unit = layer.accumulator_unit()
        if unit is None:
            return out
        k, t = bn_affine(self)
        if layer.bias is not None:
            t = k * layer.bias.detach().double() + t
        delta = (F.round_bias(t, k * unit) - t).to(out.dtype)
        alpha = getattr(layer, "alpha", None)
        if alpha is not None:
            delta = delta * alpha.to(out.dtype)
        return out + delta.reshape(1, -1, *([1] * (out.dim() - 2)))


class FoldedBatchNorm1d(_FoldedBatchNorm, nn.BatchNorm1d):
    pass


class FoldedBatchNorm2d(_FoldedBatchNorm, nn.BatchNorm2d):
    pass


FOLDED_BN_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FoldedBatchNorm1d,
    nn.BatchNorm2d: FoldedBatchNorm2d,
}
