"""Converted layers: integer codes and float scales, no full-precision weight.

A converted layer is its float class with :class:`QuantMixin` in front, like a blended
one: the weight attribute is a property returning ``scale * codes`` from int8 storage,
exactly as the blended layer computes it at α = 1, the bias property returns the bias
in whole accumulator units, and the float class's own ``forward`` runs on the
quantized input. In the state dict, codes of 4 bits or fewer are stored packed (two
per byte; eight per byte for 1-bit signs).

For export, :meth:`QuantMixin.set_deploy` switches the properties to the standard
quantize/dequantize operators (``torch.ops.quantized_decomposed``) that
``torch.export`` captures and the PyTorch ONNX exporter turns into
QuantizeLinear/DequantizeLinear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F
from .layers import (
    BlendMixin,
    BlendSite,
    LayerKind,
    bias_unit,
    integer_core,
    integer_core_applies,
    rebuild,
    rounded_bias,
    shared_input,
    specialise,
)
from .quantizers import runtime_applies, runtime_value

__all__ = ["QuantMixin", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d",
           "quant_class", "Deploy", "QuantSite"]


class Deploy:
    """How a converted layer computes in an exported graph (set by :meth:`set_deploy`):
    weight and input grids, the weight's output-channel axis, the input scale, whether
    the bias is int32 accumulator units, and whether the codes are stored packed. The
    tensors are buffers of the layer: ``deploy_codes`` (int8, or uint8 packed),
    ``deploy_scale`` (float32 per output channel: batch norm after the layer folded in,
    its sign moved into the codes), ``deploy_bias`` (int32 units or float) and
    ``deploy_bias_scale``."""

    def __init__(self, w_bits: int, a_bits: int | None, a_signed: bool | None,
                 a_scale: float, axis: int, shape: tuple[int, ...], integer_bias: bool,
                 packed: bool, group_size: int | None = None) -> None:
        self.w_bits, self.a_bits, self.a_signed, self.a_scale = w_bits, a_bits, a_signed, a_scale
        self.axis, self.shape, self.integer_bias, self.packed = axis, shape, integer_bias, packed
        # block scales: codes and scale as converted.block_storage lays them out (``shape``
        # is that 2-D shape), blocks along ``block_axis``; ``weight_shape``: the layer's
        # own weight shape (set by capture)
        self.group_size, self.block_axis, self.weight_shape = group_size, 0, shape


def _qd():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the operators)

    return torch.ops.quantized_decomposed


class QuantMixin:
    """Buffers ``weight_codes`` (int8), ``weight_scale``; input ``act_scale`` and grid."""

    weight_codes: Tensor
    weight_scale: Tensor
    bias_folded = False  # a FoldedBatchNorm right after rounds the folded bias instead
    round_bias = True
    deploy: Deploy | None = None
    group_size: int | None = None  # block scales: ``weight_scale`` is (rows, blocks)
    int8_inputs = False  # the float input rounded as the 4-bit kernel's level 4 does
    int8_matmul = False  # block scales multiples of a channel unit, input int8 per row
    # the dtype of the dequantized weight: the blended layer's (a bfloat16 model computes
    # in bfloat16); follows ``.to(dtype)``/``.float()`` of the model (``_apply``)
    compute_dtype = torch.float32
    _kind: LayerKind

    @classmethod
    def from_blend(cls, layer: BlendMixin):
        """Freeze a blended layer at α = 1 into codes and scales."""
        weight_name = layer._kind.weight
        new = rebuild(layer, cls, drop=(weight_name, "bias", "alpha"))
        for name in ("w_quant", "a_quant"):
            new._modules.pop(name, None)
        new.training = False
        latent = layer.latent_weight()
        codes, scale = layer.w_quant.eval_projection(latent)
        new.compute_dtype = latent.dtype
        bias = layer._parameters.get("bias")
        if "bias" in layer._parameters:  # set directly: ``bias`` is already a property
            new._parameters["bias"] = None if bias is None else \
                nn.Parameter(bias.detach().clone())
        new.register_buffer("weight_codes", codes.detach().to(torch.int8))
        new.register_buffer("weight_scale", scale.detach().float().clone())
        new.w_bits = layer.w_quant.spec.bits
        new.per_channel = layer.w_quant.spec.per_channel
        new.group_size = layer.w_quant.spec.group_size
        new.int8_inputs = layer.w_quant.spec.int8_inputs
        new.int8_matmul = layer.w_quant.spec.int8_matmul
        a = layer.a_quant
        new.a_bits = None if a is None else a.spec.bits
        new.a_signed = None if a is None else a.is_signed
        act_scale = torch.ones(()) if a is None else a.current_scale().detach().clone()
        new.register_buffer("act_scale", act_scale)
        return new

    def weight_value(self) -> Tensor:
        """The dequantized weight ``scale * codes`` (in export, a dequantize operator)."""
        d = self.deploy
        if d is None:
            scale = self.weight_scale
            if self.group_size is not None:
                scale = F.expand_blocks(scale, tuple(self.weight_codes.shape), self._kind.axis,
                                        self.group_size)
            return (scale * self.weight_codes.to(scale.dtype)).to(self.compute_dtype)
        codes = F.unpack_codes(self.deploy_codes, d.w_bits, d.shape) if d.packed else \
            self.deploy_codes
        if d.group_size is not None:  # stored as block_storage lays it out
            value = dequantize_blocks(codes, self.deploy_scale, d.group_size, d.block_axis)
            return weight_from_storage(value, d.weight_shape, d.axis)
        qmin, qmax = F.grid(d.w_bits)
        zero = torch.zeros_like(self.deploy_scale, dtype=torch.int32)
        return _qd().dequantize_per_channel(codes, self.deploy_scale, zero, d.axis,
                                            qmin, qmax, torch.int8)

    def accumulator_unit(self) -> Tensor | None:
        """``γ_w·γ_a`` per output channel (float64) where the bias is added to an integer
        accumulator; ``None`` for a float or sign input, block scales, or a layer of
        another shape."""
        if self.group_size is not None:
            return None
        return bias_unit(self._kind, self.a_bits, self.a_signed, self.weight_scale,
                         self.act_scale)

    def layer_bias(self) -> Tensor | None:
        """The bias rounded to whole accumulator units (as the α = 1 layer evaluates); in
        export, int32 units behind a dequantize operator."""
        d = self.deploy
        if d is None:
            return rounded_bias(self, None)
        bias = self._buffers.get("deploy_bias")
        if bias is None or not d.integer_bias:
            return bias
        zero = torch.zeros_like(bias)
        return _qd().dequantize_per_channel(bias, self.deploy_bias_scale, zero, 0,
                                            -2**31, 2**31 - 1, torch.int32)

    def quantized_input(self, x: Tensor) -> Tensor:
        if self.a_bits is None:
            if not (self.int8_inputs or self.int8_matmul):
                return x
            block = x.shape[-1] if self.int8_matmul else self.group_size
            if self.deploy is not None:  # one operator the ONNX export can hand to the kernel
                return int8_blocks(x, block)
            return F.int8_blocks(x, block)
        if self.deploy is not None:
            return _deploy_input(x, self.deploy)
        return _quantized(x, self.act_scale, self.a_bits, self.a_signed)

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        # a dtype conversion of the model converts the dequantized weight with it
        self.compute_dtype = fn(torch.empty((), dtype=self.compute_dtype)).dtype
        return module

    def set_deploy(self, deploy: Deploy, codes: Tensor, scale: Tensor, bias: Tensor | None,
                   bias_scale: Tensor | None) -> None:
        """Compute with standard quantize/dequantize operators from these tensors (made
        by ``blendq.export``); the eager buffers are dropped (this is a copy for export)."""
        for name in ("weight_codes", "weight_scale", "act_scale"):
            self._buffers.pop(name, None)
        self._parameters.pop("bias", None)
        self.register_buffer("deploy_codes", codes)
        self.register_buffer("deploy_scale", scale)
        self.register_buffer("deploy_bias", bias)
        self.register_buffer("deploy_bias_scale", bias_scale)
        self.deploy = deploy

    def forward(self, input: Tensor, *args, **kwargs):
        x = self.quantized_input(input)
        if not (args or kwargs) and self.deploy is None and \
                integer_core_applies(self, x, self.a_bits, self.a_signed, self.group_size):
            # on the integer codes, as the α = 1 blended layer evaluates (bit for bit)
            return integer_core(self, x, self.act_scale, self.weight_codes,
                                self.weight_scale, F.grid(self.a_bits, self.a_signed, True),
                                lambda: super(QuantMixin, self).forward(x))
        return super().forward(x, *shared_input(self, input, x, args, kwargs), **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight_codes"
        if key in destination and self.w_bits <= 4:
            destination[key] = F.pack_codes(self.weight_codes, self.w_bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_codes"
        stored = state_dict.get(key)
        if stored is not None and stored.dtype == torch.uint8:
            state_dict[key] = F.unpack_codes(stored, self.w_bits, self.weight_codes.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_layer"
        if self.group_size is not None:
            gran = f"group_size={self.group_size}"
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, {gran}"


@torch.library.custom_op("blendq::dequantize_blocks", mutates_args=())
def dequantize_blocks(codes: Tensor, scale: Tensor, block_size: int, axis: int) -> Tensor:
    """``scale · codes`` of a 2-D int8 ``codes`` whose scale changes every ``block_size``
    elements along ``axis`` (``scale``: ``codes``' shape with that dimension
    ``ceil(n / block_size)``). One operator in a captured graph, which the ONNX export
    writes as ``DequantizeLinear`` with ``block_size`` (opset 21)."""
    per_element = scale.repeat_interleave(block_size, dim=axis)
    per_element = per_element.narrow(axis, 0, codes.shape[axis])
    return per_element * codes.to(scale.dtype)


@dequantize_blocks.register_fake
def _(codes: Tensor, scale: Tensor, block_size: int, axis: int) -> Tensor:
    return codes.new_empty(codes.shape, dtype=scale.dtype)


@torch.library.custom_op("blendq::int8_blocks", mutates_args=())
def int8_blocks(x: Tensor, block: int) -> Tensor:
    """:func:`blendq.functional.int8_blocks` as one operator of a captured graph: the ONNX
    export gives it to a following ``MatMulNBits`` at accuracy level 4 (whose own input
    rounding it is) or writes it out in standard operators."""
    return F.int8_blocks(x, block)


@int8_blocks.register_fake
def _(x: Tensor, block: int) -> Tensor:
    return torch.empty_like(x)


def block_storage(codes: Tensor, scale: Tensor, axis: int) -> tuple[Tensor, Tensor, int]:
    """``(codes, scale, block axis)`` of a block-quantized weight (codes shaped like the
    weight, ``scale`` ``(rows, blocks)``) in the 2-D layout a runtime's 4-bit matmul
    reads, blocks along the input dimension: a Linear's ``W^T`` ``[in, out]`` (the graph
    transposes it back for ``linear``, so ONNX Runtime sees ``DequantizeLinear ->
    MatMul``), Hugging Face ``Conv1D``'s own ``[in, out]``; other layers ``(rows, K)``."""
    if codes.dim() == 2:  # [in, out]: Conv1D's own layout, a Linear's transposed
        in_out = codes if axis == 1 else codes.t()
        return in_out.contiguous(), scale.t().contiguous(), 0
    rows = codes.shape[axis]
    return codes.movedim(axis, 0).reshape(rows, -1).contiguous(), scale, 1


def weight_from_storage(value: Tensor, shape: tuple[int, ...], axis: int) -> Tensor:
    """The weight of ``shape`` from its :func:`block_storage` layout."""
    if len(shape) == 2:
        return value.t() if axis == 0 else value
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return value.reshape(moved).movedim(0, axis)


def _deploy_input(x: Tensor, d: Deploy) -> Tensor:
    """The input on its grid, as standard operators: ``Where`` for signs; else quantize
    and dequantize as uint8, zero point 0 for unsigned grids and 128 for signed ones
    (codes ``q + 128``, the same values: x86 runtimes run their int8 kernels from uint8
    activations), after a clamp where the grid is narrower than 8 bits (a runtime fuses
    no kernel across a clamp, so 8-bit grids are the whole storage range)."""
    s = d.a_scale
    if F.is_sign(d.a_bits, d.a_signed):
        return torch.where(x >= 0, s, -s).to(x.dtype)
    qmin, qmax = F.grid(d.a_bits, d.a_signed, full=True)
    zero = F.stored_zero(d.a_signed)
    if qmin + zero > 0 or qmax + zero < 255:
        x = x.clamp(qmin * s, qmax * s)
    q = _qd().quantize_per_tensor(x, s, zero, 0, 255, torch.uint8)
    return _qd().dequantize_per_tensor(q, s, zero, 0, 255, torch.uint8)


def _quantized(x: Tensor, act_scale: Tensor, bits: int, signed: bool) -> Tensor:
    """``x`` on its grid as the α = 1 blended model evaluates it: rounded as the int8
    runtime does where that applies (:func:`blendq.quantizers.runtime_value`)."""
    if not F.is_sign(bits, signed) and runtime_applies(x):
        return runtime_value(x, act_scale, bits, signed)
    scale = act_scale.to(x.dtype)
    return scale * F.quantize(x, scale, bits, signed, full=True)


_QUANT_CLASSES: dict[tuple, type] = {}


def quant_class(layer: BlendMixin) -> type:
    """The converted class for a blended layer."""
    kind = layer._kind
    return specialise(QuantMixin, kind.base, "Quant", kind, _QUANT_CLASSES, "weight_value",
                      "layer_bias")


def _plain(cls: type) -> type:
    return specialise(QuantMixin, cls, "Quant", LayerKind(cls, "weight", 0, True, True),
                      _QUANT_CLASSES, "weight_value", "layer_bias")


QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d = (
    _plain(c) for c in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


class QuantSite(nn.Module):
    """A :class:`blendq.layers.BlendSite` frozen at α = 1: ``act_scale`` and the grid.
    In export (``deploy`` set) the quantization is a quantize/dequantize pair."""

    deploy: Deploy | None = None

    def __init__(self, a_bits: int, a_signed: bool, act_scale: Tensor) -> None:
        super().__init__()
        self.a_bits, self.a_signed = a_bits, a_signed
        self.register_buffer("act_scale", act_scale)

    @classmethod
    def from_blend(cls, site: BlendSite) -> QuantSite:
        a = site.a_quant
        return cls(a.spec.bits, a.is_signed, a.current_scale().detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy is not None:
            return _deploy_input(x, self.deploy)
        return _quantized(x, self.act_scale, self.a_bits, self.a_signed)

    def set_deploy(self) -> None:
        """Compute with standard quantize/dequantize operators (a copy for export)."""
        self.deploy = Deploy(8, self.a_bits, self.a_signed, float(self.act_scale), 0, (), False,
                             False)

    def extra_repr(self) -> str:
        return f"a_bits={self.a_bits}, signed={self.a_signed}"
