"""Blended layers: any weight layer computing with ``w' = (1 - α)·w + α·P(w)`` and a
quantized input.

A blended layer is its float class with :class:`BlendMixin` in front
(``blend_class(nn.Conv2d)`` is ``BlendConv2d``). The mixin turns the layer's
weight attribute (``weight``, or ``in_proj_weight`` of ``nn.MultiheadAttention``)
into a property that returns the blended weight, and its ``bias`` into the bias
evaluation adds, then runs the float class's own ``forward`` on the quantized
input. So a subclass's computation is kept as it is (timm's ``Conv2dSame`` pads,
``StdConv2d`` standardises the blended weight), and the state dict keeps the float
model's keys: the Parameters stay in ``_parameters`` under their own names (the
mechanism of ``torch.nn.utils.parametrize``, without its renaming of the keys).

Each class takes exactly what its float parent takes, plus keyword-only
``w_spec``/``a_spec``. :meth:`BlendMixin.from_float` wraps an existing module and
keeps its Parameter objects, so an optimizer built before :func:`blendq.prepare`
still updates them.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import functional as F
from . import methods
from .quantizers import (
    ActQuantizer,
    ActSpec,
    DeviceConstants,
    WeightQuantizer,
    WeightSpec,
    _is_dtensor,
    offer_runtime_add,
    offer_runtime_output,
)

__all__ = ["link_holds", "linked_producer", "bias_unit", "runtime_add", "deploy_fold",
           "bias_units",
           "BlendLinear", "BlendConv1d", "BlendConv2d", "BlendConv3d", "BlendMixin",
           "blend_class", "layer_kind", "LayerKind", "rebuild", "is_hf_conv1d",
           "FoldedBatchNorm1d", "FoldedBatchNorm2d", "FOLDED_BN_MAP", "bn_affine", "BlendSite",
           "BiasRounding", "integer_core", "integer_core_applies", "is_lora", "lora_part",
           "LoraDelta", "merged_lora_class"]

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
    new._modules.update(module._modules)
    new.training = module.training
    return new


# ---------------------------------------------------------------------------
# What kind of weight layer a module is


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear with its weight stored ``(in, out)``."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TORCH_BASES = (nn.Linear, *_CONV, *_CONV_T, nn.Embedding, nn.MultiheadAttention)


class LayerKind:
    """How blendq treats one weight layer: the float base class whose math it has, the
    weight attribute, the weight axis of output channels, and whether the bias is added
    to an integer accumulator (``integer_bias``: the base's own forward, groups 1 for
    transposed convolutions), so whole-unit bias rounding applies."""

    def __init__(self, base: type, weight: str, axis: int, integer_bias: bool,
                 has_input: bool) -> None:
        self.base, self.weight, self.axis = base, weight, axis
        self.integer_bias, self.has_input = integer_bias, has_input


def layer_kind(module: nn.Module) -> LayerKind | str:
    """The :class:`LayerKind` of ``module``, or why it is not quantizable (a string)."""
    cls = type(module)
    if issubclass(cls, BlendMixin):
        return cls._kind
    if is_hf_conv1d(module):
        return LayerKind(cls, "weight", 1, False, True)
    base = next((b for b in _TORCH_BASES if isinstance(module, b)), None)
    if base is None:
        return "not a Linear, convolution, embedding or attention layer"
    own_forward = cls.forward is base.forward
    if base is nn.MultiheadAttention:
        if not module._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim or vdim != embed_dim)"
        return LayerKind(cls, "in_proj_weight", 0, False, True)
    if base is nn.Embedding:
        return LayerKind(cls, "weight", 0, False, False)
    if base in _CONV_T:
        return LayerKind(cls, "weight", 1, own_forward and module.groups == 1, True)
    if base in _CONV and module.padding_mode != "zeros":
        own_forward = False  # the padding is applied apart from the convolution
    return LayerKind(cls, "weight", 0, own_forward, True)


# ---------------------------------------------------------------------------
# Blended layers


class BlendMixin:
    """What every blended layer adds to its float parent: α, the quantizers, the weight
    and bias properties, and a forward that quantizes the input first."""

    alpha: Tensor
    w_quant: WeightQuantizer
    a_quant: ActQuantizer | None
    bias_folded = False  # a FoldedBatchNorm right after rounds the folded bias instead
    round_bias = True  # False: the float-bias view (``blendq.transform.float_bias``)
    # True: the input arrives quantized by a BlendSite whose quantizer ``a_quant`` is
    # (set by ``blendq.placement``); the layer then passes it on as it is
    input_from_site = False
    _kind: LayerKind

    def __init__(self, *args, w_spec: WeightSpec | None = None, a_spec: ActSpec | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the float parent's own signature
        self._setup(w_spec, a_spec)

    def _setup(self, w_spec: WeightSpec | None, a_spec: ActSpec | None) -> None:
        self.register_buffer("alpha", torch.zeros(()))
        self.w_quant = WeightQuantizer(w_spec or WeightSpec(), self.float_weight,
                                       axis=self._kind.axis)
        self.a_quant = ActQuantizer(a_spec) if a_spec is not None and \
            self._kind.has_input else None
        self._blendq_ready = True  # the weight and bias properties apply from here

    @classmethod
    def from_float(cls, module: nn.Module, w_spec: WeightSpec, a_spec: ActSpec | None = None,
                   name: str = ""):
        """Wrap ``module`` (of the float parent class); shares its Parameters and buffers."""
        new = rebuild(module, cls)
        new._setup(w_spec, a_spec)
        for quantizer in (new.w_quant, new.a_quant):
            if quantizer is not None:
                quantizer.name = name
                quantizer.to(new.float_weight.device).train(module.training)
        return new

    def to_float(self) -> nn.Module:
        """The plain float module with the same Parameters (undoes ``from_float``)."""
        float_module = rebuild(self, self._kind.base, drop=("alpha", "_blendq_ready"))
        for name in ("w_quant", "a_quant"):
            float_module._modules.pop(name, None)
        return float_module

    @property
    def float_weight(self) -> Tensor:
        """The full-precision (latent) weight Parameter."""
        return self._parameters[self._kind.weight]

    def latent_weight(self) -> Tensor:
        """The weight the quantizer projects: the float weight, plus the LoRA adapters'
        delta ``s·B·A`` where the layer is the base of a LoRA wrapper (``weight_delta``,
        set by ``prepare``), so what is quantized is the merged weight a deployment
        computes with. Outside a recorded training step the merged tensor is kept while
        the weight and adapters are unchanged (their version counters), so evaluation's
        projection cache sees one tensor."""
        w, delta = self.float_weight, self.__dict__.get("weight_delta")
        if delta is None:
            return w
        if torch.compiler.is_compiling() or self.training and torch.is_grad_enabled():
            return w + delta().to(w.dtype)  # a training step: A and B get gradients
        key = (w.data_ptr(), w._version, *delta.versions())
        self.w_quant.source_key = key  # the eval projection's cache knows what it read
        if torch.is_grad_enabled():  # evaluation with gradients to A and B
            return w + delta().to(w.dtype)
        kept = self.__dict__.get("_merged")
        if kept is None or kept[0] != key:
            with torch.no_grad():
                kept = (key, w + delta().to(w.dtype))
            self.__dict__["_merged"] = kept
        return kept[1]

    def blended_weight(self) -> Tensor:
        return self.w_quant(self.latent_weight(), self.alpha)

    def blended_input(self, x: Tensor) -> Tensor:
        if self.a_quant is None:
            spec = self.w_quant.spec
            if spec.int8_matmul:  # per row, as the int8 matmul's input is rounded
                return methods.get("ste").mix(x, F.int8_rows(x.detach()), self.alpha)
            if not spec.int8_inputs:
                return x
            rounded = F.int8_blocks(x.detach(), spec.group_size)  # as the 4-bit kernel
            return methods.get("ste").mix(x, rounded, self.alpha)
        if self.input_from_site:
            return x
        return self.a_quant(x, self.alpha)

    def forward(self, input: Tensor, *args, **kwargs):
        x = self.blended_input(input)
        if not (args or kwargs):
            exact = self.integer_forward(x)
            if exact is not None:
                return exact
        return super().forward(x, *shared_input(self, input, x, args, kwargs), **kwargs)

    def integer_forward(self, x: Tensor) -> Tensor | None:
        """In evaluation at α = 1, the layer on the integer codes as an int8 runtime
        computes it (:func:`integer_core`); ``None`` where that does not apply (training,
        α < 1, or what :func:`integer_core` leaves out)."""
        a = self.a_quant
        if self.training or a is None or not a._initialized or \
                not integer_core_applies(self, x, a.spec.bits, a.is_signed,
                                         self.w_quant.spec.group_size) or \
                not bool(self.alpha == 1):
            return None
        codes, w_scale = self.w_quant.eval_projection(self.latent_weight())
        return integer_core(self, x, a.current_scale(), codes, w_scale,
                            F.grid(a.spec.bits, a.is_signed, full=True),
                            lambda: super(BlendMixin, self).forward(x))

    def accumulator_unit(self) -> Tensor | None:
        """``γ_w·γ_a`` per output channel (float64) where the layer adds its bias to an
        integer accumulator: in training the scales this step's forward uses, in
        evaluation those of the current weight's projection. ``None`` for a float or
        sign (±1) input, which runtimes compute with a float bias, scales not yet
        known, or a layer whose forward is not the plain matmul/convolution."""
        a = self.a_quant
        if a is None or self.w_quant.spec.group_size is not None or \
                bias_unit(self._kind, a.spec.bits, a.is_signed) is None:
            return None  # (block scales: no single unit per output channel)
        if self.training:  # the input was quantized first in this forward: its scale is set
            if not self.w_quant._ready:
                return None
            w_scale = self.w_quant.current_scale()
        else:
            if not bool(a.initialized):
                return None
            w_scale = self.w_quant.eval_projection(self.latent_weight())[1]
        return bias_unit(self._kind, a.spec.bits, a.is_signed, w_scale, a.current_scale())

    def layer_bias(self) -> Tensor | None:
        """The bias added: blended toward whole accumulator units with α,
        ``b + α·(R(b) - b)``, as int8 runtimes add it to the int32 accumulator, in
        training as in evaluation (unless a batch norm right after rounds the folded
        bias instead). AB's gradient to ``b`` is ``1 - α`` (the blend, as for the
        weight); STE's passes straight through."""
        return rounded_bias(self, self.alpha)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={float(self.alpha):.4g}"


# ---------------------------------------------------------------------------
# The α = 1 layer on integer codes


def integer_core_applies(layer: nn.Module, x: Tensor, a_bits: int | None,
                         a_signed: bool | None, group_size: int | None) -> bool:
    """Whether :func:`integer_core` computes ``layer`` on ``x``: a float32/64 input on
    an integer grid, outside autocast and a graph torch.compile traces (both compute
    the float way), on a device with float64 (not MPS); one weight scale per output
    channel or layer (no blocks); the plain matmul, or a (not transposed) convolution
    whose ``_conv_forward`` is torch's own (a subclass that transforms the weight there,
    e.g. standardises it, keeps its float computation)."""
    base = layer._kind.base
    if not layer._kind.integer_bias or issubclass(base, _CONV_T) or group_size is not None \
            or not F.integer_input(a_bits, a_signed) or \
            x.dtype not in (torch.float32, torch.float64) or x.device.type == "mps" or \
            torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False
    if issubclass(base, nn.Linear):
        return True
    torch_conv = next(c for c in _CONV if issubclass(base, c))
    return base._conv_forward is torch_conv._conv_forward


# float32 sums below this are exact however the CPU's convolution orders or transforms
# them (a Winograd transform's rounding stays far below half a unit); above it, and on
# CUDA (TF32, Winograd/FFT algorithms), the sums run in float64
_FLOAT32_EXACT = 2 ** 22


def integer_core(layer: nn.Module, x: Tensor, x_scale: Tensor, codes: Tensor,
                 w_scale: Tensor, grid: tuple[int, int], float_forward) -> Tensor:
    """``layer`` on its quantized input ``x`` as an int8 runtime computes it:
    ``(γ_w·γ_a)·(q_w ⋆ q_a) + b`` with the integer accumulator exact (computed in float32
    where it is bounded below 2^22 on a CPU, else in float64, and rounded to the integer
    it is), then one rescale per output channel and the bias (``layer``'s ``bias``: whole
    accumulator units), in ``x``'s dtype.

    Why: float32 sums of the dequantized products ``(γ_a·q_a)(γ_w·q_w)`` are off by
    ~1e-7 of their terms, and an activation on a coarse grid that lands that close to a
    rounding midpoint rounds the other way than in the runtime; at 4 bits one such code
    moves the next layer's inputs by a sizeable fraction of a step, and over a deep
    network the differences grow (docs/results.md, "Deployed = trained").

    With gradients recorded, the value is this one and the gradient that of the float
    computation (``float_forward()``, run only then)."""
    x_scale = x_scale.to(x.dtype)
    small = _largest_accumulator(layer, codes, max(map(abs, grid))) < _FLOAT32_EXACT
    dtype = x.dtype if small and x.device.type == "cpu" else torch.float64
    with torch.no_grad():
        x_codes = torch.round(x.detach() / x_scale).to(dtype)
        if issubclass(layer._kind.base, nn.Linear):
            acc, channel = nn.functional.linear(x_codes, codes.to(dtype)), -1
        else:
            acc = layer._kind.base._conv_forward(layer, x_codes, codes.to(dtype), None)
            channel = -(len(layer.kernel_size) + 1)  # batched or not
        acc = torch.round_(acc)  # the integer it is, whatever order summed it
        view = [1] * acc.dim()
        view[channel] = -1
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            _offer_output(layer, acc, channel, x_scale, w_scale)
        out = acc.to(x.dtype) * (x_scale * w_scale.to(x.dtype).reshape(view))
        bias = layer.bias
        if bias is not None:
            out += bias.detach().to(x.dtype).reshape(view)
    if torch.is_grad_enabled():
        float_out = float_forward()  # the gradient's path
        if float_out.requires_grad:
            return F.straight_through(float_out, out)
    return out


def _offer_output(layer: nn.Module, acc: Tensor, channel: int, x_scale: Tensor,
                  w_scale: Tensor) -> None:
    """Offer the accumulator for requantization as the runtime computes it
    (:func:`blendq.quantizers.offer_runtime_output`); a layer whose batch norm folds into
    it leaves that to the batch norm's forward (:func:`_offer_folded`)."""
    bias = layer._parameters.get("bias")
    if bias is not None and not layer.round_bias:  # the float-bias view: no int32 bias
        return
    pending = (acc, channel, x_scale, w_scale, None if bias is None else bias.detach().double())
    if layer.bias_folded:
        layer.__dict__["_pending_output"] = pending
    else:
        _offer_folded(pending, None)


def deploy_fold(scale: Tensor, bias: Tensor | None, bn: nn.Module | None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A layer's per-output-channel weight scale and bias (float64) with the batch norm
    after it folded in, as export writes them: ``(|k|·γ_w, k·b + t, k < 0)`` (the sign
    moves into the weight codes); ``bn`` ``None``: ``(γ_w, b, None)``."""
    if bn is None:
        return scale, bias, None
    k, t = bn_affine(bn)
    bias = t if bias is None else k * bias + t
    return (k * scale).abs(), bias, k < 0


def bias_units(bias: Tensor, unit: Tensor) -> Tensor | None:
    """``bias`` (float64) as whole int32 accumulator units of ``unit`` (float64), as
    export writes it; ``None`` where that needs more than int32 (or a zero unit)."""
    units = torch.round(F.round_bias(bias, unit) / unit)
    if bool(torch.isfinite(units).all()) and units.abs().max() < 2**31:
        return units
    return None


def _offer_folded(pending: tuple, bn: nn.Module | None) -> None:
    """``acc + B`` and ``γ_x·γ_w`` of a layer's output as the deployed graph has them
    (``bn`` folded in as export folds it), offered for requantization."""
    acc, channel, x_scale, w_scale, bias = pending
    scale = w_scale.double().reshape(-1).expand(acc.shape[channel])
    scale, bias, negative = deploy_fold(scale, bias, bn)
    view = [1] * acc.dim()
    view[channel] = -1
    units = None
    if bias is not None:
        units = bias_units(bias, scale * x_scale.double())
        if units is None:
            return
    # acc + B as the runtime converts it to float32: exact in float32 below 2^24 (a
    # float32 accumulator is below 2^22), else summed in float64 and rounded once
    exact = acc.dtype == torch.float32 and (units is None or float(units.abs().max()) < 2**23)
    total = acc if exact else acc.double()
    if negative is not None:
        total = total * torch.where(negative, -1.0, 1.0).to(total.dtype).reshape(view)
    if units is not None:
        total = total + units.to(total.dtype).reshape(view)
    offer_runtime_output(total.float(), x_scale.float() * scale.float(), channel)


def _largest_accumulator(layer: nn.Module, codes: Tensor, largest_input: int) -> float:
    """A bound on ``|q_w ⋆ q_a|``: the largest input code times the largest sum of
    ``|q_w|`` over an output's weights (kept while the codes stay the same tensor, by a
    weak reference: a model moved to another device does not keep the old codes)."""
    kept = layer.__dict__.get("_accumulator_bound")
    if kept is None or kept[0]() is not codes or kept[1] != codes._version:
        rows = codes.detach().movedim(layer._kind.axis, 0)
        rows = rows.reshape(rows.shape[0], -1)
        kept = (weakref.ref(codes), codes._version, float(rows.double().abs().sum(1).max()))
        layer.__dict__["_accumulator_bound"] = kept
    return kept[2] * largest_input


def rounds_bias(kind: LayerKind, a_bits: int | None, a_signed: bool | None) -> bool:
    """Whether :func:`bias_unit` applies: the layer adds its bias to an integer
    accumulator (its kind's own matmul or convolution, on an integer input grid)."""
    return kind.integer_bias and F.integer_input(a_bits, a_signed)


def bias_unit(kind: LayerKind, a_bits: int | None, a_signed: bool | None,
              w_scale: Tensor | None = None, a_scale: Tensor | None = None) -> Tensor | None:
    """The one rule for whole-unit bias rounding, used by training, evaluation, convert,
    capture and the engine: where the layer adds its bias to an integer accumulator (its
    kind's own matmul or convolution, ``kind.integer_bias``, on an integer input grid),
    the unit ``γ_w·γ_a`` per output channel (float64; ``w_scale``/``a_scale`` omitted:
    a tensor of ones, to ask only whether the rule applies); ``None`` elsewhere."""
    if not rounds_bias(kind, a_bits, a_signed):
        return None
    if w_scale is None or a_scale is None:
        return torch.ones(1, dtype=torch.float64)
    return w_scale.double().reshape(-1) * a_scale.double()


def shared_input(layer: nn.Module, input: Tensor, x: Tensor, args: tuple,
                 kwargs: dict) -> tuple:
    """The other positional arguments of ``layer``'s forward once its input ``input`` is
    quantized to ``x``: for self-attention, a key and value that are the query tensor
    read its quantized value (``kwargs`` updated in place); a distinct key or value
    (cross-attention) stays float."""
    if not isinstance(layer, nn.MultiheadAttention):
        return args
    kwargs.update({k: x for k in ("key", "value") if kwargs.get(k) is input})
    return tuple(x if a is input else a for a in args[:2]) + args[2:]


def rounded_bias(layer: nn.Module, alpha: Tensor | None) -> Tensor | None:
    """``layer``'s bias in whole accumulator units, blended by ``alpha`` (``None``: fully);
    the bias as is where a batch norm after the layer rounds instead, no unit applies,
    or rounding is switched off (``layer.round_bias = False``: the float-bias view)."""
    bias = layer._parameters.get("bias")
    if bias is None or layer.bias_folded or not layer.round_bias:
        return bias
    fused = _fused_bias(layer, bias, alpha)
    if fused is not None:
        return fused
    unit = layer.accumulator_unit()
    if unit is None:
        return bias
    rounded = F.round_bias(bias.detach(), unit).to(bias.dtype)
    if alpha is None:
        return rounded
    return layer.w_quant.method.bias(bias, rounded, alpha.to(bias.dtype), layer.training)


def _fused_bias(layer: nn.Module, bias: Tensor, alpha: Tensor | None) -> Tensor | None:
    """A training forward's rounded, blended bias in one operation each way
    (:func:`blendq.functional.blend_bias`), where the weight takes the fused path and the
    method's ``bias`` is one the operator computes; else ``None`` (the eager path)."""
    if alpha is None:  # (a converted layer: no quantizers; an AttributeError here would
        return None  # fall through the ``bias`` property to the unrounded Parameter)
    a, w = layer._modules.get("a_quant"), layer._modules.get("w_quant")
    if a is None or w is None or not w.fuses(bias) or not w._ready or \
            a.source.learned or not rounds_bias(layer._kind, a.spec.bits, a.is_signed):
        return None
    rule = w.method.bias_kernel
    if rule is None:
        return None
    return F.blend_bias(bias, w.current_scale(), a.current_scale(), alpha, rule)


def _param_property(name: str, getter_name: str) -> property:
    """``name`` read through ``getter_name`` once the layer is set up (the float class's
    ``__init__`` sees a missing attribute, so it registers the Parameter as usual)."""

    def get(self):
        params = self.__dict__["_parameters"]
        if not self.__dict__.get("_blendq_ready"):
            if name in params:
                return params[name]
            raise AttributeError(name)
        if _is_dtensor(params.get(name)):  # sharded by FSDP2 outside a forward: the
            return params[name]             # Parameter itself (its forward gathers it)
        return getattr(self, getter_name)()

    return property(get)


_BLEND_CLASSES: dict[tuple, type] = {}


def specialise(mixin: type, float_cls: type, prefix: str, kind: LayerKind,
               cache: dict[tuple, type], weight_getter: str, bias_getter: str) -> type:
    """``mixin`` in front of ``float_cls``, with the weight and bias properties (cached)."""
    key = (float_cls, kind.weight, kind.axis, kind.integer_bias, kind.has_input)
    if key not in cache:
        attrs = {"__module__": mixin.__module__, "_kind": kind,
                 kind.weight: _param_property(kind.weight, weight_getter)}
        if kind.weight == "weight":
            attrs["bias"] = _param_property("bias", bias_getter)
        attrs["__reduce_ex__"] = _reduce_layer
        attrs["_specialised"] = (mixin.__module__, prefix, key)
        cache[key] = type(f"{prefix}{float_cls.__name__}", (mixin, float_cls), attrs)
    return cache[key]


def _reduce_layer(self, protocol):
    """Pickle (and deepcopy) a specialised layer by its float class and kind, which are
    importable, not by the generated class, which exists only once created."""
    module, prefix, key = type(self)._specialised
    state = {k: v for k, v in self.__dict__.items() if k != "_accumulator_bound"}  # a weakref
    return (_make_layer, (module, prefix, key), state)


def _make_layer(module: str, prefix: str, key: tuple) -> nn.Module:
    import importlib

    float_cls, weight, axis, integer_bias, has_input = key
    kind = LayerKind(float_cls, weight, axis, integer_bias, has_input)
    owner = importlib.import_module(module)
    mixin = owner.BlendMixin if prefix == "Blend" else owner.QuantMixin
    getters = ("blended_weight", "layer_bias") if prefix == "Blend" else \
        ("weight_value", "layer_bias")
    cache = owner._BLEND_CLASSES if prefix == "Blend" else owner._QUANT_CLASSES
    cls = specialise(mixin, float_cls, prefix, kind, cache, *getters)
    return cls.__new__(cls)


def blend_class(module: nn.Module) -> type:
    """The blended class of a float weight layer.

    Raises:
        TypeError: ``module`` is not a layer blendq quantizes (the message says why).
    """
    kind = layer_kind(module)
    if isinstance(kind, str):
        raise TypeError(f"{type(module).__name__} cannot be quantized: {kind}")
    return specialise(BlendMixin, type(module), "Blend", kind, _BLEND_CLASSES,
                      "blended_weight", "layer_bias")


def _plain(cls: type) -> LayerKind:
    return LayerKind(cls, "weight", 0, True, True)


BlendLinear = specialise(BlendMixin, nn.Linear, "Blend", _plain(nn.Linear), _BLEND_CLASSES,
                         "blended_weight", "layer_bias")
BlendConv1d, BlendConv2d, BlendConv3d = (
    specialise(BlendMixin, c, "Blend", _plain(c), _BLEND_CLASSES, "blended_weight",
               "layer_bias") for c in _CONV)


# ---------------------------------------------------------------------------
# Batch norm right after a quantized layer


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Batch norm in evaluation as ``k·x + t`` per channel, float64 (running statistics)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    weight = torch.ones_like(var) if bn.weight is None else bn.weight.detach().double()
    bias = torch.zeros_like(var) if bn.bias is None else bn.bias.detach().double()
    k = weight / torch.sqrt(var + bn.eps)
    return k, bias - mean * k


def link_holds(layer: nn.Module, input_dim: int | None) -> bool:
    """The one rule for when a batch norm after ``layer`` normalises its outputs: always
    after a convolution; after a Linear only on 2-D input (``input_dim``; ``None``:
    not known yet), since BatchNorm1d on ``(N, L, C)`` normalises ``L``."""
    return not issubclass(layer._kind.base, nn.Linear) or input_dim == 2


def linked_producer(module: nn.Module) -> nn.Module | None:
    """The layer a folded batch norm is linked to (``None`` for any other module)."""
    return module.producer if isinstance(module, _FoldedBatchNorm) else None


class _FoldedBatchNorm:
    """A batch norm right after a quantized layer (linked by ``prepare``/``convert``;
    the link is ``producer``, not a submodule). Export folds it into that layer: one
    rescale ``k·γ_w·γ_a`` and one bias ``k·b + t`` per channel (running statistics).
    It adds the rounding of that folded bias to whole accumulator units (blended with
    the layer's α), as int8 runtimes do, so the α = 1 model computes what they compute:
    in evaluation, and in training too (a constant there: gradients pass straight
    through), so the network learns with the bias it is deployed with. With its
    statistics frozen (``blendq.transform.freeze_batch_norms``, late in training) the
    training forward is the deployed one.
    """

    link_proven = True  # False: a candidate that export checks on the captured graph
    producer: nn.Module | None = None  # the linked layer (a link, not a submodule)

    def link(self, layer: nn.Module, proven: bool) -> None:
        """Link to ``layer`` (its output is this batch norm's input); ``proven``: a
        capture showed the layer's output goes here alone. A Linear's link holds only on
        2-D input (:func:`link_holds`), which only export's capture can check."""
        object.__setattr__(self, "producer", layer)  # not registered as a submodule
        self.link_proven = proven and link_holds(layer, None)
        layer.bias_folded = True

    def forward(self, input: Tensor) -> Tensor:
        delta = None
        pending = None  # evaluation at α = 1: the producer's output, to fold and offer
        if not self.training and self.producer is not None and \
                not torch.compiler.is_compiling():
            pending = self.producer.__dict__.pop("_pending_output", None)
        stats = self.running_mean if self.running_mean is not None else input
        dtype = (stats if self.bias is None else self.bias).dtype  # the parameters' (autocast)
        if self.normalises_producer(input):
            delta = self._buffers.get("deploy_delta")  # export of a pair it could not fold
            if delta is None:
                delta = self.rounding_delta(dtype)
        if delta is None:
            return super().forward(input)
        if pending is not None and not self.training and pending[0].shape == input.shape:
            _offer_folded(pending, self)
        # the rounding joins the batch norm's own shift (no extra pass over the output)
        self._check_input_dim(input)
        delta = delta.to(dtype)
        shift = delta if self.bias is None else self.bias + delta
        return nn.functional.batch_norm(input, *self._statistics(), self.weight, shift,
                                        *self._normalisation())

    def _statistics(self) -> tuple[Tensor | None, Tensor | None]:
        """The running statistics ``nn.BatchNorm``'s forward passes (and updates)."""
        keep = not self.training or self.track_running_stats
        return (self.running_mean if keep else None), (self.running_var if keep else None)

    def _normalisation(self) -> tuple[bool, float, float]:
        """``(use batch statistics, update factor, eps)`` as ``nn.BatchNorm``'s forward
        decides them (counting the batch where it tracks them)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return batch_stats, factor, self.eps

    def normalises_producer(self, input: Tensor) -> bool:
        """Whether this input's channels (dim 1) are the linked layer's outputs: always for
        a convolution; for a Linear only on 2-D input (BatchNorm1d on ``(N, L, C)``
        normalises ``L``, not the Linear's ``C`` outputs)."""
        return self.producer is None or link_holds(self.producer, input.dim())

    def rounding_delta(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """What evaluation adds to the batch norm's output: ``α·(R(t) - t)`` per channel
        (float64, or rounded once to ``dtype``), ``t = k·b + t_bn`` the folded bias, ``R``
        rounding to whole units of ``|k|·γ_w·γ_a``; ``None`` where no unit applies. In
        training under a controller, its :class:`BiasRounding`'s value where that was
        computed from the state as it is now."""
        group = self.__dict__.get("_rounding_group")  # (eager: a graph has no versions)
        if group is not None and not torch.compiler.is_compiling():
            delta = group.value(self, dtype)
            if delta is not None:
                return delta
        delta = self.own_rounding_delta()
        return delta if delta is None or dtype is None else delta.to(dtype)

    def own_rounding_delta(self) -> Tensor | None:
        """:meth:`rounding_delta` computed for this batch norm alone."""
        layer = self.producer
        if layer is None or self.running_mean is None or not layer.round_bias:
            return None
        unit = layer.accumulator_unit()
        if unit is None:
            return None
        k, t = bn_affine(self)
        bias = layer._parameters.get("bias")
        if bias is not None:
            t = k * bias.detach().double() + t
        delta = F.round_bias(t, k * unit) - t
        alpha = getattr(layer, "alpha", None)
        return delta if alpha is None else delta * alpha.detach().double()


class BiasRounding:
    """The training-time bias rounding of many folded batch norms
    (:meth:`_FoldedBatchNorm.rounding_delta`) computed together, in one pass over all
    their channels: about 30 operations a step, where each batch norm costs as many
    (53 in a ResNet-50). :class:`~blendq.transform.AlphaController` marks it due at
    each step; it computes at the first member's forward after that, so after anything
    the step, the optimizer or a distributed wrapper (DDP's broadcast of the running
    statistics, which writes past version counters) changed before the forward.

    The values are those each batch norm computes alone, bit for bit (the same float64
    operations, elementwise). Each serves one forward at most, and only as long as
    what it was computed from stands: it is kept with the tensors it read and their
    version counters, the batch count among them (a training forward counts its batch
    after using the value, so a second forward in the step, whose running statistics
    the first updated in place, computes its own), with ``eps`` and the layer's
    training and rounding switches. A forward that finds any of them changed (an
    activation scale updated in the forward itself, a weight projected there, a second
    micro-batch) computes its own, as without a group. Writes that no version counter
    records (through ``.data``) between the first batch norm of a forward and a later
    one would go unseen; nothing in a forward writes so.
    """

    def __init__(self, norms: list[nn.Module]) -> None:
        self.norms = [bn for bn in norms if isinstance(bn, _FoldedBatchNorm)]
        self._on_device = DeviceConstants()
        self._views: dict[int, tuple] = {}  # vectors of per-layer tensors (_vector)
        self._due = False
        for bn in self.norms:  # the newest group a batch norm joined is its own
            bn.__dict__["_rounding_group"] = self

    def due(self) -> None:
        """Compute anew at the next member's forward (the controller's step)."""
        self._due = True

    def value(self, bn: _FoldedBatchNorm, dtype: torch.dtype | None = None) -> Tensor | None:
        """``bn``'s kept rounding where it still stands (computing all first if due),
        else ``None``; float64, or in ``dtype`` (converted with all the group's, once a
        step, where that is its members' parameters' dtype)."""
        if self._due:
            self._due = False
            self.refresh()
        kept = bn.__dict__.get("_rounding_kept")
        if kept is None or not self._stands(kept[0], bn):
            return None
        if dtype is None or dtype == torch.float64:
            return kept[1]
        return kept[2] if kept[2].dtype == dtype else kept[1].to(dtype)

    @staticmethod
    def _inputs(bn: _FoldedBatchNorm) -> tuple | None:
        """What ``bn``'s training-time rounding reads and depends on (tensors, then
        numbers and switches); ``None`` where a group does not compute it."""
        layer = bn.producer  # (read from the modules' own dicts: twice a step each)
        a = layer._modules.get("a_quant") if layer is not None else None
        norm, affine = bn._buffers, bn._parameters
        if a is None or not layer.training or not layer.round_bias or \
                norm.get("running_mean") is None or norm.get("num_batches_tracked") is None \
                or affine.get("weight") is None or affine.get("bias") is None:
            return None
        w = layer._modules["w_quant"]
        if w.spec.group_size is not None or w.source.learned or \
                a.source.learned or not w._ready or \
                not rounds_bias(layer._kind, a.spec.bits, a.is_signed):
            return None
        return ((norm["running_var"], norm["running_mean"], norm["num_batches_tracked"],
                 affine["weight"], affine["bias"], layer._parameters.get("bias"),
                 w._buffers["scale"], a._buffers["scale"], a._buffers["signed"],
                 layer._buffers["alpha"]), (bn.eps, layer.training, layer.round_bias))

    @classmethod
    def _key(cls, bn: _FoldedBatchNorm) -> tuple | None:
        inputs = cls._inputs(bn)
        if inputs is None:
            return None
        tensors, rest = inputs
        try:
            versions = tuple(t._version for t in tensors if t is not None)
        except RuntimeError:  # inference tensors keep no version
            return None
        return tensors, versions, rest  # the tensors themselves: an id is reused

    @classmethod
    def _stands(cls, key: tuple, bn: _FoldedBatchNorm) -> bool:
        now = cls._key(bn)
        return now is not None and all(a is b for a, b in zip(key[0], now[0], strict=True)) \
            and key[1:] == now[1:]

    @torch.no_grad()
    def refresh(self) -> None:
        """Compute every member's rounding from the state as it is now."""
        parts: dict[torch.device, list] = {}
        for bn in self.norms:
            bn.__dict__.pop("_rounding_kept", None)
            key = self._key(bn)
            if key is not None:
                parts.setdefault(bn.running_var.device, []).append((bn, key))
        for device, members in parts.items():
            norms = [bn for bn, _ in members]
            delta, counts = self._deltas(norms, device), [bn.running_var.numel() for bn in norms]
            deltas = torch.split(delta, counts)
            # in the forward's dtype (its parameters'), converted once for all
            dtypes = {bn.bias.dtype for bn in norms}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
            converted = deltas if dtype == torch.float64 else torch.split(delta.to(dtype),
                                                                           counts)
            for (bn, key), delta, cast in zip(members, deltas, converted, strict=True):
                bn.__dict__["_rounding_kept"] = (key, delta, cast)

    def _vector(self, t: Tensor, count: int) -> Tensor:
        """``t`` (one value a channel, or one for all) as a vector of ``count``: itself,
        or a view kept from step to step (no operation a step)."""
        if t.dim() == 1 and len(t) == count:
            return t
        key = (t.data_ptr(), t.shape, t.stride(), count)
        views = self.__dict__.setdefault("_views", {})  # (a group pickled before them)
        kept = views.get(id(t))
        if kept is None or kept[0] != key or kept[1] is not t:
            flat = t.reshape(-1)
            kept = views[id(t)] = (key, t, flat if len(flat) == count else
                                   flat.expand(count))
        return kept[2]

    def _deltas(self, norms: list[_FoldedBatchNorm], device: torch.device) -> Tensor:
        """Every member's rounding, one float64 vector over all their channels."""
        counts = tuple(bn.running_var.numel() for bn in norms)
        total = sum(counts)
        layers = [bn.producer for bn in norms]

        def flat(tensors):  # one float64 vector over all channels
            return torch.cat([self._vector(t, c)
                              for t, c in zip(tensors, counts, strict=True)]).double()

        def per_layer(values):  # one value a layer (tensors, or numbers), over its channels
            rows = self._on_device(counts, device)
            v = torch.stack([t if t.dim() == 0 else t.reshape(()) for t in values]) \
                if torch.is_tensor(values[0]) else \
                self._on_device(tuple(values), device, torch.float64)
            return torch.repeat_interleave(v, rows, output_size=total).double()

        var, mean = flat([bn.running_var for bn in norms]), flat([bn.running_mean for bn in norms])
        eps = per_layer([bn.eps for bn in norms])
        k = flat([bn.weight for bn in norms]) / torch.sqrt(var + eps)  # as bn_affine
        t = flat([bn.bias for bn in norms]) - mean * k
        biases = [layer._parameters.get("bias") for layer in layers]
        if any(b is not None for b in biases):
            has = per_layer([float(b is not None) for b in biases]) > 0
            b = flat([bn.bias if b is None else b for b, bn in zip(biases, norms, strict=True)])
            t = torch.where(has, k * b + t, t)
        unit = flat([layer.w_quant.scale for layer in layers]) * \
            per_layer([layer.a_quant.scale for layer in layers])  # as bias_unit
        return (F.round_bias(t, k * unit) - t) * per_layer([layer.alpha for layer in layers])


class FoldedBatchNorm1d(_FoldedBatchNorm, nn.BatchNorm1d):
    pass


class FoldedBatchNorm2d(_FoldedBatchNorm, nn.BatchNorm2d):
    pass


class FoldedBatchNorm3d(_FoldedBatchNorm, nn.BatchNorm3d):
    pass


FOLDED_BN_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FoldedBatchNorm1d,
    nn.BatchNorm2d: FoldedBatchNorm2d,
    nn.BatchNorm3d: FoldedBatchNorm3d,
}


# ---------------------------------------------------------------------------
# Quantization sites apart from weight layers


class BlendSite(nn.Module):
    """One activation tensor quantized where no weight layer consumes it: the input of a
    residual add, of a concatenation or of an average pool (placed by
    :mod:`blendq.placement`, which finds them in a graph capture). It holds an α and an
    :class:`ActQuantizer` like a weight layer's input, and the controller, the α views,
    telemetry, ``convert`` and export treat it the same way; ``x -> a_quant(x, α)``.
    A weight layer reading the site's output shares its quantizer
    (``input_from_site``), so the tensor is quantized once, with one scale."""

    def __init__(self, a_spec: ActSpec, name: str = "") -> None:
        super().__init__()
        self.register_buffer("alpha", torch.zeros(()))
        self.a_quant = ActQuantizer(a_spec, name=name)

    def forward(self, x: Tensor) -> Tensor:
        return self.a_quant(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4g}"


def runtime_add(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``: a residual add whose operands are quantization sites' outputs (put in
    place of ``+`` by :func:`blendq.placement.place_sites`). In evaluation at α = 1 it
    also offers the pair, in this order, to the quantizer that reads the sum, which then
    rounds it as ONNX Runtime's ``QLinearAdd`` does
    (:func:`blendq.quantizers.offer_runtime_add`); a graph capture sees ``a + b`` alone."""
    out = a + b
    if not torch.compiler.is_compiling() and not torch.is_grad_enabled() and \
            isinstance(a, Tensor) and isinstance(b, Tensor):
        offer_runtime_add(a, b)
    return out


# ---------------------------------------------------------------------------
# LoRA: the adapters trained through the merged weight


_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
               "lora_magnitude_vector", "lora_dropout")


def is_lora(module: nn.Module) -> bool:
    """A LoRA wrapper in peft's form (``LoraLayer``): a ``base_layer`` and adapters
    ``lora_A``/``lora_B`` whose ``get_delta_weight(name)`` is ``s·B·A`` in the base
    weight's layout."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and \
        isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and \
        callable(getattr(module, "get_delta_weight", None))


def lora_part(name: str, wrappers: list[str]) -> bool:
    """Whether module ``name`` is an adapter's own (``lora_A``, ``lora_B``, ...) inside
    one of the LoRA ``wrappers``: trained, never quantized as a layer of its own."""
    return any(name.startswith(f"{w}." if w else "") and
               name[len(w) + bool(w):].split(".", 1)[0] in _LORA_PARTS for w in wrappers)


class LoraDelta:
    """``Σ s·B·A`` over a LoRA wrapper's active adapters (with gradients to A and B),
    what its base layer's quantizer adds to the frozen weight; ``versions()`` changes
    whenever an adapter's Parameters change."""

    def __init__(self, wrapper: nn.Module) -> None:
        self.wrapper = wrapper

    def adapters(self) -> list[str]:
        w = self.wrapper
        if getattr(w, "disable_adapters", False) or getattr(w, "merged", False):
            return []
        return [a for a in w.active_adapters if a in w.lora_A]

    def __call__(self) -> Tensor:
        w = self.wrapper
        deltas = [w.get_delta_weight(a) for a in self.adapters()]
        if not deltas:
            return torch.zeros((), device=w.base_layer.float_weight.device)
        return deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)

    def versions(self) -> tuple:
        w = self.wrapper
        names = self.adapters()
        return (tuple(names), *(p._version for a in names
                                for p in (w.lora_A[a].weight, w.lora_B[a].weight)),
                *(float(w.scaling[a]) for a in names))


_LORA_CLASSES: dict[type, type] = {}


@torch.no_grad()
def _merged_merge(self, safe_merge: bool = False, adapter_names=None) -> None:
    """peft's ``merge`` on a layer whose quantizer sees the merged weight: the adapters'
    delta folded into the base layer's Parameter (peft's own writes into ``weight``,
    which here is the blended weight, and would be lost)."""
    base = self.base_layer
    delta = base.__dict__.pop("weight_delta", None)
    if delta is None:
        return
    names = delta.adapters()
    base.float_weight.add_(delta().to(base.float_weight.dtype))
    base.__dict__.pop("_merged", None)
    base.w_quant.source_key = ()
    self.__dict__["_blendq_delta"] = delta
    self.merged_adapters.extend(n for n in names if n not in self.merged_adapters)


@torch.no_grad()
def _merged_unmerge(self) -> None:
    """peft's ``unmerge``: the delta taken out of the Parameter again, the adapters back
    in the quantizer's merged weight."""
    delta = self.__dict__.pop("_blendq_delta", None)
    if delta is None:
        return
    self.merged_adapters.clear()
    base = self.base_layer
    base.float_weight.sub_(delta().to(base.float_weight.dtype))
    base.__dict__["weight_delta"] = delta


def _reduce_merged(self, protocol):
    """Pickle a merged wrapper by its peft class (the generated one is not importable)."""
    return (_make_merged, (type(self).__mro__[1],), self.__dict__)


def _make_merged(cls: type) -> nn.Module:
    return object.__new__(merged_lora_class(cls))


def _merged_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """The wrapper's forward once its adapters live in the base layer's merged weight:
    the base layer alone (the adapters' branch is inside its weight)."""
    kwargs.pop("adapter_names", None)
    return self.base_layer(x, *args, **kwargs)


def merged_lora_class(cls: type) -> type:
    """``cls`` (a peft LoRA wrapper class) whose forward is its base layer's: the
    adapters reach the output through the base layer's merged, quantized weight."""
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"Merged{cls.__name__}", (cls,),
                                  {"forward": _merged_forward, "merge": _merged_merge,
                                   "unmerge": _merged_unmerge, "__reduce_ex__": _reduce_merged,
                                   "__module__": __name__, "_blendq_merged": True})
    return _LORA_CLASSES[cls]
