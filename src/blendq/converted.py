"""Converted layers: integer codes and float scales, no full-precision weight.

``QuantConv2d`` and friends subclass their torch parent and keep its forward
code path; only the weight is rebuilt as ``scale * codes`` from int8 storage,
exactly as the blended layer computes it at α = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import functional as F
from .layers import BlendConv1d, BlendConv2d, BlendLinear, BlendMixin, rebuild, rounded_bias

__all__ = ["QuantMixin", "QuantLinear", "QuantConv1d", "QuantConv2d", "QUANT_MAP"]


class QuantMixin:
    """Buffers ``weight_codes`` (int8), ``weight_scale``; input ``act_scale`` and grid."""

    weight_codes: Tensor
    weight_scale: Tensor
    bias_folded = False  # a FoldedBatchNorm right after rounds the folded bias instead

    @classmethod
    def from_blend(cls, layer: BlendMixin):
        """Freeze a blended layer at α = 1 into codes and scales."""
        new = rebuild(layer, cls, drop=("weight", "bias", "alpha"))
        new.training = False
        codes, scale = layer.w_quant.eval_projection(layer.weight)
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        new.register_parameter("bias", bias)
        new.register_buffer("weight_codes", codes.detach().to(torch.int8))
        new.register_buffer("weight_scale", scale.detach().float().clone())
        new.w_bits = layer.w_quant.spec.bits
        new.per_channel = layer.w_quant.spec.per_channel
        a = layer.a_quant
        new.a_bits = None if a is None else a.spec.bits
        new.a_signed = None if a is None else a.is_signed
        act_scale = torch.ones(()) if a is None else a.scale.detach().clone()
        new.register_buffer("act_scale", act_scale)
        return new

    def weight_value(self) -> Tensor:
        """The dequantized weight ``scale * codes``."""
        return self.weight_scale * self.weight_codes.to(self.weight_scale.dtype)

    def accumulator_unit(self) -> Tensor | None:
        """``γ_w·γ_a`` per output channel (float64); ``None`` for a float or sign input."""
        if self.a_bits is None or (self.a_bits == 1 and self.a_signed):
            return None
        return self.weight_scale.double().reshape(-1) * self.act_scale.double()

    def layer_bias(self) -> Tensor | None:
        """The bias rounded to whole accumulator units (as the α = 1 layer evaluates)."""
        return rounded_bias(self, None)

    def quantized_input(self, x: Tensor) -> Tensor:
        if self.a_bits is None:
            return x
        scale = self.act_scale.to(x.dtype)
        return scale * F.quantize(x, scale, self.a_bits, self.a_signed)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_layer"
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, {gran}"


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        x = self.quantized_input(input)
        return TF.linear(x, self.weight_value().to(x.dtype), self.layer_bias())


class _QuantConv(QuantMixin):
    def forward(self, input: Tensor) -> Tensor:
        x = self.quantized_input(input)
        return self._conv_forward(x, self.weight_value().to(x.dtype), self.layer_bias())


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


QUANT_MAP: dict[type[nn.Module], type[nn.Module]] = {
    BlendLinear: QuantLinear,
    BlendConv1d: QuantConv1d,
    BlendConv2d: QuantConv2d,
}
