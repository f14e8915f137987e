"""Weight and activation quantizers: which projection, which method, what state.

A quantizer turns a float tensor and the layer's α into the tensor the layer
computes with. ``method="ab"`` blends (paper eq. 4, gradient ``(1 - α)``, no
STE); ``method="ste"`` gives the same forward value with a straight-through
gradient; ``method="lsq"`` learns the scale (learned step size quantization, Esser
et al. 2020): a Parameter ``step`` per tensor or channel, started from the PPQ scale,
trained with LSQ's scaled gradient. Everything else is equal between the three, so
they compare fairly. (An optimizer must be built after ``prepare`` to train LSQ's
steps.)
"""

from __future__ import annotations

import collections
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import functional as F
from . import methods, scales
from .methods import METHODS, Method, check_method

__all__ = ["WeightSpec", "ActSpec", "WeightQuantizer", "WeightGroup", "ActQuantizer",
           "offer_runtime_output", "offer_runtime_add", "runtime_codes", "runtime_applies",
           "runtime_value",
           "ActStatistics", "METHODS", "check_method"]


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weight is quantized.

    bits: 1..8 (1: sign); per_channel: one scale per output channel;
    group_size: one scale per block of this many consecutive elements of each output
    channel's row (its input channels × kernel, in memory order; the last block holds
    the remainder where it does not divide); a power of two >= 16, bits 2..8;
    int8_inputs: the layer's (float) input is rounded as the 4-bit kernel that runs block
    weights rounds it at its fast accuracy level (:func:`~blendq.functional.int8_blocks`,
    blocks of ``group_size``); needs ``group_size``;
    int8_matmul: the layer is trained for an int8 matrix product: block scales whole
    multiples of one scale per output channel (:func:`~blendq.functional.snap_block_scales`,
    ``1..2^(7 - bits)``), so codes times multiples are an int8 weight, and the input
    rounded to int8 per row at run time (:func:`~blendq.functional.int8_rows`); needs
    ``group_size``, 2..4 bits and a method that does not learn its scale;
    method: a registered method name (:mod:`blendq.methods`: ``ab``, ``ste``, ``lsq``);
    binary_scale: 1-bit uses the least-squares scale
    ``mean|w|`` (docs/design.md); quant_every: recompute codes every this many steps
    (set by the controller); max_iter: PPQ iterations per refresh, started from the
    previous scale (Algorithm 2 takes γ as input; the paper: "3 iterations is
    enough"), with no host synchronisation; init_iter: iterations of the first
    projection, started from :func:`blendq.functional.search_scale`;
    scale: where the scale comes from: ``"ppq"`` (the least-squares projection above)
    or ``"minmax"`` (``max|w|`` per layer, channel or block onto the grid's top code:
    TensorFlow's QAT, :func:`blendq.functional.minmax`; the refresh is then
    per layer, not grouped). 1-bit weights take the sign either way.
    """

    bits: int = 8
    per_channel: bool = False
    method: str = "ab"
    binary_scale: bool = True
    quant_every: int = 1
    max_iter: int = 3
    init_iter: int = 10
    group_size: int | None = None
    int8_inputs: bool = False
    scale: str = "ppq"
    int8_matmul: bool = False

    def __post_init__(self) -> None:
        F.check_bits("w_bits", self.bits)
        check_method("method", self.method)
        F.check_scale("scale", self.scale)
        F.check_group_size(self.group_size)
        if self.group_size is not None and self.bits == 1:
            raise ValueError("group_size needs 2..8-bit weights (1-bit weights keep one "
                             "sign scale per channel or layer)")
        if self.quant_every < 1:
            raise ValueError(f"quant_every must be >= 1, got {self.quant_every}")
        if self.int8_inputs and self.group_size is None:
            raise ValueError("int8_inputs rounds inputs per weight block: it needs group_size")
        if self.int8_matmul:
            if self.group_size is None or not 2 <= self.bits <= 4 or self.int8_inputs:
                raise ValueError("int8_matmul makes block scales whole multiples of a channel "
                                 "scale: it needs group_size, 2..4-bit weights and no "
                                 "int8_inputs")
            if methods.get(self.method).learns_scale:
                raise ValueError(f"int8_matmul snaps block scales onto multiples of a channel "
                                 f"scale at every projection; method {self.method!r} learns "
                                 "its scale and cannot keep it there: use 'ab' or 'ste'")


@dataclass(frozen=True)
class ActSpec:
    """How a layer's input activation is quantized.

    bits: 1..8; signed: ``True``/``False``, or ``None`` to decide from the first
    training batch (unsigned if it holds no negative value); method: a registered method
    name (``ab``, ``ste``, ``lsq``);
    momentum: EMA of the scale (paper: 0.99); max_iter: PPQ iterations per batch
    (fixed count, warm-started from the EMA scale, no host synchronisation);
    sample: the batch scale is computed on about this many elements of the batch,
    evenly strided (:func:`~blendq.functional.strided_sample`; ``None``: all of it, and
    no deferred statistics: :class:`ActStatistics` would keep a copy of each batch).
    Measured on a W4A4 network (``benchmarks/act_sample.py``): after 300 steps the EMA
    scales from samples of 262,144, 65,536 and 16,384 elements are within 0.12 % of
    the whole batch's, their quantization error within 0.25 % (docs/performance.md).
    scale: the batch statistic the EMA follows: ``"ppq"`` (the batch's least-squares
    scale, on the sample) or ``"minmax"`` (the batch's largest magnitude onto the
    grid's top code, on the whole batch, computed where the batch is quantized: the
    EMA of min/max ranges of TensorFlow's QAT, Jacob et al. 2018).
    """

    bits: int = 8
    signed: bool | None = None
    method: str = "ste"
    momentum: float = 0.99
    max_iter: int = 3
    sample: int | None = 16384
    scale: str = "ppq"

    def __post_init__(self) -> None:
        F.check_bits("a_bits", self.bits)
        check_method("act_method", self.method)
        F.check_scale("scale", self.scale)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample must be None or >= 1, got {self.sample}")


class WeightQuantizer(nn.Module):
    """Projects a weight with PPQ (or sign) and caches ``codes`` and ``scale``.

    In training the codes are recomputed when the controller marks them stale
    (every ``quant_every`` steps; always when ``quant_every == 1``); in eval
    they are recomputed whenever the weight changed since the last projection
    (tracked with the tensor's version counter) into a separate cache, so
    evaluation and ``convert`` always see ``P(w)`` of the current weight and
    evaluating never changes what training computes next.
    """

    def __init__(self, spec: WeightSpec, weight: Tensor, name: str = "", axis: int = 0) -> None:
        super().__init__()
        self.spec = spec  # immutable after prepare
        # the method (blendq.methods): chosen once from the spec's name; the controller
        # swaps in its "after α = 1" mode, the spec stays as prepared
        self.method: Method = methods.get(spec.method)
        # where the scale comes from (blendq.scales): the spec's, learned where the method
        # learns its scale
        self.source = scales.for_quantizer(spec.scale, self.method.learns_scale)
        self.name = name
        self.axis = axis  # the weight's output-channel axis (1 for transposed convolutions)
        self.stale = True  # training cache out of date (a Python flag: no sync in forward)
        self.grouped = False  # a WeightGroup projected this step's codes already
        self._eval: tuple | None = None  # (weight key, codes, scale) for eval mode
        # training steps so far (counted by the controller's step, outside the forward that
        # torch.compile traces): part of the eval key, since a wrapper may refill a weight
        # in place without a version bump (FSDP2 gathers into the same storage)
        self._trained = 0
        # what else the projected weight depends on (a LoRA layer's adapters), set by the
        # layer before each call: part of the eval key
        self.source_key: tuple = ()
        # Fixed-shape buffers updated in place, so DDP and optimizers see stable tensors.
        scale_shape = [1] * weight.dim()
        if spec.group_size is not None:  # (output channels, blocks)
            rows, _, blocks = F.block_layout(tuple(weight.shape), axis, spec.group_size)
            scale_shape = [rows, blocks]
        elif spec.per_channel:
            scale_shape[axis] = weight.shape[axis]
        # The codes are recomputed from the weight at every step unless quant_every > 1,
        # so only then are they part of the state (a resumed run goes on with them).
        self.register_buffer("codes", torch.zeros_like(weight, requires_grad=False),
                             persistent=spec.quant_every > 1)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=weight.dtype,
                                                 device=weight.device))
        if self.source.learned:  # the learned scale (``scale``: where it started)
            self.step = nn.Parameter(torch.ones(scale_shape, dtype=weight.dtype,
                                                device=weight.device))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool, device=weight.device))
        # set on the device when a training projection saw NaN or inf; read rarely
        # (blendq.transform.check_weights), so a training step never waits for the host
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool,
                                                      device=weight.device), persistent=False)
        self._ready = False  # Python mirror of ``ready``

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _source_of(self)

    def extra_repr(self) -> str:
        s = self.spec
        gran = f"group_size={s.group_size}" if s.group_size else f"per_channel={s.per_channel}"
        return f"bits={s.bits}, {gran}, method={s.method}, scale={s.scale}"

    def per_element(self, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``scale`` broadcastable to a weight of ``shape``: block scales repeated over
        their blocks; per-channel and per-layer scales as they are."""
        g = self.spec.group_size
        return scale if g is None else F.expand_blocks(scale, shape, self.axis, g)

    @torch.no_grad()
    def project(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes, scale)`` of ``w``: PPQ warm-started from the cached scale once there
        is one (``max_iter`` iterations), else ``init_iter`` iterations from
        :func:`~blendq.functional.search_scale`."""
        s = self.spec
        axis = self.axis if s.per_channel else None
        x, warm = w, self.scale
        if s.group_size is not None:  # each block a row of its own: PPQ per row
            x, axis, warm = F.to_blocks(w, self.axis, s.group_size), 0, warm.reshape(-1, 1)
        try:
            if self.training and self._ready:  # no host synchronisation inside a step
                self.nonfinite.logical_or_(~torch.isfinite(w).all())
            else:
                F.check_finite(w)
            codes, scale = _projection(x, s.bits, axis, warm if self._ready else None,
                                       self.source, s.binary_scale, s.max_iter, s.init_iter)
        except ValueError as err:
            raise ValueError(f"layer {self.name or '<unnamed>'}: weight {err}") from None
        if s.group_size is not None:
            if s.int8_matmul:  # scales onto multiples of a channel unit, codes again
                scale = F.snap_block_scales(scale.reshape(self.scale.shape),
                                            F.int8_multiples(s.bits),
                                            self.source.name == "minmax", w.dtype)
                codes = F.quantize(x.float(), scale.reshape(-1, 1).float(), s.bits)
            codes = F.from_blocks(codes, tuple(w.shape), self.axis, s.group_size)
            scale = scale.reshape(self.scale.shape)
        return codes.to(w.dtype), scale.to(w.dtype)

    def quantized(self, w: Tensor) -> Tensor:
        """``scale * codes`` for ``w``: the cached training projection, or in eval
        the projection of the current weight (kept apart from the training cache)."""
        if self.training:
            self._refresh(w)
            return self.per_element(self.scale, tuple(w.shape)) * self.codes
        d = self.__dict__  # (attributes a model pickled by an older version lacks)
        key = (w.data_ptr(), w._version, w.dtype, self.scale._version, d.get("_trained", 0),
               d.get("source_key", ()))
        if self._eval is None or self._eval[0] != key:
            self._eval = (key, *self.project(w))
        _, codes, scale = self._eval
        return self.per_element(scale, tuple(w.shape)) * codes

    def _refresh(self, w: Tensor) -> None:
        """Bring the training codes and scale up to date for ``w`` (due every
        ``quant_every`` steps, or already done by the group); on the fused path a layer
        projected alone is one operation (:func:`_refresh_op`)."""
        if self.grouped:  # projected with its group (one flat PPQ for many layers)
            self.grouped = False
        elif self.stale or self.spec.quant_every == 1:
            if self._ready and self.fuses(w):
                s = self.spec
                torch.ops.blendq.refresh_weight(
                    w.detach(), self.codes, self.scale, self.nonfinite, s.bits,
                    self.axis if s.per_channel else -1, self.source.name, s.binary_scale,
                    s.max_iter, s.init_iter)
            else:
                codes, scale = self.project(w)
                self.codes.copy_(codes)
                self.scale.copy_(scale)
                self.ready.fill_(True)
                self._ready = True
            self.stale = False

    def fuses(self, w: Tensor) -> bool:
        """Whether a training forward of ``w`` takes the fused path
        (:func:`blendq.functional.blend_weight`: one operation each way): where the
        execution policy puts the fused kernel (:func:`blendq.functional.fuses_on`), for
        a method whose value and gradient it computes (:attr:`Method.kernel`), a scale
        per layer or channel, and a plain tensor (a sharded DTensor takes the eager
        path)."""
        return (self.training and self.spec.group_size is None and
                self.method.kernel is not None and not self.source.learned and
                isinstance(w, Tensor) and not _is_dtensor(w) and F.fuses_on(w.device))

    def eval_projection(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The ``(codes, scale)`` that evaluation uses for ``w`` (what ``convert`` stores)."""
        if self.source.learned and self._ready:
            return self._lsq_projection(w)
        was = self.training
        self.eval()
        self.quantized(w)
        self.train(was)
        return self._eval[1], self._eval[2]

    def forward(self, w: Tensor, alpha: Tensor) -> Tensor:
        if self.source.learned:
            return self._lsq(w, alpha)
        if self.fuses(w):
            self._refresh(w)
            return F.blend_weight(w, self.codes, self.scale, alpha, self.method.kernel)
        return self.method.mix(w, self.quantized(w), alpha)

    def _lsq(self, w: Tensor, alpha: Tensor) -> Tensor:
        """LSQ's value of ``w`` with the learned step (started from the PPQ scale),
        blended with ``w`` by ``alpha``."""
        if not self._ready:  # first projection: the step starts at the PPQ scale
            codes, scale = self.project(w)
            with torch.no_grad():
                self.step.copy_(scale)
                self.scale.copy_(scale)  # kept as the start; |step| is the scale from here
                self.codes.copy_(codes)
            self.ready.fill_(True)
            self._ready = True
        s = self.spec
        step = self.step.abs().clamp_min(torch.finfo(w.dtype).tiny)
        if s.bits == 1:  # a learned magnitude for the sign
            return torch.lerp(w, _sign_straight(w) * step, alpha.to(w.dtype))
        per_scale = w.numel() // max(step.numel(), 1)
        return F.lsq(w, self.per_element(step, tuple(w.shape)), s.bits,
                     grad_scale=1.0 / math.sqrt(per_scale * F.grid(s.bits)[1]), alpha=alpha)

    def current_scale(self) -> Tensor:
        """The scale the weight is quantized with now: LSQ's ``|step|`` (its only scale;
        the ``scale`` buffer keeps the PPQ scale it started from), else the projection's
        cached ``scale``."""
        if self.source.learned and self._ready:
            return self.step.detach().abs().clamp_min(torch.finfo(self.step.dtype).tiny)
        return self.scale

    def _lsq_projection(self, w: Tensor) -> tuple[Tensor, Tensor]:
        step = self.step.detach().abs().clamp_min(torch.finfo(w.dtype).tiny)
        if self.spec.bits == 1:
            return torch.where(w >= 0, 1.0, -1.0).to(w.dtype), step
        qmin, qmax = F.grid(self.spec.bits)
        per_element = self.per_element(step, tuple(w.shape))
        return torch.round(torch.clamp(w.detach() / per_element, qmin, qmax)), step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = bool(self.ready)
        self.stale = not self._ready  # a resumed run goes on with the saved codes
        self._eval = None


def _projection(x: Tensor, bits: int, axis: int | None, warm: Tensor | None,
                source: scales.ScaleSource, binary_scale: bool, max_iter: int,
                init_iter: int) -> tuple[Tensor, Tensor]:
    """``(codes, scale)`` of weights ``x``: their sign at 1 bit, else the scale source's
    projection (warm-started from ``warm`` where it is given)."""
    if bits == 1:
        return F.binarize(x, axis=axis, scaled=binary_scale, fixed=True)
    return source.weight(x, bits, axis, warm, max_iter, init_iter)


def _refresh_math(w: Tensor, codes: Tensor, scale: Tensor, nonfinite: Tensor, bits: int,
                  axis: int, source: str, binary_scale: bool, max_iter: int,
                  init_iter: int) -> None:
    """A training refresh of one layer's codes and scale, in place, as
    :meth:`WeightQuantizer.project` computes it once the layer has its first projection
    (``axis``: -1 for one scale; a non-finite weight raises the flag, read later)."""
    nonfinite.logical_or_(~torch.isfinite(w).all())
    new_codes, new_scale = _projection(w, bits, None if axis < 0 else axis, scale,
                                       scales.get(source), binary_scale, max_iter, init_iter)
    codes.copy_(new_codes)
    scale.copy_(new_scale)


@torch.library.custom_op("blendq::refresh_weight", mutates_args=("codes", "scale", "nonfinite"))
def _refresh_op(w: Tensor, codes: Tensor, scale: Tensor, nonfinite: Tensor, bits: int,
                axis: int, source: str, binary_scale: bool, max_iter: int,
                init_iter: int) -> None:
    """:func:`_refresh_math` in one operation: the fused path's refresh of a layer
    projected alone (sign weights, min/max ranges, a layer without a group). Its body
    runs eagerly on every device (compiled, PPQ's and the mean's reductions would round
    otherwise than the eager path): one dispatched operation, a few kernels on CUDA."""
    _refresh_math(w, codes, scale, nonfinite, bits, axis, source, binary_scale, max_iter,
                  init_iter)


class WeightGroup:
    """Weight quantizers of one bit width, granularity and method whose training
    projection runs as one PPQ over a flat buffer (:func:`blendq.functional.ppq_segments`):
    the number of operations per refresh does not grow with depth. Each quantizer's
    ``codes``, ``scale`` and ``nonfinite`` buffers are views into the group's flat buffers,
    so results land in place; if a module move (``model.to``) replaced them, the group
    binds anew on its next refresh. Quantizers project alone until all have their first
    projection (which searches the scale)."""

    def __init__(self, quantizers: list[WeightQuantizer],
                 weights: list[Tensor] | Callable[[], list[Tensor]]) -> None:
        self.quantizers = quantizers
        # the members' weights, read anew at each refresh where given as a function (a
        # wrapper such as FSDP2 replaces a layer's Parameter object)
        self._weights = weights if callable(weights) else (lambda: weights)
        self.spec = quantizers[0].spec
        self._bound: tuple | None = None
        self._views: dict = {}  # each member's weights as the flat buffer reads them

    @staticmethod
    def key(q: WeightQuantizer) -> tuple | None:
        """Quantizers with equal keys can share a group (``None``: never grouped). On the
        CPU those whose scales' runs of weights all divide into rows of 8 or more go
        apart from the rest, so that their group's sums run on rows
        (:meth:`row_length`); a GPU's segment reduction is parallel, and a group fewer
        is fewer launches (so it is where the execution policy runs the GPU's code path
        on the CPU, ``fused=True``)."""
        s = q.spec
        if s.bits < 2 or not q.method.groups or not q.source.groups or s.int8_matmul:
            return None
        device = q.scale.device
        rows = WeightGroup.row_length(q) >= 8 if device.type == "cpu" and \
            not F.fuses_on(device) else None
        return (s.bits, s.per_channel, s.group_size, s.max_iter, q.scale.dtype,
                q.scale.device, rows)

    @staticmethod
    def row_length(q: WeightQuantizer) -> int:
        """The longest row, a power of two up to 64, that divides every run of weights
        one scale of ``q`` covers (an output channel, a block or the whole weight)."""
        shape, s = tuple(q.codes.shape), q.spec
        if s.group_size is not None:
            runs = set(F.block_lengths(shape, q.axis, s.group_size).tolist())
        else:
            runs = {q.codes.numel() // q.scale.numel()}
        r = 64
        for n in runs:
            while n % r:
                r //= 2
        return r

    @staticmethod
    def _rows(t: Tensor, q: WeightQuantizer) -> Tensor:
        """A weight-shaped tensor with its output channels first (a view for axis 0): the
        flat order in which each channel's scales are consecutive runs."""
        return t.movedim(q.axis, 0) if q.spec.per_channel or q.spec.group_size else t

    def _segments(self, q: WeightQuantizer, w: Tensor) -> Tensor:
        if q.spec.group_size is not None:
            return F.block_lengths(tuple(w.shape), q.axis, q.spec.group_size)
        return torch.full((q.scale.numel(),), w.numel() // q.scale.numel(), dtype=torch.long)

    def _order(self, q: WeightQuantizer, w: Tensor) -> tuple[int, ...]:
        """The order in which ``w``'s weights enter the flat buffer: the dimensions of its
        rows (:meth:`_rows`) permuted into memory order where that is a plain view
        (channels-last weights: no copy a step) and keeps each scale's run whole (the
        output channels first; blocks keep their own layout). Read from the sizes and
        strides alone: no operation."""
        same = tuple(range(w.dim()))
        if q.spec.group_size is not None or w.is_contiguous():
            return same
        moved = q.spec.per_channel  # the rows' dimensions: the output axis first
        dims = [q.axis] + [d for d in same if d != q.axis] if moved else list(same)
        size, stride = [w.shape[d] for d in dims], [w.stride(d) for d in dims]
        order = tuple(sorted(same, key=lambda d: (-stride[d], d)))
        if moved and order[0] != 0 or not _dense(
                [size[d] for d in order], [stride[d] for d in order]):
            return same
        return order

    def _bind(self, orders: list[tuple[int, ...]]) -> None:
        qs, weights = self.quantizers, self.weights
        if self._bound == ([(q.codes.data_ptr(), q.scale.data_ptr()) for q in qs], orders):
            return
        flat_codes = torch.cat([self._rows(q.codes.detach(), q).permute(o).reshape(-1)
                                for q, o in zip(qs, orders, strict=True)])
        flat_scale = torch.cat([q.scale.detach().reshape(-1) for q in qs])
        flags = torch.cat([q.nonfinite.reshape(1) for q in qs])
        c = s = 0
        for i, (q, w, o) in enumerate(zip(qs, weights, orders, strict=True)):
            n, k = w.numel(), q.scale.numel()
            rows = self._rows(q.codes, q).permute(o).shape
            back = tuple(sorted(range(len(o)), key=o.__getitem__))  # o's inverse
            view = flat_codes[c:c + n].view(rows).permute(back)
            moved = q.spec.per_channel or q.spec.group_size is not None
            q._buffers["codes"] = view.movedim(0, q.axis) if moved else view  # a view
            q._buffers["scale"] = flat_scale[s:s + k].view(q.scale.shape)
            q._buffers["nonfinite"] = flags[i:i + 1].view(())
            c, s = c + n, s + k
        self.codes, self.scale, self.flags = flat_codes, flat_scale, flags
        device = flat_codes.device
        self.lengths = torch.cat([self._segments(q, w) for q, w in zip(
            qs, weights, strict=True)]).to(device)
        # sums run on rows of R weights (each scale's run whole rows), row sums first: a
        # CPU's segment_reduce is a serial loop, several times slower per element
        r = min(self.row_length(q) for q in qs)
        self.row = r if r >= 8 else 1
        self.lengths = self.lengths // self.row
        self.layer_lengths = torch.tensor([w.numel() // self.row for w in weights],
                                          device=device)
        self.index = F.segment_index(self.lengths)  # each row's scale, once a binding
        self._bound = ([(q.codes.data_ptr(), q.scale.data_ptr()) for q in qs], orders)
        self._views = {}

    def _flat(self, q: WeightQuantizer, w: Tensor, order: tuple[int, ...]) -> Tensor:
        """``w``'s weights in the flat buffer's order and dtype: a view of ``w`` kept
        from step to step where that is one (built once: no operation a step)."""
        key = (id(w), w.data_ptr(), w.dtype, w.stride())
        kept = self._views.get(q)
        if kept is not None and kept[0] == key:
            return kept[1]
        flat = self._rows(w.detach(), q).permute(order).reshape(-1).to(self.codes.dtype)
        if flat.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
            # a view, which follows w's updates
            self._views[q] = (key, flat)
        return flat

    @property
    def weights(self) -> list[Tensor]:
        return self._weights()

    @torch.no_grad()
    def project(self) -> bool:
        """Refresh every member's training codes and scale at once; ``False`` (nothing
        done) until every member had its first projection, or while a member's weight is
        sharded (a DTensor: FSDP2), which each layer then projects at its forward, on the
        weight FSDP2 gathers for it."""
        if not all(q._ready and q.training for q in self.quantizers):
            return False
        if any(_is_dtensor(w) for w in self.weights):
            return False
        weights, qs = self.weights, self.quantizers
        orders = [self._order(q, w) for q, w in zip(qs, weights, strict=True)]
        self._bind(orders)
        flat = torch.cat([self._flat(q, w, o) for q, w, o in zip(qs, weights, orders,
                                                                  strict=True)])
        if self.row > 1:  # a row's sum (float64: it cannot overflow) is NaN or ±inf
            x, out = flat.view(-1, self.row), self.codes.view(-1, self.row)  # where a
            finite = torch.isfinite(x.sum(1, dtype=torch.float64))  # weight is
        else:
            x, out = flat, self.codes
            finite = torch.isfinite(flat)
        bad = torch.segment_reduce((~finite).to(flat.dtype), "max", unsafe=True,
                                   lengths=self.layer_lengths)  # (layers,)
        self.flags.logical_or_(bad > 0)
        codes, scale = F.ppq_segments(x, self.lengths, self.spec.bits, self.scale,
                                      self.spec.max_iter, codes=out, index=self.index)
        if codes is not out:  # written out of place (while torch.compile traces)
            self.codes.copy_(codes.reshape(-1))
        self.scale.copy_(scale)
        for q in self.quantizers:
            q.grouped, q.stale = True, False
        return True


def _source_of(quantizer: nn.Module) -> None:
    """A quantizer unpickled from a version before scale sources gets its source."""
    if "source" not in quantizer.__dict__:
        quantizer.source = scales.for_quantizer(quantizer.spec.scale,
                                                quantizer.method.learns_scale)


def _dense(size: list[int], stride: list[int]) -> bool:
    """Whether a tensor of these sizes and strides is contiguous (size-1 dimensions
    ignored, as torch does)."""
    expected = 1
    for n, st in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _is_dtensor(t: Tensor) -> bool:
    """A sharded tensor (``torch.distributed.tensor.DTensor``, FSDP2's parameters)."""
    return type(t).__name__ == "DTensor" or isinstance(t, _DTENSOR)


try:
    from torch.distributed.tensor import DTensor as _DTENSOR
except ImportError:  # a build without distributed
    _DTENSOR = ()


class _SignStraight(torch.autograd.Function):
    """``sign(x)`` (0 -> +1) forward; the gradient passes where ``|x| <= 1``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1)


def _sign_straight(x: Tensor) -> Tensor:
    return _SignStraight.apply(x)


_CHUNK = 1024  # row length of a kept activation sample (ActStatistics)


def _padded_rows(samples: list[Tensor], zeros: Tensor, pads: dict) -> Tensor:
    """Flat samples one after the other, each zero-padded to whole rows of ``_CHUNK``
    (:func:`~blendq.functional.ppq_segments`; ``zeros``: ``_CHUNK`` of them, in the
    samples' dtype): one copy of them all, one operation. ``pads`` keeps the padding
    views of ``zeros`` by length, so a step slices nothing."""
    parts = []
    for sample in samples:
        n = -len(sample) % _CHUNK
        pad = pads.get((zeros, n))
        if pad is None:
            pad = pads[(zeros, n)] = zeros[:n]
        parts += [sample, pad]
    return torch.cat(parts).view(-1, _CHUNK)


def _at_grid_ends(codes: Tensor, bits: int, signed: bool) -> Tensor:
    """Where activation codes sit at an end of their (full) grid: the clip telemetry's
    one rule (an unsigned grid's 0 is no clip)."""
    qmin, qmax = F.grid(bits, signed, full=True)
    at_ends = codes >= qmax
    if signed:
        at_ends |= codes <= qmin
    return at_ends


def _distributed() -> bool:
    """Whether this process is one of several ranks of a distributed run."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_ranks(value: Tensor) -> Tensor:
    """``value`` averaged over the ranks of a distributed run (as SyncBatchNorm combines
    batch statistics), so every rank's EMA scale follows every rank's batches."""
    dist = torch.distributed
    if _distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class ActQuantizer(nn.Module):
    """Quantizes a layer's input with a per-tensor scale tracked by EMA, on the full
    two's-complement grid where signed (8 bits: -128..127, as int8 runtimes store it).

    Training: PPQ on the batch (warm-started from the EMA scale), averaged over the
    ranks of a distributed run, then ``ema = m·ema + (1 - m)·batch_scale``; alone, the
    batch is quantized with the updated EMA scale; under an :class:`ActStatistics` (what
    a controller sets up) with the EMA as it stood, the update coming as the model's
    forward returns. Eval: the EMA scale is frozen (a never-trained quantizer uses the
    batch scale without storing it).
    """

    def __init__(self, spec: ActSpec, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.method: Method = methods.get(spec.method)
        self.source = scales.for_quantizer(spec.scale, self.method.learns_scale)
        self.name = name
        # Python mirror of the ``signed`` buffer (-1: unknown), so forward never syncs.
        self._signed = -1 if spec.signed is None else int(spec.signed)
        self.register_buffer("signed", torch.tensor(self._signed, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if self.source.learned:  # the learned scale (``scale``: where it started)
            # one element, not a scalar: FSDP2 shards no 0-d Parameter
            self.step = nn.Parameter(torch.ones(1))
        # telemetry: training inputs at the grid's ends, and all seen (device-side counts)
        self.register_buffer("clipped", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self._initialized = False  # Python mirror of ``initialized``
        # set by an ActStatistics: this batch's sample, whose statistic it computes later
        self._stats: ActStatistics | None = None
        self._pending: Tensor | None = None
        self._count_pending = False  # the settle counts the sample's inputs at the ends

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _source_of(self)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, method={self.spec.method}, scale={self.spec.scale}"

    @property
    def is_signed(self) -> bool:
        return self._signed != 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        step = state_dict.get(f"{prefix}step")
        if step is not None and step.dim() == 0:  # saved before the step had one element
            state_dict[f"{prefix}step"] = step.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._signed = int(self.signed)
        self._initialized = bool(self.initialized)
        self._pending = None  # the loaded state replaces what this run had not settled
        self.__dict__.pop("_lsq_started", None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.settle()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def train(self, mode: bool = True) -> ActQuantizer:
        if not mode:
            self.settle()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.settle()  # kept samples would stay where they are (model.to, .half(), ...)
        return super()._apply(fn, recurse)

    def settle(self) -> None:
        """Bring the scale and the clip counters up to date with every batch seen (see
        :class:`ActStatistics`; nothing to do unless one computes this quantizer's)."""
        if self._pending is not None:
            self._stats.settle()

    def _batch_scale(self, x: Tensor, signed: bool) -> Tensor:
        """This batch's scale, from the quantizer's source (a sign grid: the sample's
        mean magnitude)."""
        s = self.spec
        if F.is_sign(s.bits, signed):
            sample = x if s.sample is None else F.strided_sample(x, s.sample)
            return F.binarize(sample, fixed=True)[1].reshape(())
        warm = torch.where(self.initialized, self.scale, torch.zeros_like(self.scale)) \
            if self.source.warm_start else self.scale  # (from the EMA once there is one)
        return self.source.batch(x, s.bits, signed, warm, s.max_iter, s.sample)

    def forward(self, x: Tensor, alpha: Tensor) -> Tensor:
        signed = self._signed
        if signed < 0:  # grid not known yet: decide it from this batch (kept in training)
            signed = int(bool((x < 0).any()))
            if self.training:
                self._signed = signed
                self.signed.fill_(signed)
        signed = bool(signed)
        if not self.training and runtime_applies(x):
            value = self._as_runtime(x, alpha, signed)
            if value is not None:
                return value
        if self.source.learned and not F.is_sign(self.spec.bits, signed) and \
                (self.training or self._lsq_ready):  # untrained eval: the batch scale below
            return self._lsq(x, signed, alpha)
        deferred = self.training and self._defers(signed)
        path = self.path(x.device, x.dtype, signed, deferred,
                         x.requires_grad and torch.is_grad_enabled(), self.training)
        if path == "fused-sign":
            self._initialized = True  # (the operator sets ``initialized`` on the device)
            return F.fake_sign(x, self.scale, self.initialized, alpha, self.method.kernel,
                               self.spec.momentum, self.spec.sample, update=True)
        fused = path == "fused"  # one operation each way
        if self.training:
            if deferred and not fused:  # quantized with the EMA as it stands; the
                self._keep(x, count=True)  # statistic comes later
            elif not deferred:
                self._update_inline(x, signed)
            scale = self.scale
        elif bool(self.initialized):
            scale = self.scale
        else:
            scale = self._batch_scale(x.detach(), signed)
        if fused:  # the sample a deferred statistic keeps, taken by the same operation
            counting = self.training
            value, kept = F.fused_fake_quantize(
                x, scale, alpha, self.spec.bits, signed, self.method.kernel,
                sample=self.spec.sample if counting and deferred else 0,
                counters=(self.clipped, self.seen) if counting else None)
            if counting and deferred:  # counted whole by the kernel
                self.__dict__.update(_pending=kept, _count_pending=False)
            return value
        scale = scale.to(x.dtype)
        if path == "cpu-native":
            qmin, qmax = F.grid(self.spec.bits, signed, full=True)
            return F.straight_through_fake_quantize(x, scale, alpha.to(x.dtype), qmin, qmax)
        codes = F.quantize(x.detach(), scale, self.spec.bits, signed, full=True)
        if self.training and not deferred and not F.is_sign(self.spec.bits, signed):
            self._count_clipped(codes, signed)
        xq = codes.mul_(scale)
        lo, hi = self._ste_range(scale, signed)
        return self.method.mix(x, xq, alpha, lo, hi)

    def _as_runtime(self, x: Tensor, alpha: Tensor, signed: bool) -> Tensor | None:
        """In evaluation at α = 1 with nothing recorded for autograd, once an integer
        layer has offered its output (:func:`offer_runtime_output`): ``x`` quantized as
        the int8 runtime computes it where ``x`` is such an output (:func:`runtime_codes`),
        else as usual, noted as an operand a residual add may read; ``None`` where that
        does not apply."""
        if F.is_sign(self.spec.bits, signed):  # (the caller checked runtime_applies)
            return None
        ready = self._lsq_ready if self.source.learned else bool(self.initialized)
        if not ready or not bool(alpha == 1):
            return None
        return runtime_value(x, self.current_scale(), self.spec.bits, signed)

    def path(self, device: torch.device | str, dtype: torch.dtype = torch.float32,
             signed: bool | None = None, deferred: bool = True, recorded: bool = True,
             training: bool = True) -> str:
        """The path a batch on ``device`` takes through this quantizer, decided here alone
        from the execution policy (:class:`blendq.functional.Execution`), the method and
        the batch (``deferred``: its statistic waits for the settle; ``recorded``: autograd
        records it):

        - ``"lsq"``: a learned step, LSQ's own value and gradient (once trained or
          training; an untrained one evaluates with the batch scale, eagerly);
        - ``"fused-sign"``: a sign grid in training where the policy puts the fused
          kernel, one operation each way (:func:`blendq.functional.fake_sign`: the batch
          statistic into the EMA, the value, the mask); not in a distributed run, whose
          statistic is averaged over the ranks;
        - ``"sign"``: a sign grid, eagerly (hardtanh-shaped gradient);
        - ``"fused"``: the fused kernel (:func:`blendq.functional.fake_quantize`), where
          the policy puts it and the kernel computes the method's value and gradient
          (:attr:`blendq.methods.Method.kernel`); a method with a ``mix`` of its own runs
          eagerly, never the kernel's gradient;
        - ``"cpu-native"``: one native autograd node
          (:func:`blendq.functional.straight_through_fake_quantize`) for a method with the
          base :meth:`~blendq.methods.Method.mix`, on a float32/64 CPU batch that autograd
          records, whose statistic is deferred (the node counts no clips), where the
          policy's ``cpu_native`` allows it;
        - ``"eager"``: :func:`blendq.functional.quantize`, then the method's ``mix``.

        Raises:
            ValueError: the policy asks for the fused kernel everywhere (``fused=True``)
                and this quantizer's method defines a ``mix`` the kernel does not compute.
        """
        device = torch.device(device)
        signed = self.is_signed if signed is None else signed
        if F.is_sign(self.spec.bits, signed):
            fused = training and F.fuses_on(device) and self.method.kernel is not None and \
                not _distributed()  # (the batch statistic is averaged over ranks eagerly)
            return "fused-sign" if fused else "sign"
        if self.source.learned:
            return "lsq"
        policy = F.execution()
        if F.fuses_on(device):
            if self.method.kernel is not None:
                return "fused"
            if policy.fused is True:
                raise ValueError(
                    f"the execution policy asks for the fused activation kernel "
                    f"(fused=True), but {self.name or 'an activation quantizer'}'s method "
                    f"{self.method.name!r} defines its own mix, whose gradient the kernel "
                    "cannot compute; use blendq.execution_policy(fused='auto')")
        if deferred and recorded and policy.cpu_native and \
                type(self.method).mix is Method.mix and device.type == "cpu" and \
                dtype in (torch.float32, torch.float64):
            return "cpu-native"
        return "eager"

    def defers_statistics(self, signed: bool | None = None) -> bool:
        """Whether this quantizer's training batches defer their statistic to the settle
        once its EMA exists (an :class:`ActStatistics` computes it: what a controller
        sets up; a sampled PPQ grid; ``signed``: the grid's, else the one known). No
        side effect (:meth:`_defers` settles)."""
        signed = self.is_signed if signed is None else signed
        return self._stats is not None and self.spec.sample is not None and \
            self.source.defers and not F.is_sign(self.spec.bits, signed)

    def _defers(self, signed: bool) -> bool:
        """Whether this training batch's statistic waits for :meth:`ActStatistics.settle`:
        in eager mode, once the EMA exists, for sampled PPQ grids (a full-batch
        statistic would keep a copy of the whole batch)."""
        if torch.compiler.is_compiling() or self._stats is None or not self._initialized:
            return False
        self.settle()  # called twice in one forward: the first batch's statistic enters now
        return self.defers_statistics(signed)

    @torch.no_grad()
    def _keep(self, x: Tensor, count: bool) -> None:
        """Keep a copy of the batch's strided sample (about ``spec.sample`` elements) for
        the settle, taken while ``x`` is still in the cache (gathered from a view at the
        settle instead, a ResNet-50's settles took 40 % longer on the CPU), in the
        settle's dtype (float32, or float64)."""
        sample = F.kept_sample(x.detach(), self.spec.sample)
        # plain attributes, set past nn.Module.__setattr__'s checks (a few µs each)
        self.__dict__.update(_pending=sample, _count_pending=count)

    @torch.no_grad()
    def _update_inline(self, x: Tensor, signed: bool) -> None:
        """The batch's PPQ scale (averaged over ranks) into the EMA, here and now."""
        batch = _mean_over_ranks(self._batch_scale(x.detach(), signed).to(self.scale.dtype))
        m = self.spec.momentum
        ema = torch.where(self.initialized, m * self.scale + (1 - m) * batch, batch)
        self.scale.copy_(ema)
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def _count_clipped(self, codes: Tensor, signed: bool, to_codes=None) -> None:
        """Telemetry: inputs at the grid's ends, counted on the strided sample the batch
        scale uses (``spec.sample``; two passes over a large activation cost a few per
        cent of a CPU step), so ``clipped / seen`` is that sample's fraction.
        ``to_codes``: ``codes`` are inputs, whose sample this (elementwise) function
        turns into codes, so no codes are computed for the rest."""
        if self.spec.sample is not None:
            codes = F.strided_sample(codes, self.spec.sample)
        if to_codes is not None:
            codes = to_codes(codes)
        self.clipped += torch.count_nonzero(_at_grid_ends(codes, self.spec.bits, signed))
        self.seen += codes.numel()

    def _lsq(self, x: Tensor, signed: bool, alpha: Tensor) -> Tensor:
        """LSQ's value of ``x`` blended with ``x`` by ``alpha``; the step starts at the
        first training batch's PPQ scale."""
        if self.training and not self._lsq_ready:
            with torch.no_grad():
                scale = _mean_over_ranks(self._batch_scale(x.detach(), signed))
                self.step.copy_(scale.reshape(1))
                self.scale.copy_(scale)  # kept as the start; |step| is the scale from here
                self.initialized.fill_(True)
                self._initialized = True
            self._lsq_started = True
        step = self.step.abs().clamp_min(torch.finfo(x.dtype).tiny).reshape(())
        qmax = F.grid(self.spec.bits, signed, full=True)[1]
        per_sample = x[0].numel() if x.dim() > 1 else x.numel()
        value = F.lsq(x, step.to(x.dtype), self.spec.bits, signed,
                      grad_scale=1.0 / math.sqrt(per_sample * qmax), full=True, alpha=alpha)
        if self.training:
            grid = F.grid(self.spec.bits, signed, full=True)
            self._count_clipped(x.detach(), signed,
                                lambda s: torch.round(torch.clamp(s / step, *grid)))
        return value

    def current_scale(self) -> Tensor:
        """The scale evaluation quantizes with now: ``|step|`` for LSQ (which the ``scale``
        buffer keeps the PPQ scale it started from), else the EMA ``scale``."""
        if self.source.learned and not F.is_sign(self.spec.bits, self.is_signed):
            return self.step.detach().abs().clamp_min(
                torch.finfo(self.step.dtype).tiny).reshape(())
        return self.scale

    @property
    def _lsq_ready(self) -> bool:
        if not self.__dict__.get("_lsq_started"):
            self._lsq_started = bool(self.initialized)  # once per run (or after a load)
        return self._lsq_started

    def _ste_range(self, scale: Tensor, signed: bool) -> tuple[Tensor | float, Tensor | float]:
        """Where a straight-through gradient passes: the grid's reach, ±1 for sign."""
        if F.is_sign(self.spec.bits, signed):
            return -1.0, 1.0  # BinaryNet's hardtanh-shaped estimator
        qmin, qmax = F.grid(self.spec.bits, signed, full=True)
        return scale * (qmin - 0.5), scale * (qmax + 0.5)


class DeviceConstants:
    """Small constant tensors (indices, counts, per-element constants) on a device, each
    built once per value (up to 64 kept). A GPU gets them by an asynchronous copy from
    pinned memory, which does not wait for the device as a copy from ordinary memory
    does, so a training step that asks for one never synchronises."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, values: tuple, device: torch.device,
                 dtype: torch.dtype = torch.long) -> Tensor:
        key = (values, device, dtype)
        if key not in self._cache:
            if len(self._cache) >= 64:  # shapes that keep changing: start over
                self._cache.clear()
            t = torch.tensor(values, dtype=dtype)
            if device.type == "cuda":
                t = t.pin_memory().to(device, non_blocking=True)
            self._cache[key] = t.to(device)
        return self._cache[key]


class ActStatistics:
    """Activation quantizers whose batch statistics are computed together, once a
    forward (:class:`~blendq.transform.AlphaController` sets one up over a model).

    In eager training a member quantizes each batch with its EMA scale as it stands and
    keeps a copy of the batch's strided sample (about ``ActSpec.sample`` elements);
    when the model's forward returns (a forward hook on the model), :meth:`settle` runs
    the batch-scale PPQ of every kept sample as one PPQ over their concatenation (one
    per grid: :func:`blendq.functional.ppq_segments`), averages all the scales over
    ranks in one reduction, updates every EMA and counts the sampled inputs at the
    grids' ends at the scale they were quantized with. The count of operations a step
    no longer grows with the number of quantizers (71 in a ResNet-50), where each cost
    a few dozen small operations before.

    What differs from computing the statistic where the batch is quantized: a batch is
    quantized with the EMA before its own statistic enters it, so the scale it uses
    differs by ``(1 - momentum)`` of the batch-to-EMA difference (1 % of it at the
    default momentum 0.99); the EMA sequence is the same. The first batch (which starts
    the EMA), sign grids, full-batch statistics (``sample=None``) and graphs
    torch.compile traces keep the immediate update. Settled at the end of every forward
    of the model (so on every rank of a distributed run, and before anything outside a
    forward reads the state), and, for forwards of a part of the model, by the next
    controller step, a second call of the same quantizer, ``eval()``, ``state_dict()``,
    ``model.to()``, ``convert`` and ``telemetry``. The same samples always settle
    together, so a run that saves a checkpoint computes what one that does not computes.
    """

    def __init__(self, quantizers: list[ActQuantizer], model: nn.Module | None = None
                 ) -> None:
        self.quantizers = list(quantizers)
        for q in self.quantizers:
            if q._stats is not None and q._stats is not self:
                q._stats.close()  # what an earlier controller kept settles, its hook goes
            q._stats = self
        self._on_device = DeviceConstants()  # index tensors on the device, reused
        self._pads: dict = {}  # padding views of a zeros constant, by length
        # the model whose forward settles as it returns (no hook handle kept: a model,
        # and this with it, must stay deep-copyable)
        self.model = model
        if model is not None:
            model.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, args, output) -> None:
        if not torch.compiler.is_compiling():
            self.settle()

    def close(self) -> None:
        """Settle, and stop: the quantizers go back to updating where they quantize."""
        self.settle()
        if self.model is not None:
            hooks = self.model._forward_hooks
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
            self.model = None
        for q in self.quantizers:
            if q._stats is self:
                q._stats = None

    @torch.no_grad()
    def settle(self) -> None:
        """Fold every kept sample into its quantizer's EMA and clip counters."""
        parts: dict[tuple, list[ActQuantizer]] = {}  # scales on one device, of one dtype
        for q in self.quantizers:
            if q._pending is not None:
                parts.setdefault((q.scale.device, q.scale.dtype), []).append(q)
        for pending in parts.values():
            samples = [q._pending for q in pending]
            for q in pending:
                q.__dict__["_pending"] = None
            self._settle(pending, samples)

    def _settle(self, pending: list[ActQuantizer], samples: list[Tensor]) -> None:
        used = torch.stack([q.scale if q.scale.dim() == 0 else q.scale.reshape(())
                            for q in pending])  # what quantized them
        by_grid: dict[tuple, list[int]] = {}
        for i, q in enumerate(pending):
            by_grid.setdefault((q.spec.bits, q.is_signed, q.spec.max_iter,
                                F.settle_dtype(samples[i].dtype)),
                               []).append(i)
        batch = torch.empty_like(used)
        for (bits, signed, max_iter, dtype), idx in by_grid.items():
            sizes = [len(samples[i]) for i in idx]
            rows = self._on_device(tuple(-(-n // _CHUNK) for n in sizes), used.device)
            where = None if len(idx) == len(pending) else self._on_device(tuple(idx),
                                                                            used.device)
            x = _padded_rows([samples[i] for i in idx],
                             self._on_device((0.0,) * _CHUNK, used.device, dtype),
                             self.__dict__.setdefault("_pads", {}))
            start = used if where is None else used[where]
            _, scale = F.ppq_segments(x, rows, bits, start.to(x.dtype), max_iter,
                                      signed=signed, full=True)
            if where is None:
                batch = scale.to(used.dtype)
            else:
                batch[where] = scale.to(used.dtype)
            self._count(pending, sizes, idx, x, rows, start, bits, signed)
        # one reduction for all, in the quantizers' order (whatever grids each rank saw)
        batch = _mean_over_ranks(batch)
        momenta = tuple(q.spec.momentum for q in pending)
        m = momenta[0] if len(set(momenta)) == 1 else \
            self._on_device(momenta, used.device, used.dtype)
        torch._foreach_copy_([q.scale for q in pending],
                             list((m * used + (1 - m) * batch).unbind()))

    def _count(self, pending: list[ActQuantizer], sizes: list[int], idx: list[int], x: Tensor,
               rows: Tensor, used: Tensor, bits: int, signed: bool) -> None:
        """Telemetry: each sample's inputs at the grid's ends, at the scale it was
        quantized with (zero padding counts at neither end; ``sizes``: the samples'
        lengths before it)."""
        counted = [j for j, i in enumerate(idx) if pending[i]._count_pending]
        if not counted:
            return
        per_row = torch.repeat_interleave(used.to(x.dtype), rows, output_size=len(x))
        codes = F.quantize(x, per_row[:, None], bits, signed, full=True)
        at_ends = _at_grid_ends(codes, bits, signed)
        clipped = F.segment_sum(at_ends.to(x.dtype), rows).double()
        if len(counted) < len(idx):
            clipped = clipped[self._on_device(tuple(counted), x.device)]
        quantizers = [pending[idx[j]] for j in counted]
        torch._foreach_add_([q.clipped for q in quantizers], list(clipped.unbind()))
        torch._foreach_add_([q.seen for q in quantizers],
                            [float(sizes[j]) for j in counted])


# ---------------------------------------------------------------------------
# Requantization as an int8 runtime computes it (evaluation at α = 1)
#
# In evaluation at α = 1 an integer layer's output, and a residual add of two quantized
# tensors, are kept in the form the runtime's fused kernel reads them (``QLinearConv``'s
# int32 accumulator, ``QLinearAdd``'s two uint8 inputs), and the activation quantizer
# that reads that output next rounds it as the kernel does: float32 arithmetic whose
# roundings differ from the float model's by a few ulps, enough to move an output that
# lies within ~1e-6 of a rounding midpoint to the other code.

_runtime = threading.local()  # .kept: the newest offered outputs; .noted: quantized values
_KEPT = 8  # enough for the branches between a producer and its quantizer (ResNet: 2)


def _kept() -> collections.deque:
    kept = getattr(_runtime, "kept", None)
    if kept is None:
        kept = _runtime.kept = collections.deque(maxlen=_KEPT)
        _runtime.noted = collections.OrderedDict()
    return kept


def offer_runtime_output(total: Tensor, unit: Tensor, channel: int) -> None:
    """Keep an integer layer's α = 1 output in the form an int8 runtime requantizes it
    (:func:`blendq.functional.runtime_requantize`'s ``total`` and ``unit``; called by
    :func:`blendq.layers.integer_core` in evaluation, batch norms folded in as export folds
    them). The activation quantizer that reads that output next rounds it as the runtime
    does (:func:`runtime_codes`). The newest few are kept, per thread."""
    _kept().append(("layer", total, unit, channel))


def offer_runtime_add(a: Tensor, b: Tensor) -> None:
    """Keep ``a + b`` in the form ONNX Runtime's ``QLinearAdd`` reads it, where ``a`` and
    ``b`` are both outputs of activation quantizers in this evaluation
    (:func:`blendq.layers.runtime_add`); otherwise nothing."""
    kept = getattr(_runtime, "kept", None)
    if kept is None or a.shape != b.shape:
        return
    noted = _runtime.noted
    first, second = noted.get(id(a)), noted.get(id(b))
    if first is None or second is None or first[0]() is not a or second[0]() is not b:
        return
    kept.append(("add", first[1:], second[1:]))


def _note(value: Tensor, codes: Tensor, scale: Tensor, signed: bool) -> None:
    """Remember a quantizer's output ``value``: its codes, scale and stored zero point."""
    noted = _runtime.noted
    zero = F.stored_zero(signed)
    # the newest last: an id freed and reused takes a dead entry's key, which would
    # otherwise keep that entry's place among the oldest and go first
    noted.pop(id(value), None)
    noted[id(value)] = (weakref.ref(value), codes, scale, zero)
    while len(noted) > 2 * _KEPT:
        noted.popitem(last=False)


def runtime_applies(x: Tensor) -> bool:
    """Whether quantizing ``x`` now rounds as the runtime does (:func:`runtime_value`): an
    integer layer has offered an output in this thread, ``x`` is float32 and autograd
    records nothing."""
    if torch.compiler.is_compiling():  # a traced graph computes the float way
        return False
    return bool(getattr(_runtime, "kept", None)) and x.dtype == torch.float32 and \
        not (x.requires_grad and torch.is_grad_enabled())


def runtime_value(x: Tensor, scale: Tensor, bits: int, signed: bool) -> Tensor:
    """``x`` on the grid ``(bits, signed)`` (not a sign grid) with ``scale``, where
    :func:`runtime_applies`: rounded as the runtime does where ``x`` is a kept output
    (:func:`runtime_codes`), else ``round(x / scale)``; the value is noted as an operand
    a residual add may read (:func:`offer_runtime_add`). The α = 1 model's quantizers and
    the converted model's call it alike, so both compute the same values."""
    codes = runtime_codes(x, scale, bits, signed)
    if codes is None:
        codes = F.quantize(x.detach(), scale, bits, signed, full=True)
    value = codes * scale.to(x.dtype)
    _note(value, codes, scale, signed)
    return value


def runtime_codes(x: Tensor, scale: Tensor, bits: int, signed: bool) -> Tensor | None:
    """``x``'s codes on the grid ``(bits, signed)`` with ``scale`` as an int8 runtime
    computes them, where ``x`` is a kept output (:func:`offer_runtime_output`,
    :func:`offer_runtime_add`) with nothing but clamps in between (a ReLU, ReLU6, the
    grid's own range; :func:`_clamped`), a flatten or reshape; ``None`` where no kept
    output is ``x``.

    Which kept output ``x`` is, is read from the values (its first sample first, then the
    whole batch): one of as many elements whose codes differ from ``round(x / scale)`` by
    at most one, only where ``x`` lies at a rounding midpoint (to float32 rounding: those
    are what the runtime's arithmetic settles; :func:`_agrees`). Anything else between the producer
    and this quantizer (an activation function, another add, another layer's output of
    the same shape) changes far more codes, and the codes are ``round(x / scale)`` as
    without this."""
    kept = getattr(_runtime, "kept", None)
    if not kept or x.dtype != torch.float32:
        return None
    batched = x.dim() > 1 and x.shape[0] > 1
    samples = 1 if batched else None  # the first sample tells a match, at its cost
    if _quantized_before(x, samples):  # quantized again: the runtime dequantizes and
        return None  # quantizes (a division, as here)
    own = None
    for kind, *held in reversed(kept):
        first = held[0] if kind == "layer" else held[0][0]
        if first.numel() != x.numel() or first.shape[:1] != x.shape[:1] or \
                first.device != x.device:  # (a flatten or reshape between keeps the values)
            continue
        if own is None:
            own = F.quantize(x.detach()[:samples], scale, bits, signed, full=True)
        head = x.detach()[:samples]
        codes = _clamped(_kept_codes(kind, held, scale, bits, signed, samples), head, own)
        if not _agrees(codes, own, head, scale):
            continue
        if batched:  # the whole batch must agree as well
            whole = F.quantize(x.detach(), scale, bits, signed, full=True)
            codes = _clamped(_kept_codes(kind, held, scale, bits, signed), x.detach(), whole)
            if not _agrees(codes, whole, x.detach(), scale):
                continue
        return codes.reshape(x.shape)
    return None


def _clamped(codes: Tensor, x: Tensor, own: Tensor) -> Tensor:
    """A kept output's ``codes`` after the clamp that may sit between it and the quantizer
    (ReLU6, a Clip; the exported graph clamps the codes to ``round(bound / scale)``
    there): where ``x`` takes its largest value, no more than ``own`` (its codes), where
    its smallest, no less. (Unclamped, that changes a code only where the extreme
    element itself lies at a rounding midpoint.)"""
    codes = codes.reshape(own.shape)
    if not x.numel():
        return codes
    # ``own`` is ``x`` rounded, so it takes its largest code where ``x`` its largest value:
    # only codes past ``own``'s extremes can change, and most often none is (four
    # reductions instead of a pass over the whole batch for each side)
    if codes.max() > own.max():
        codes = torch.where(x == x.max(), torch.minimum(codes, own), codes)
    if codes.min() < own.min():
        codes = torch.where(x == x.min(), torch.maximum(codes, own), codes)
    return codes


def _quantized_before(x: Tensor, samples: int | None) -> bool:
    """Whether ``x`` holds a noted quantizer output's values (itself, or a copy through a
    reshape or a zero-width pad), read from its first ``samples``."""
    head = x.detach()[:samples].reshape(-1)
    for _, codes, scale, _ in _runtime.noted.values():
        if codes.numel() == x.numel() and codes.shape[:1] == x.shape[:1] and \
                torch.equal(head, (codes[:samples] * scale.to(x.dtype)).reshape(-1)):
            return True
    return False


def _kept_codes(kind: str, held: list, scale: Tensor, bits: int, signed: bool,
                samples: int | None = None) -> Tensor:
    """A kept output's codes with ``scale`` (its first ``samples`` along dim 0 only)."""
    qmin, qmax = F.grid(bits, signed, full=True)
    if kind == "layer":
        total, unit, channel = held
        return F.runtime_requantize(total[:samples], unit, scale, channel, qmin, qmax)
    (a, a_scale, a_zero), (b, b_scale, b_zero) = held
    zero = F.stored_zero(signed)
    codes = F.runtime_add(a[:samples] + a_zero, a_scale, a_zero, b[:samples] + b_zero,
                          b_scale, b_zero, scale, zero)
    return codes.sub_(zero).clamp_(qmin, qmax)


_NEAR_MIDPOINT = 1e-2  # of a step: float32 roundings move these values by ~1e-5 (measured
# on ResNet-50 with batch norms folded: 3e-5 at most)


def _agrees(codes: Tensor, own: Tensor, x: Tensor, scale: Tensor) -> bool:
    """``codes`` within one of ``own`` (``x``'s codes with ``scale``) everywhere, apart only
    where ``x`` lies within a hundredth of a step of a rounding midpoint (what float32
    roundings can move; another tensor's values would differ elsewhere), and there in one
    element in a hundred at most (one at least)."""
    codes = codes.reshape(own.shape)
    if torch.equal(codes, own):  # most often: one pass, nothing allocated
        return True
    apart = (codes - own).abs_()
    if float(apart.max()) > 1:
        return False
    moved = apart.bool()
    if int(moved.sum()) * 100 > max(own.numel(), 100):
        return False
    steps = (x / scale.to(x.dtype))[moved]
    return bool(((steps - steps.floor() - 0.5).abs() < _NEAR_MIDPOINT).all())
