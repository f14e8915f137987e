"""What to quantize, at how many bits: :class:`QuantPolicy`.

A policy is frozen and validated on construction; :meth:`QuantPolicy.resolve`
maps it onto a model and fails when a rule or pattern matches no layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from . import methods
from .functional import check_bits, check_group_size, check_scale
from .layers import is_hf_conv1d, is_lora, layer_kind, lora_part
from .quantizers import ActSpec, WeightSpec, check_method

__all__ = ["QuantPolicy", "LayerPlan", "quantizable", "PLACEMENTS"]

PLACEMENTS = ("graph", "layers")
Bits = tuple[int, "int | None"]  # (w_bits, a_bits); a_bits None: the input stays float


def _pair(name: str, value) -> Bits | None:
    """Accept ``None``, ``bits`` (both) or ``(w_bits, a_bits)``; return a checked pair."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be bits or (w_bits, a_bits), got {value!r}")
    check_bits(f"{name}[0] (w_bits)", pair[0])
    check_bits(f"{name}[1] (a_bits)", pair[1], allow_none=True)
    return pair


@dataclass(frozen=True)
class LayerPlan:
    """The resolved quantization of one layer."""

    name: str
    w_spec: WeightSpec
    a_spec: ActSpec | None


@dataclass(frozen=True)
class QuantPolicy:
    """Bits, granularity and method for every weight layer of a model: Linear, Conv1d/2d/3d,
    ConvTranspose1d/2d/3d, their subclasses, Hugging Face ``Conv1D``, the projections of
    ``nn.MultiheadAttention`` and, when ``embedding`` is set, ``nn.Embedding``.

    Args:
        w_bits: default weight bits (1..8).
        a_bits: default input-activation bits (1..8), or ``None`` for float inputs.
        per_channel: one weight scale per output channel (else per layer).
        method: weight method, ``"ab"`` (alpha-blending), ``"ste"`` or ``"lsq"`` (learned
            step size).
        act_method: activation method, ``"ab"``, ``"ste"`` or ``"lsq"``. Default ``"ste"``:
            blending activations multiplies the backward signal by ``1 - α`` at
            every layer (docs/design.md).
        a_signed: activation grid, ``None`` to detect it from the first batch.
        binary_scale: 1-bit weights blend with ``mean|w|·sign(w)`` (docs/design.md).
        first_layer / depthwise / last_layer: ``(w_bits, a_bits)`` (or one int for
            both) for the first quantizable layer, depthwise convolutions and the
            last one (the paper keeps them at 8 bits); ``None``: no rule.
        overrides: ``{glob pattern on module name: bits or (w_bits, a_bits)}``,
            applied after the rules.
        skip: glob patterns of module names left in float.
        quant_every: recompute weight codes every this many steps (paper: ``f``).
        embedding: weight bits of ``nn.Embedding`` tables (their input is indices, so
            weights only); ``None`` keeps them float.
        placement: where activations are quantized. ``"graph"`` (default): each weight
            layer's input, and also the tensors an int8 runtime keeps in integers apart
            from weight layers: the inputs of residual adds, concatenations and average
            pools, found in a ``torch.fx`` capture of the model (so ``out += identity``
            inside a ``forward`` counts); each tensor is quantized once, and a layer
            reading a quantized tensor shares its scale. ``"layers"``: weight-layer
            inputs only (the placement of blendq 0.1; residual branches stay float).
        site_bits: bits of the activation sites apart from weight layers (default 8, the
            int8 runtime's); unused with ``placement="layers"`` or ``a_bits=None``.
        group_size: one weight scale per block of this many consecutive input elements
            of each output channel (input channels × kernel for convolutions; the last
            block holds the remainder where it does not divide), as torchao's int4
            weight-only QAT and GPTQ/AWQ checkpoints have it; a power of two >= 16
            (ONNX Runtime's 4-bit kernels take no other); replaces ``per_channel``.
            Layers at 1 bit (sign) keep their per-channel or per-layer scale. With
            ``a_bits=None`` and ``w_bits <= 4``, Linear and ``Conv1D`` layers export to
            ONNX Runtime's ``MatMulNBits`` (docs/int4.md).
        scale: where weight and activation scales come from. ``"ppq"`` (default): the
            least-squares projection (PPQ, the paper's Algorithm 2) of the weights, and an
            EMA of each batch's PPQ scale for activations. ``"minmax"``: TensorFlow's QAT
            (Jacob et al. 2018; Krishnamoorthi 2018; the paper's "TF" columns): weights
            from ``max|w|`` per layer, channel or block, activations from an EMA of each
            batch's largest magnitude, both onto the grid's top code (nothing clips);
            with ``method="ste"`` it is the baseline the paper compares with.
        int8_block_inputs: with ``group_size`` and ``a_bits=None``, Linear and ``Conv1D``
            layers round their input as ``MatMulNBits`` does at its fast accuracy level 4
            (int8, one scale ``max|x|/127`` per block of ``group_size`` inputs, computed
            at run time; straight-through gradient, blended with α), so a level-4 file
            computes what was trained (docs/int4.md).
        int8_matmul: with ``group_size``, ``a_bits=None`` and 2..4-bit weights, Linear and
            ``Conv1D`` layers are trained for an int8 matrix product, which runs a long
            prompt faster than a 4-bit kernel: each block scale a whole multiple
            (1..``2^(7 - w_bits)``, 8 at 4 bits) of one scale per output channel, so that
            codes times multiples are int8 weights, and the input rounded to int8 per row
            (token) at run time, ``max|x|/127`` (straight-through gradient, blended with
            α). Exported as ``MatMulInteger`` (docs/int4.md). Methods that learn their
            scale (``lsq``) are refused.

    Raises:
        ValueError: bits outside 1..8, an unknown method, a malformed rule; at
            :meth:`resolve`, a rule or pattern that matches no layer.
    """

    w_bits: int = 8
    a_bits: int | None = 8
    per_channel: bool = False
    method: str = "ab"
    act_method: str = "ste"
    a_signed: bool | None = None
    binary_scale: bool = True
    first_layer: int | Bits | None = None
    depthwise: int | Bits | None = None
    last_layer: int | Bits | None = None
    overrides: Mapping[str, int | Bits] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    quant_every: int = 1
    embedding: int | None = None
    placement: str = "graph"
    site_bits: int = 8
    group_size: int | None = None
    int8_block_inputs: bool = False
    scale: str = "ppq"
    int8_matmul: bool = False

    def __post_init__(self) -> None:
        check_bits("w_bits", self.w_bits)
        check_scale("scale", self.scale)
        check_group_size(self.group_size)
        if self.int8_block_inputs and (self.group_size is None or self.a_bits is not None):
            raise ValueError("int8_block_inputs rounds the float inputs of block-quantized "
                             "layers: it needs group_size and a_bits=None")
        if self.int8_matmul and (self.group_size is None or self.a_bits is not None or
                                 self.int8_block_inputs or not 2 <= self.w_bits <= 4):
            raise ValueError("int8_matmul trains block-quantized weights for an int8 matrix "
                             "product with inputs rounded per row: it needs group_size, "
                             "a_bits=None, w_bits 2..4 and not int8_block_inputs")
        check_bits("embedding", self.embedding, allow_none=True)
        check_bits("a_bits", self.a_bits, allow_none=True)
        for name in ("method", "act_method"):
            check_method(name, getattr(self, name))
        if self.int8_matmul and methods.get(self.method).learns_scale:
            raise ValueError(f"int8_matmul keeps block scales on whole multiples of a channel "
                             f"scale; method {self.method!r} learns its scale and cannot: "
                             "use 'ab' or 'ste'")
        for name in ("first_layer", "depthwise", "last_layer"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must map patterns to bits, got {self.overrides!r}")
        checked = tuple((p, _pair(f"overrides[{p!r}]", b)) for p, b in self.overrides.items())
        object.__setattr__(self, "overrides", dict(checked))
        if isinstance(self.skip, str):
            raise ValueError(f"skip must be a sequence of patterns, got the string {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.quant_every, int) or self.quant_every < 1:
            raise ValueError(f"quant_every must be an integer >= 1, got {self.quant_every!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        check_bits("site_bits", self.site_bits)

    @property
    def blends(self) -> bool:
        """Whether anything alpha-blends (weights or activations use ``"ab"``): then α
        starts at 0 and follows a schedule; otherwise it is 1 from the first forward."""
        return methods.get(self.method).blends or methods.get(self.act_method).blends

    def site_spec(self) -> ActSpec | None:
        """The activation spec of the sites apart from weight layers (``placement="graph"``);
        ``None`` where there are none (layer placement, or float activations)."""
        if self.placement != "graph" or self.a_bits is None or self.site_bits < 2:
            return None
        return ActSpec(bits=self.site_bits, signed=self.a_signed, method=self.act_method,
                       scale=self.scale)

    def __hash__(self) -> int:
        return hash((self.w_bits, self.a_bits, self.method, tuple(self.overrides.items())))

    def resolve(self, model: nn.Module) -> list[LayerPlan]:
        """One :class:`LayerPlan` per quantizable layer, in registration order."""
        candidates = quantizable(model)
        tables = [n for n, m in candidates if isinstance(m, nn.Embedding)]
        layers = [(n, m) for n, m in candidates if not isinstance(m, nn.Embedding)]
        if not layers:
            raise ValueError("model has no Linear, convolution or attention layer to quantize")
        self._check_patterns([n for n, _ in candidates])
        no_input = {n for n, m in candidates if _input_inside_parent(model, n)}
        bits = {n: (self.w_bits, self.a_bits) for n, _ in layers}
        dw = [n for n, m in layers if _is_depthwise(m)]
        rules = [
            ("first_layer", self.first_layer, [layers[0][0]]),
            ("depthwise", self.depthwise, dw),
            ("last_layer", self.last_layer, [layers[-1][0]]),
        ]
        for rule, pair, names in rules:
            if pair is None:
                continue
            if not names:
                raise ValueError(
                    f"{rule}={pair} matches no layer: the model has no "
                    "depthwise convolution (groups == in_channels > 1)"
                )
            bits.update({n: pair for n in names})
        if self.embedding is not None:
            bits.update({n: (self.embedding, None) for n in tables})
        for pattern, pair in self.overrides.items():
            bits.update({n: pair for n in bits if fnmatch.fnmatchcase(n, pattern)})
        for name in no_input:
            bits[name] = (bits[name][0], None)
        return [self._plan(n, *bits[n], matmul=_is_matmul(m)) for n, m in candidates
                if n in bits and not self._skipped(n)]

    def _plan(self, name: str, w_bits: int, a_bits: int | None,
              matmul: bool = False) -> LayerPlan:
        group = self.group_size if w_bits >= 2 else None
        w = WeightSpec(
            bits=w_bits,
            per_channel=self.per_channel or group is not None,
            group_size=group,
            int8_inputs=self.int8_block_inputs and matmul and group is not None
            and a_bits is None,
            int8_matmul=self.int8_matmul and matmul and group is not None and a_bits is None
            and 2 <= w_bits <= 4,
            method=self.method,
            binary_scale=self.binary_scale,
            quant_every=self.quant_every,
            scale=self.scale,
        )
        a = (
            None
            if a_bits is None
            else ActSpec(bits=a_bits, signed=self.a_signed, method=self.act_method,
                         scale=self.scale)
        )
        return LayerPlan(name, w, a)

    def _skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def _check_patterns(self, names: list[str]) -> None:
        for field_name, patterns in (("overrides", self.overrides), ("skip", self.skip)):
            for p in patterns:
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                    raise ValueError(
                        f"{field_name} pattern {p!r} matches no layer; "
                        f"quantizable layers are: {shown}"
                    )


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer blendq can quantize, in registration order. A
    LoRA wrapper's adapters (``lora_A``, ``lora_B``) are not layers of their own: they
    are trained through their base layer's merged weight, which is quantized once."""
    wrappers = [n for n, m in model.named_modules() if is_lora(m)]
    return [(n, m) for n, m in model.named_modules() if not isinstance(layer_kind(m), str)
            and not (wrappers and lora_part(n, wrappers))]


def _input_inside_parent(model: nn.Module, name: str) -> bool:
    """The output projection of ``nn.MultiheadAttention``: its input is computed inside
    the attention's forward, so only its weight is quantized."""
    parent = name.rpartition(".")[0]
    return bool(name) and isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def _is_matmul(m: nn.Module) -> bool:
    """A layer whose input is a matmul's: Linear (and subclasses) or Hugging Face Conv1D."""
    return isinstance(m, nn.Linear) or is_hf_conv1d(m)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
