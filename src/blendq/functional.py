"""Tensor math of alpha-blending: grids, PPQ, binarization, blending.

Pure functions on tensors, no state. Everything else in blendq calls these.

Notation (paper, §3): a tensor ``x`` is approximated by ``scale * codes``
where ``codes`` are integers on a grid ``Q`` and ``scale`` (γ) is a positive
float, per tensor or per slice along one axis.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

__all__ = ["NONE_WORDS", "SCALES", "check_bits", "check_scale", "grid", "minmax", "is_sign",
           "integer_input", "lsq", "alpha_is_one", "ppq",
           "ppq_segments", "segment_index", "segment_sum",
           "search_scale", "binarize", "quantize", "blend", "straight_through", "check_finite",
           "round_bias", "stored_zero", "runtime_requantize", "runtime_add", "strided_sample",
           "kept_sample", "settle_dtype",
           "straight_through_fake_quantize", "pack_codes",
           "unpack_codes", "fake_quantize", "fused_fake_quantize", "fake_sign",
           "blend_weight", "blend_bias", "Execution", "execution", "set_execution",
           "execution_policy"]

_ZERO_SCALE = 1.0  # scale given to an all-zero tensor or slice: any positive value is exact


def is_sign(bits: int | None, signed: bool | None) -> bool:
    """One signed bit: the grid {-1, +1} of ``sign(x)``."""
    return bits == 1 and bool(signed)


def integer_input(bits: int | None, signed: bool | None) -> bool:
    """Whether a layer's input lies on an integer grid that int8 kernels accumulate in
    int32 (so its bias is added in whole accumulator units): quantized, and not a sign
    grid (runtimes compute ±1 inputs in float)."""
    return bits is not None and not is_sign(bits, signed)


NONE_WORDS = ("none", "fp32", "float")  # how TOML files and flags write "no quantization"


def check_bits(name: str, value, allow_none: bool = False) -> None:
    """The one rule for a bit width: an integer in 1..8 (or ``None`` where allowed).

    Raises:
        ValueError: naming ``name``, the value and what is allowed.
    """
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
        allowed = "an integer in 1..8" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def grid(bits: int, signed: bool = True, full: bool = False) -> tuple[int, int]:
    """Return ``(qmin, qmax)`` of the integer grid.

    Signed grids are narrow (symmetric): 8 bits -> [-127, 127], 4 bits -> [-7, 7]
    (docs/design.md, Grids), the weights' grids; ``full``: the whole two's-complement
    range, 8 bits -> [-128, 127], the activations' grids (what an int8 runtime stores;
    a clamp to a narrower grid would sit between every kernel and its output
    quantizer and stop the runtime fusing them). Unsigned grids are [0, 2^bits - 1].
    One signed bit is {-1, +1}.
    """
    check_bits("bits", bits)
    if not signed:
        return 0, 2**bits - 1
    if bits == 1:
        return -1, 1
    qmax = 2 ** (bits - 1) - 1
    return -qmax - int(full), qmax


def _reduce_dims(x: Tensor, axis: int | None) -> tuple[int, ...]:
    """Dimensions to reduce over: all (per tensor) or all but ``axis`` (per slice)."""
    if axis is None:
        return tuple(range(x.dim()))
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over ``dims`` keeping them; no dims (one slice per element) sums nothing."""
    return t.sum(dim=dims, keepdim=True) if dims else t


def _peak_scale(xf: Tensor, dims: tuple[int, ...], signed: bool, qmax: int) -> Tensor:
    """Algorithm 2's start ``max|x| / qmax`` (positive part for unsigned grids), > 0."""
    peak = xf.abs() if signed else xf.clamp(min=0)
    start = (peak.amax(dim=dims, keepdim=True) if dims else peak) / qmax
    return torch.where(start > 0, start, torch.full_like(start, _ZERO_SCALE))


SCALES = ("ppq", "minmax")  # where a quantizer's scale comes from (QuantPolicy.scale)


def check_scale(name: str, value) -> None:
    """The one rule for a scale source name."""
    if value not in SCALES:
        raise ValueError(f"{name} must be one of {SCALES}, got {value!r}")


def minmax(x: Tensor, bits: int, axis: int | None = None, signed: bool = True,
           full: bool = False) -> tuple[Tensor, Tensor]:
    """Min/max quantization (Jacob et al. 2018; Krishnamoorthi 2018, TensorFlow's QAT):
    the scale maps the largest magnitude (the largest value on an unsigned grid) onto the
    grid's top code, so nothing clips; ``codes = round(x / scale)``. The ranges are
    symmetric about zero (zero point 0), as blendq's grids are.

    Returns:
        ``(codes, scale)`` as :func:`ppq` returns them (an all-zero slice: scale 1).
    """
    qmin, qmax = grid(bits, signed, full)
    xf = _as_float(x)
    scale = _peak_scale(xf, _reduce_dims(xf, axis), signed, qmax)
    return _codes(xf, scale, qmin, qmax), scale


def _codes(x: Tensor, scale: Tensor, qmin: int, qmax: int, out: Tensor | None = None) -> Tensor:
    """``clamp(round(x / scale))`` in one buffer (three passes, one allocation at most);
    out of place where autograd records ``x`` or torch.compile traces (it fuses the three
    itself, and an ``out=`` buffer in another memory format would break its graph)."""
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return torch.clamp(torch.round(x / scale), qmin, qmax)
    return torch.div(x, scale, out=out).round_().clamp_(qmin, qmax)


def _dot(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``sum(a * b)`` over ``dims`` (kept); over all dims of contiguous tensors as a dot
    product, which reads both once and allocates nothing."""
    if len(dims) == a.dim() > 0 and a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1)).reshape([1] * a.dim())
    return _sum(a * b, dims)


def _ppq_step(xf: Tensor, gamma: Tensor, dims: tuple[int, ...], qmin: int, qmax: int,
              out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One PPQ iteration: codes at ``gamma`` (eq. 8), then their least-squares scale (eq. 9)."""
    codes = _codes(xf, gamma, qmin, qmax, out)
    den = _dot(codes, codes, dims)
    return codes, torch.where(den > 0, _dot(xf, codes, dims) / den.clamp(min=1), gamma)


def strided_sample(x: Tensor, n: int) -> Tensor:
    """About ``n`` elements of ``x`` (at least ``n / 2``), evenly strided through memory:
    a view (no copy) for contiguous and channels-last tensors; ``x`` itself when it holds
    no more than ``n``. The stride is a prime that divides none of the extents of the
    inner dimensions (in memory order: ``W``, ``H·W``, ``C·H·W`` of a contiguous image
    batch), so the sample does not keep landing on the same pixels or channels: a stride
    of 49 through 14×14 maps would read the same 4 pixels of every map."""
    if x.numel() <= n:
        return x
    if x.is_contiguous():
        flat, sizes = x.view(-1), list(x.shape)
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        flat = x.permute(0, 2, 3, 1).reshape(-1)  # a view: this is its memory order
        sizes = [x.shape[0], x.shape[2], x.shape[3], x.shape[1]]
    else:
        flat, sizes = x.reshape(-1), list(x.shape)
    return flat[::_sample_stride(flat.numel() // n, sizes)]


def settle_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype activation statistics are settled in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_sample(x: Tensor, n: int) -> Tensor:
    """A copy of ``x``'s strided sample of about ``n`` elements (:func:`strided_sample`),
    flat, in :func:`settle_dtype`: what a batch leaves for its deferred statistic."""
    return strided_sample(x, n).reshape(-1).to(settle_dtype(x.dtype), copy=True)


def _sample_stride(step: int, sizes: list[int]) -> int:
    """The smallest prime ``>= step`` dividing no product of trailing ``sizes`` (there is
    one below ``2·step`` but for a few skipped)."""
    if step <= 1:
        return 1  # all of it (fewer than 2n elements)
    extents, inner = [], 1
    for size in reversed(sizes[1:]):
        inner *= size
        extents.append(inner)
    p = step
    while not (_is_prime(p) and all(e % p for e in extents)):
        p += 1
    return p


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def check_finite(x: Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf (one host synchronisation)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input holds NaN or inf; a finite tensor is required to quantize")


def _check_axis(x: Tensor, axis: int | None) -> None:
    if axis is not None and not -x.dim() <= axis < max(x.dim(), 1):
        raise ValueError(f"axis must be None or in [-{x.dim()}, {x.dim() - 1}], got {axis}")


def _check_ppq(x: Tensor, bits: int, axis: int | None, signed: bool, max_iter: int) -> None:
    if signed and bits == 1:
        raise ValueError("ppq needs bits in 2..8 for a signed grid; use binarize() for 1 bit")
    check_bits("bits", bits)
    _check_axis(x, axis)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if x.numel() == 0:
        raise ValueError("ppq needs a non-empty tensor, got one of shape "
                         f"{tuple(x.shape)}")


def _overflows(x: Tensor, levels: int) -> bool:
    """Whether PPQ's sums ``<x, codes>`` could overflow ``x``'s float dtype."""
    peak = float(x.detach().abs().max())
    return x.dtype != torch.float64 and \
        peak * levels ** 2 * x.numel() >= torch.finfo(_as_float(x).dtype).max


def ppq(
    x: Tensor,
    bits: int,
    axis: int | None = None,
    signed: bool = True,
    max_iter: int = 20,
    scale: Tensor | float | None = None,
    fixed: bool = False,
    full: bool = False,
) -> tuple[Tensor, Tensor]:
    """Progressive projection quantization (paper Algorithm 2).

    Alternates ``codes = clamp(round(x / scale))`` (eq. 8) and
    ``scale = <x, codes> / <codes, codes>`` (eq. 9). Each half-step minimises
    ``||x - scale * codes||^2`` over its own variable, so the error never rises.

    Args:
        x: floating tensor (computed in float32 at least).
        bits: grid width, 2..8 signed, 1..8 unsigned (1-bit signed: use :func:`binarize`).
        axis: ``None`` for one scale per tensor, else one scale per slice along ``axis``
            (``axis=0`` on a weight: per output channel).
        signed: narrow signed grid (``full``: the whole two's-complement range), else
            unsigned ``[0, 2^bits - 1]``.
        max_iter: most (eq. 8, eq. 9) iterations.
        scale: optional starting scale (broadcastable); entries ``<= 0`` start from
            ``max|x| / qmax`` as in Algorithm 2.
        fixed: run exactly ``max_iter`` iterations with no host-device
            synchronisation (no convergence test, no finiteness check).

    Returns:
        ``(codes, scale)``: codes hold integer values in ``x``'s float dtype;
        ``scale`` is positive with size 1 on every reduced dimension, so
        ``x ≈ scale * codes`` broadcasts. Every returned pair satisfies
        ``scale == <x, codes> / <codes, codes>`` (or the start scale where codes are 0).

    Raises:
        ValueError: bits out of range, bad axis, an empty ``x``, or NaN/inf in ``x``
            (unless ``fixed``). Values so large that the sums overflow ``x``'s dtype are
            solved in float64 (unless ``fixed``).
    """
    _check_ppq(x, bits, axis, signed, max_iter)
    qmin, qmax = grid(bits, signed, full)
    if not fixed:
        check_finite(x)
        if _overflows(x, qmax - qmin + 1):  # the sums <x, codes>: solve in float64
            codes, new = ppq(x.double(), bits, axis, signed, max_iter, scale, fixed, full)
            return codes.to(_as_float(x).dtype), new.to(_as_float(x).dtype)
    xf = _as_float(x)
    dims = _reduce_dims(xf, axis)
    start = _peak_scale(xf, dims, signed, qmax)
    if scale is not None:
        given = torch.as_tensor(scale, dtype=xf.dtype, device=xf.device).expand_as(start)
        start = torch.where(given > 0, given, start)
    gamma, codes = start, None
    for _ in range(max_iter):  # one codes buffer for all iterations
        codes, new = _ppq_step(xf, gamma, dims, qmin, qmax, out=codes)
        if not fixed and torch.equal(new, gamma):
            break
        gamma = new
    return codes, new


@torch.no_grad()
def search_scale(x: Tensor, bits: int, axis: int | None = None, signed: bool = True,
                 candidates: int = 16) -> Tensor:
    """A starting scale for :func:`ppq`: the best of ``candidates`` one-step PPQ scales
    started at ``k/candidates · max|x|/qmax`` (k = 1..candidates), per tensor or slice.

    PPQ started at ``max|x|/qmax`` (Algorithm 2's default) creeps towards the optimum:
    on Gaussian 4-bit weights its error is still ~27 % above the fixed point after 10
    iterations. From this start, 3-5 iterations reach it (``tests/test_functional.py``).
    """
    qmin, qmax = grid(bits, signed)
    xf = _as_float(x)
    dims = _reduce_dims(xf, axis)
    peak = _peak_scale(xf, dims, signed, qmax)
    best_err, best = None, peak
    for k in range(1, candidates + 1):
        codes, gamma = _ppq_step(xf, peak * k / candidates, dims, qmin, qmax)
        err = _sum((xf - gamma * codes) ** 2, dims)
        if best_err is None:
            best_err, best = err, gamma
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, gamma, best)
    return best


def binarize(
    x: Tensor, axis: int | None = None, scaled: bool = True, fixed: bool = False
) -> tuple[Tensor, Tensor]:
    """One-bit projection: ``codes = sign(x)`` with 0 -> +1.

    With ``scaled`` the scale is the least-squares one, ``mean|x|`` (what PPQ's
    eq. 9 gives on the grid {-1, +1}); else 1. An all-zero slice gets scale 1.
    """
    _check_axis(x, axis)
    if not fixed:
        check_finite(x)
    xf = _as_float(x)
    codes = torch.where(xf >= 0, 1.0, -1.0).to(xf.dtype)
    dims = _reduce_dims(xf, axis)
    if not scaled:
        shape = [1 if d in dims else s for d, s in enumerate(xf.shape)]
        return codes, torch.ones(shape, dtype=xf.dtype, device=xf.device)
    gamma = xf.abs().mean(dim=dims, keepdim=True) if dims else xf.abs()
    gamma = torch.where(gamma > 0, gamma, torch.full_like(gamma, _ZERO_SCALE))
    return codes, gamma


def quantize(x: Tensor, scale: Tensor, bits: int, signed: bool = True,
             full: bool = False) -> Tensor:
    """Codes of ``x`` on the grid at a given scale: ``clamp(round(x / scale))`` (eq. 8).

    One bit signed is ``sign`` with 0 -> +1, whatever the scale. ``full``: see :func:`grid`.
    """
    qmin, qmax = grid(bits, signed, full)
    if signed and bits == 1:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return _codes(x, scale, qmin, qmax)


def round_bias(bias: Tensor, unit: Tensor) -> Tensor:
    """``bias`` rounded to a whole number of accumulator units ``|unit|``, in float64.

    An integer layer computes ``unit · (q_w ⋆ q_a)`` with ``unit = γ_w·γ_a`` (per output
    channel, batch norm folded in); int8 runtimes add the bias to the int32 accumulator,
    so it must be ``unit · B`` with ``B`` an integer. A zero unit keeps the bias.
    """
    b, u = bias.double(), unit.double().abs()
    safe = torch.where(u > 0, u, torch.ones_like(u))
    return torch.where(u > 0, torch.round(b / safe) * safe, b)


def stored_zero(signed: bool) -> int:
    """The zero point of an activation grid stored as uint8 in an exported graph: 0 for an
    unsigned grid, 128 for a signed one (codes ``q + 128``: x86 runtimes run their int8
    kernels from uint8 activations)."""
    return 128 if signed else 0


def runtime_requantize(total: Tensor, unit: Tensor, y_scale: Tensor, channel: int,
                       qmin: int, qmax: int) -> Tensor:
    """An integer layer's output codes as ONNX Runtime's int8 kernels requantize them
    (``QLinearConv``; MLAS's ``MlasRequantizeOutput``), float32 throughout:
    ``M = fl32(fl32(γ_x·γ_w) / γ_y)`` per output channel, then
    ``clamp(round_half_even(fl32(fl32(acc + B) · M)))``.

    ``total``: the int32 accumulator plus the int32 bias ``acc + B``, converted to float32;
    ``unit``: ``fl32(γ_x·γ_w)`` per output channel (dim ``channel`` of ``total``), as the
    runtime multiplies its float32 scales; ``y_scale``: the next quantizer's scale. The
    exact value ``(acc + B)·γ_x·γ_w/γ_y`` and this one differ by a few float32 ulps, so an
    output within ~1e-6 of a rounding midpoint can round either way; at 4 bits one such
    code moves the next layer by a sizeable part of a step. Checked against ONNX Runtime
    node by node in ``tests/test_runtime_rounding.py``."""
    view = [1] * total.dim()
    view[channel] = -1
    multiplier = (unit.float() / y_scale.float()).reshape(view)
    return torch.round(total.float() * multiplier).clamp_(qmin, qmax)


def runtime_add(a: Tensor, a_scale: Tensor, a_zero: int, b: Tensor, b_scale: Tensor,
                b_zero: int, y_scale: Tensor, y_zero: int) -> Tensor:
    """The stored uint8 codes of ``A + B`` as ONNX Runtime's ``QLinearAdd`` computes them on
    x86-64 with AVX2 (MLAS), from the stored codes ``a``, ``b`` (``code + zero point``):
    ``r_A = fl32(γ_A/γ_Y)``, ``r_B = fl32(γ_B/γ_Y)``, the zero points folded into one
    float32 constant ``z_Y - (r_A·z_A + r_B·z_B)``, then two fused multiply-adds,
    ``fma(a, r_A, fma(b, r_B, constant))``, rounded half to even and saturated to 0..255.
    The operand order matters (the float32 roundings are not symmetric): ``a`` is the
    add's first operand, as the exported graph keeps it."""
    ra = (a_scale.float() / y_scale.float()).reshape(())
    rb = (b_scale.float() / y_scale.float()).reshape(())
    folded = (ra * a_zero).float() + (rb * b_zero).float()
    constant = (torch.tensor(float(y_zero), dtype=torch.float32, device=a.device) - folded)
    # float32 products and sums round more often than the fused multiply-adds, but by a
    # few ulps (< 1e-4 below 256): only a value that close to a rounding midpoint can
    # round otherwise, and those are computed again as the fma does, in float64 (8-bit
    # codes times 24-bit ratios: the products and sums are exact there, so rounding them
    # to float32 once is the fma)
    value = torch.mul(b, rb).add_(constant).add_(torch.mul(a, ra))
    codes = torch.round(value)
    near = (value - codes).abs_() > 0.5 - 1e-3  # within 1e-3 of a midpoint
    if bool(near.any()):  # a few elements: found once, then read and written by index
        at = near.reshape(-1).nonzero().squeeze(1)
        a_near, b_near = a.reshape(-1)[at].double(), b.reshape(-1)[at].double()
        low = (b_near * rb.double() + constant.double()).float()
        codes.view(-1)[at] = torch.round((a_near * ra.double() + low.double()).float())
    return codes.clamp_(0, 255)


def blend(w: Tensor, wq: Tensor, alpha: Tensor | float) -> Tensor:
    """Alpha-blending (paper eq. 4): ``(1 - alpha) * w + alpha * wq``.

    ``wq`` is detached, so ``d/dw = (1 - alpha)`` exactly (eq. 5) and no gradient
    flows through the projection: no straight-through estimator. ``torch.lerp``
    returns ``w`` bit for bit at ``alpha = 0`` and ``wq`` at ``alpha = 1``.
    """
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), dtype=w.dtype, device=w.device)
    return torch.lerp(w, wq.detach().to(w.dtype), alpha.to(w.dtype))


@dataclass(frozen=True)
class Execution:
    """How quantizers compute: the one switchboard of their execution paths (the path
    each activation quantizer takes is chosen in one place,
    :meth:`blendq.quantizers.ActQuantizer.path`, from this policy, its method and the
    tensor). Set for the process with :func:`set_execution`, or for a block with
    :func:`execution_policy`.

    fused: the fused activation kernel (:func:`fake_quantize`: one pass each way, one
    compiled kernel on CUDA): ``"auto"`` on CUDA outside a graph torch.compile traces
    (which fuses by itself); ``True`` on every device (the CPU runs the kernel's math
    compiled), refused with the reason for a method whose value or gradient the kernel
    does not compute; ``False`` never.
    cpu_native: on the CPU, a float32/64 batch of a method with the base
    :meth:`blendq.methods.Method.mix` trains through one native autograd node
    (:func:`straight_through_fake_quantize`; the bounds and α read on the host, free
    there). ``False``: the CPU takes the device path operation for operation, as
    the tests of GPU behaviour run it.
    """

    fused: bool | str = "auto"
    cpu_native: bool = True

    def __post_init__(self) -> None:
        if not (self.fused == "auto" or type(self.fused) is bool):
            raise ValueError(f"fused must be 'auto', True or False, got {self.fused!r}")
        if not isinstance(self.cpu_native, bool):
            raise ValueError(f"cpu_native must be True or False, got {self.cpu_native!r}")


_EXECUTION = Execution()


def execution() -> Execution:
    """The execution policy in force (:class:`Execution`)."""
    return _EXECUTION


def set_execution(policy: Execution | None = None, **changes) -> Execution:
    """Put ``policy`` (or the one in force with ``changes``, e.g. ``fused=True``) in
    force for the process; returns the one it replaces."""
    global _EXECUTION
    previous = _EXECUTION
    _EXECUTION = replace(policy or previous, **changes)
    return previous


@contextlib.contextmanager
def execution_policy(**changes) -> Iterator[Execution]:
    """The execution policy with ``changes`` (:class:`Execution`'s fields) inside the
    block; the one before after it."""
    previous = set_execution(**changes)
    try:
        yield _EXECUTION
    finally:
        set_execution(previous)


def alpha_is_one(alpha: Tensor) -> bool:
    """Whether ``alpha`` is 1, where reading it costs nothing: on the CPU under the
    native execution policy, outside compilation (a GPU would wait for it, a compiled
    graph would break). ``False`` where it cannot be read so, whatever its value."""
    return _EXECUTION.cpu_native and alpha.device.type == "cpu" and \
        not torch.compiler.is_compiling() and float(alpha) == 1.0


def _hardtanh_masks(x: Tensor) -> bool:
    """Whether one ``hardtanh_backward`` on ``x`` can mask its gradient: float32/64 on
    the CPU under the native execution policy, outside compilation (its bounds are read
    on the host), a plain tensor (a DTensor has no rule for it)."""
    return _EXECUTION.cpu_native and x.device.type == "cpu" and x.dtype in (
        torch.float32, torch.float64) and type(x) in (torch.Tensor, torch.nn.Parameter) \
        and not torch.compiler.is_compiling()


def _open_bounds(lo, hi, dtype: torch.dtype) -> tuple[float, float]:
    """``lo`` and ``hi`` as ``dtype`` holds them, moved one ulp outward:
    ``hardtanh_backward`` passes strictly between them, which is ``lo <= v <= hi``."""
    lo, hi = (torch.as_tensor(b, dtype=dtype) for b in (lo, hi))
    return (float(torch.nextafter(lo, lo.new_tensor(-math.inf))),
            float(torch.nextafter(hi, hi.new_tensor(math.inf))))


_grid_bounds = functools.cache(_open_bounds)  # a grid's integer ends, per dtype


class _StraightThrough(torch.autograd.Function):
    """Forward ``value``; backward the incoming gradient to ``x``, masked to [lo, hi].

    On the CPU (float32/64) the mask is not built: backward runs one fused
    ``hardtanh_backward`` on ``x`` with bounds one ulp outside ``[lo, hi]`` (it passes
    ``lo' < x < hi'``, which is ``lo <= x <= hi`` exactly). Elsewhere a boolean mask is
    kept (a quarter of a float copy, and no host synchronisation for the bounds).
    """

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, lo: Tensor | float | None,
                hi: Tensor | float | None) -> Tensor:
        ctx.bounds = None
        # host bounds: free on the CPU, a sync on a GPU and a graph break when compiling
        if lo is not None and _hardtanh_masks(x):
            ctx.bounds = _open_bounds(lo, hi, x.dtype)
            ctx.save_for_backward(x)
        elif lo is not None:  # tensors on x's device, or host numbers (which made into
            mask = torch.ge(x, lo)  # tensors on a GPU would wait for it)
            mask &= torch.le(x, hi)
            ctx.save_for_backward(mask)
        ctx.masked = lo is not None
        return value.detach().clone() if value is x else value.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.bounds is not None:
            (x,) = ctx.saved_tensors
            grad = torch.ops.aten.hardtanh_backward(grad, x, *ctx.bounds)
        elif ctx.masked:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None


def straight_through(
    x: Tensor, value: Tensor, lo: Tensor | float | None = None, hi: Tensor | float | None = None
) -> Tensor:
    """Return ``value`` in the forward pass and pass the gradient to ``x`` unchanged
    (the straight-through estimator), zeroed where ``x`` lies outside ``[lo, hi]``.

    The forward value is ``value`` bit for bit (no ``x + (v - x).detach()`` rounding).
    """
    return _StraightThrough.apply(x, value, lo, hi)


def _host_bound(scale: float, offset: float, dtype: torch.dtype, toward: float) -> float:
    """``scale·offset`` as a tensor of ``dtype`` computes it, moved one ulp ``toward``."""
    if dtype == torch.float32:
        value = np.float32(scale) * np.float32(offset)
        return float(np.nextafter(value, np.float32(toward)))
    return math.nextafter(scale * offset, toward)


def straight_through_fake_quantize(x: Tensor, scale: Tensor, alpha: Tensor, qmin: int,
                                   qmax: int) -> Tensor:
    """``lerp(x, clamp(round(x / scale), qmin, qmax)·scale, alpha)`` with the
    straight-through gradient, passed where ``scale·(qmin - 0.5) <= x <= scale·(qmax +
    0.5)``: the value and gradient of :meth:`blendq.methods.Method.mix` after
    :func:`quantize`, bit for bit, for float32/64 tensors on the CPU.

    One native autograd node and no mask: a ``hardtanh`` of ``x`` at those bounds (one
    ulp outside: it passes strictly between) owns the gradient, and its output is
    overwritten in place with the quantized value (the node keeps ``x``, not its
    output). Its clamp does not change a code: ``round`` and the clamp to the grid are
    monotone and the bounds lie beyond the grid's ends. One thing sees the overwrite:
    selective activation checkpointing with a policy that keeps ``aten.hardtanh``'s
    output refuses it as a mutation (``execution_policy(cpu_native=False)`` takes the
    general path)."""
    s = float(scale)  # the CPU's own memory: no synchronisation
    lo = _host_bound(s, qmin - 0.5, x.dtype, -math.inf)
    hi = _host_bound(s, qmax + 0.5, x.dtype, math.inf)
    value = torch.nn.functional.hardtanh(x, lo, hi)
    with torch.no_grad():
        v = value.detach()
        v.div_(scale).round_().clamp_(qmin, qmax).mul_(scale)
        if float(alpha) != 1.0:  # lerp's exact value at 1 is the quantized one
            torch.lerp(x.detach(), v, alpha, out=v)
    return value




def _fake_quant_math(x: Tensor, scale: Tensor, alpha: Tensor, qmin: int, qmax: int,
                     ste: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """The value a layer computes with (codes·scale blended with ``x`` by ``alpha``), the
    straight-through mask (``ste``) and the count of inputs at the grid's ends, computed
    as the eager path does, operation for operation (so both round alike)."""
    codes = torch.clamp(torch.round(x / scale), qmin, qmax)
    value = torch.lerp(x, codes * scale, alpha)
    at_ends = codes >= qmax
    if qmin < 0:
        at_ends = at_ends | (codes <= qmin)
    clipped = at_ends.sum(dtype=torch.float64)
    mask = (x >= scale * (qmin - 0.5)) & (x <= scale * (qmax + 0.5)) if ste else None
    return value, mask, clipped


def fuses(x: Tensor) -> bool:
    """Whether :func:`fake_quantize` runs its compiled kernel for ``x`` (the execution
    policy's ``fused``, :class:`Execution`): inside a graph torch.compile traces, the
    graph fuses it."""
    if not isinstance(x, Tensor):  # traced: not a tensor
        return False
    return fuses_on(x.device)


def fuses_on(device: torch.device) -> bool:
    """Whether the execution policy puts the fused kernel on ``device`` (``"auto"``:
    CUDA), outside a graph torch.compile traces (which fuses the eager code itself)."""
    if torch.compiler.is_compiling():
        return False
    fused = _EXECUTION.fused
    return device.type == "cuda" if fused == "auto" else fused


@functools.cache
def _fused_math():
    """:func:`_fake_quant_math` compiled once (dynamic shapes): one kernel on CUDA that
    reads ``x`` once and writes the value and a one-byte mask."""
    return torch.compile(_fake_quant_math, dynamic=True, fullgraph=True)


def _blend_math(w: Tensor, codes: Tensor, scale: Tensor, alpha: Tensor) -> Tensor:
    """A weight's training value ``lerp(w, scale·codes, α)``, as the eager path computes
    it (:func:`blend`, :meth:`blendq.methods.Method.mix`), operation for operation."""
    return torch.lerp(w, (scale * codes).to(w.dtype), alpha.to(w.dtype))


@functools.cache
def _fused_blend():
    """:func:`_blend_math` compiled once (dynamic shapes): one kernel on CUDA."""
    return torch.compile(_blend_math, dynamic=True, fullgraph=True)


def _on_gpu(t: Tensor) -> bool:
    return t.device.type == "cuda"


# The fused path's operators. Each is one dispatched operation, whose CUDA body is one
# compiled kernel (one launch) and whose CPU body runs the same math eagerly, so a CPU
# counting operations at dispatch sees what a GPU launches (benchmarks/gpu_step.py).
# They run outside graphs torch.compile traces only (there the compiler fuses the
# eager code itself), so they need no fake implementation.
@torch.library.custom_op("blendq::fake_quant", mutates_args=("clipped", "seen"))
def _fake_quant_op(x: Tensor, scale: Tensor, alpha: Tensor, qmin: int, qmax: int, ste: bool,
                   count: bool, sample: int, clipped: Tensor, seen: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(value, mask, kept)`` of an activation batch: the fake-quantized value, the
    straight-through mask (empty for AB), and a copy of the batch's strided sample of
    about ``sample`` elements in float32 or wider (empty for 0); with ``count`` the
    inputs at the grid's ends and the batch's size are added to ``clipped`` and
    ``seen``."""
    impl = _fused_math() if _on_gpu(x) else _fake_quant_math
    value, mask, at_ends = impl(x, scale.to(x.dtype).reshape(()),
                                alpha.to(x.dtype).reshape(()), qmin, qmax, ste)
    if count:
        clipped.add_(at_ends)
        seen.add_(x.numel())
    kept = kept_sample(x, sample) if sample else x.new_empty(0)
    return value, (mask if ste else x.new_empty(0, dtype=torch.bool)), kept


@torch.library.custom_op("blendq::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(grad: Tensor, saved: Tensor, ste: bool) -> Tensor:
    """The gradient of :func:`_fake_quant_op`'s value: ``grad`` where ``saved`` (the
    mask) is set (STE), ``grad·(1 - saved)`` (``saved``: α, in ``grad``'s dtype as the
    eager ``lerp`` takes it) for AB."""
    return _through(grad, saved, ste)


def _through(grad: Tensor, saved: Tensor, ste: bool) -> Tensor:
    """The gradient a quantizer passes back: ``grad`` where the mask ``saved`` is set
    (STE), ``grad·(1 - α)`` (``saved``: α) for AB, as autograd's ``lerp`` forms it."""
    return torch.where(saved, grad, 0.0) if ste else grad * (1 - saved.to(grad.dtype))


@torch.library.custom_op("blendq::blend_weight", mutates_args=())
def _blend_weight_op(w: Tensor, codes: Tensor, scale: Tensor, alpha: Tensor) -> Tensor:
    """:func:`_blend_math` in one operation (one compiled kernel on CUDA)."""
    return (_fused_blend() if _on_gpu(w) else _blend_math)(w, codes, scale, alpha)


@torch.library.custom_op("blendq::scale_gradient", mutates_args=())
def _scale_gradient_op(grad: Tensor, alpha: Tensor) -> Tensor:
    """``grad·(1 - α)``: AB's gradient to what it blends, as autograd's ``lerp`` forms
    it."""
    return _through(grad, alpha, False)


@torch.library.custom_op("blendq::blend_bias", mutates_args=())
def _blend_bias_op(bias: Tensor, w_scale: Tensor, a_scale: Tensor, alpha: Tensor,
                   ste: bool) -> Tensor:
    """A bias's training value, rounded to whole accumulator units ``γ_w·γ_a`` and
    blended by ``α``, as the eager path computes it: AB ``lerp(b, R(b), α)``; STE
    ``b + (lerp(b, R(b), α) - b)`` (:meth:`blendq.methods.Method.bias`)."""
    unit = w_scale.double().reshape(-1) * a_scale.double()
    rounded = round_bias(bias, unit).to(bias.dtype)
    value = torch.lerp(bias, rounded, alpha.to(bias.dtype))
    return bias + (value - bias) if ste else value


def _sign_math(x: Tensor, scale: Tensor, initialized: Tensor, alpha: Tensor, momentum: float,
               sample: int, update: bool, ste: bool) -> tuple[Tensor, Tensor]:
    """A sign activation's training step as the eager path computes it: with ``update``
    the batch's scale (the mean magnitude of its strided sample, :func:`binarize`) into
    the EMA ``scale`` (in place, ``initialized`` set), then ``lerp(x, sign(x)·scale, α)``
    and the straight-through mask ``-1 <= x <= 1`` (empty for AB)."""
    if update:
        part = strided_sample(x, sample) if sample else x
        batch = binarize(part, fixed=True)[1].reshape(()).to(scale.dtype)
        ema = torch.where(initialized, momentum * scale + (1 - momentum) * batch, batch)
        scale.copy_(ema)
        initialized.fill_(True)
    xq = quantize(x, scale, 1, signed=True).mul_(scale.to(x.dtype))
    value = torch.lerp(x, xq, alpha.to(x.dtype))
    mask = torch.ge(x, -1.0) & torch.le(x, 1.0) if ste else x.new_empty(0, dtype=torch.bool)
    return value, mask


@torch.library.custom_op("blendq::fake_sign", mutates_args=("scale", "initialized"))
def _fake_sign_op(x: Tensor, scale: Tensor, initialized: Tensor, alpha: Tensor,
                  momentum: float, sample: int, update: bool, ste: bool
                  ) -> tuple[Tensor, Tensor]:
    """:func:`_sign_math` in one operation. Its body runs eagerly on every device (a
    compiled body would sum the batch statistic and form the EMA in another order than
    the eager path, so the scale state would drift from it): one dispatched operation,
    a few kernels on CUDA until a compiled body is checked against it there."""
    return _sign_math(x, scale, initialized, alpha, momentum, sample, update, ste)


class _FakeSign(torch.autograd.Function):
    """A sign activation in one operation each way (:func:`_fake_sign_op`, then
    :func:`_fake_quant_backward_op`)."""

    @staticmethod
    def forward(ctx, x, scale, initialized, alpha, momentum, sample, update, ste):
        value, mask = torch.ops.blendq.fake_sign(x, scale, initialized, alpha, momentum,
                                                 sample, update, ste)
        ctx.ste = ste
        ctx.save_for_backward(mask if ste else alpha)
        return value

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        grad = torch.ops.blendq.fake_quant_backward(grad, saved, ctx.ste)
        return grad, None, None, None, None, None, None, None


def fake_sign(x: Tensor, scale: Tensor, initialized: Tensor, alpha: Tensor, rule: str,
              momentum: float, sample: int | None, update: bool) -> Tensor:
    """The fused path of a sign activation (±scale) in training: with ``update`` the
    batch's mean magnitude (on a strided sample of about ``sample`` elements) into the EMA
    ``scale`` in place, then ``lerp(x, sign(x)·scale, α)`` with the gradient of ``rule``
    (``"ste"``: passed where ``|x| <= 1``; ``"ab"``: ``(1 - α)``); one operation each
    way, equal bit for bit to the eager path."""
    return _FakeSign.apply(x, scale, initialized, alpha, momentum, sample or 0, update,
                           rule == "ste")


class _FakeQuant(torch.autograd.Function):
    """Activation fake quantization in one forward pass and one backward pass, saving at
    most one byte per element (the STE mask; nothing for AB, whose gradient is
    ``(1 - alpha)·grad``). Fused: each pass one operation (:func:`_fake_quant_op`)."""

    @staticmethod
    def forward(ctx, x, scale, alpha, qmin, qmax, ste, fused, sample, counters):
        ctx.ste, ctx.fused = ste, fused
        ctx.set_materialize_grads(False)  # the second result has no gradient
        kept = None
        if fused:  # (autograd records nothing in here: no detaching needed)
            clipped, seen = counters if counters is not None else (_NO_COUNT, _NO_COUNT)
            value, mask, kept = torch.ops.blendq.fake_quant(
                x, scale, alpha, qmin, qmax, ste, counters is not None, sample, clipped, seen)
            clipped = None
        else:
            scale, alpha = scale.to(x.dtype).reshape(()), alpha.to(x.dtype).reshape(())
            value, mask, clipped = _fake_quant_math(x, scale, alpha, qmin, qmax, ste)
            ctx.mark_non_differentiable(clipped)
        if kept is not None:
            ctx.mark_non_differentiable(kept)
        ctx.save_for_backward(mask if ste else alpha)
        return value, clipped if clipped is not None else kept

    @staticmethod
    def backward(ctx, grad, _other):
        if grad is None:
            return (None,) * 9
        (saved,) = ctx.saved_tensors
        if ctx.fused:
            grad = torch.ops.blendq.fake_quant_backward(grad, saved, ctx.ste)
        else:
            grad = _through(grad, saved, ctx.ste)
        return grad, None, None, None, None, None, None, None, None


_NO_COUNT = torch.zeros(())  # counters of a batch that counts nothing (never written)


class _Blended(torch.autograd.Function):
    """A parameter's training value computed by one operator ``op(x, *rest)`` (the
    weight's or the rounded bias's blend), with AB's gradient ``(1 - α)·grad`` (one
    operation) or straight through (STE: passed unchanged, no operation)."""

    @staticmethod
    def forward(ctx, x, alpha, ste, op, *rest):
        ctx.ste, ctx.inputs = ste, len(rest)
        if not ste:
            ctx.save_for_backward(alpha)
        return op(x, *rest)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.ste:
            (alpha,) = ctx.saved_tensors
            grad = torch.ops.blendq.scale_gradient(grad, alpha)
        return (grad, None, None, None) + (None,) * ctx.inputs


def blend_bias(bias: Tensor, w_scale: Tensor, a_scale: Tensor, alpha: Tensor,
               rule: str) -> Tensor:
    """The fused path of a bias's training value: rounded to whole accumulator units
    ``γ_w·γ_a`` (:func:`round_bias`) and blended by ``α`` in one operation forward and
    at most one backward, with the gradient of ``rule`` (``"ab"``: ``(1 - α)``;
    ``"ste"``: straight through), equal bit for bit to the eager path."""
    ste = rule == "ste"
    return _Blended.apply(bias, alpha, ste, torch.ops.blendq.blend_bias, w_scale, a_scale,
                          alpha, ste)


def blend_weight(w: Tensor, codes: Tensor, scale: Tensor, alpha: Tensor, rule: str) -> Tensor:
    """The fused path of a weight's training value: ``lerp(w, scale·codes, α)`` (``scale``
    broadcastable to ``codes``) in one operation forward and at most one backward, with
    the gradient of ``rule`` (``"ab"``: ``(1 - α)``; ``"ste"``: straight through), equal
    bit for bit to the eager path's value and gradient."""
    return _Blended.apply(w, alpha, rule == "ste", torch.ops.blendq.blend_weight, codes, scale,
                          alpha)


def fake_quantize(x: Tensor, scale: Tensor, alpha: Tensor, bits: int, signed: bool,
                  method: str, fused: bool | None = None, full: bool = True
                  ) -> tuple[Tensor, Tensor]:
    """``(value, clipped)``: ``x`` on the grid at ``scale`` blended with ``x`` by ``alpha``,
    with the gradient of ``method`` (``"ste"``: passed where ``x`` lies within half a step
    of the grid, ``"ab"``: ``(1 - alpha)``), and the number of elements at the grid's
    ends (a float64 scalar on the device). ``fused``: one operation each way, one
    compiled kernel on CUDA (default: there, outside a graph torch.compile traces); else
    the same math eagerly."""
    if fused is None:
        fused = fuses(x)
    if not fused:
        _check_grid(bits, signed)
        qmin, qmax = grid(bits, signed, full)
        return _FakeQuant.apply(x, scale, alpha, qmin, qmax, method == "ste", False, 0, None)
    counters = (torch.zeros((), dtype=torch.float64, device=x.device),
                torch.zeros((), device=x.device))
    value, _ = fused_fake_quantize(x, scale, alpha, bits, signed, method, full, 0, counters)
    return value, counters[0]


def fused_fake_quantize(x: Tensor, scale: Tensor, alpha: Tensor, bits: int, signed: bool,
                        method: str, full: bool = True, sample: int = 0,
                        counters: tuple[Tensor, Tensor] | None = None
                        ) -> tuple[Tensor, Tensor]:
    """``(value, kept)``: :func:`fake_quantize`'s value on the fused path, one operation
    each way (what an activation quantizer runs in training there); ``counters``
    (``clipped``, ``seen``) are added to in place (the count at the grid's ends, the
    batch's size; ``None``: nothing counted), and ``kept`` is a copy of the batch's
    strided sample of about ``sample`` elements in float32 or wider
    (:func:`strided_sample`; empty for 0)."""
    _check_grid(bits, signed)
    qmin, qmax = grid(bits, signed, full)
    return _FakeQuant.apply(x, scale, alpha, qmin, qmax, method == "ste", True, sample,
                            counters)


def _check_grid(bits: int, signed: bool) -> None:
    if is_sign(bits, signed):
        raise ValueError("fake_quantize takes grids of 2 or more levels; sign has its own")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes packed into bytes (uint8): 1-bit signs eight per byte (bit set =
    +1, first code in the high bit), codes of 2-4 bits two per byte as ``code + 8``
    nibbles (first code in the low nibble). Wider codes are returned as int8."""
    flat = codes.reshape(-1).to(torch.int16)
    if bits == 1:
        bits8 = (flat > 0).to(torch.uint8)
        bits8 = torch.cat([bits8, bits8.new_zeros(-bits8.numel() % 8)]).reshape(-1, 8)
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        return (bits8 * weights).sum(1, dtype=torch.uint8)
    if bits <= 4:
        nibbles = (flat + 8).to(torch.uint8)
        nibbles = torch.cat([nibbles, nibbles.new_full((nibbles.numel() % 2,), 8)])
        return nibbles[0::2] | (nibbles[1::2] << 4)
    return codes.reshape(-1).to(torch.int8).clone()


def unpack_codes(packed: Tensor, bits: int, shape) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    if packed.dtype != torch.uint8:
        return packed.reshape(shape).to(torch.int8)
    if bits == 1:
        shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
        flat = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].to(torch.int8) * 2 - 1
    else:
        low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
        flat = torch.stack([low, high], 1).reshape(-1)[:n] - 8
    return flat.reshape(shape).to(torch.int8)


class _LearnedStep(torch.autograd.Function):
    """:func:`lsq` as one autograd node. Forward: divide, clamp, round and multiply in
    one buffer (then the blend, unless α is 1). Backward: ``v = x / s`` computed again
    from the kept input (no intermediate kept), the gradient to ``x`` masked where the
    clamp passes (on the CPU one ``hardtanh_backward``), the step's from the same ``v``.
    The values are those of the chain of separate operations (at α = 1 on the CPU the
    blend is skipped, as :meth:`blendq.methods.Method.mix` skips it: a zero may keep
    its sign, an infinite input clamps); the gradients equal theirs to float rounding
    (the chain multiplies the gradient by ``s`` and divides it again). Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, alpha: Tensor | None, qmin: int, qmax: int,
                grad_scale: float) -> Tensor:
        value = torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)
        ctx.one = alpha is None or alpha_is_one(alpha)  # lerp's value at 1 is the codes'
        if not ctx.one:
            value = torch.lerp(x, value, alpha)
        # the mask by one hardtanh_backward where x / s is in x's dtype
        ctx.bounds = _grid_bounds(qmin, qmax, x.dtype) if _hardtanh_masks(x) and \
            step.dtype == x.dtype else None
        ctx.grid, ctx.grad_scale = (qmin, qmax), grad_scale
        ctx.save_for_backward(x, step, *(() if ctx.one else (alpha,)))
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, step, *alpha = ctx.saved_tensors
        qmin, qmax = ctx.grid
        blended = grad if ctx.one else grad * alpha[0]  # the gradient reaching lsq's value
        v = torch.div(x, step)
        inside = None if ctx.bounds is not None else (v >= qmin) & (v <= qmax)
        if inside is None:  # straight through where qmin <= v <= qmax
            to_x = torch.ops.aten.hardtanh_backward(blended, v, *ctx.bounds)
        else:
            to_x = torch.where(inside, blended, 0)
        to_step = None
        if ctx.needs_input_grad[1]:  # LSQ's d/ds: codes - v inside, codes outside
            codes = torch.clamp(v, qmin, qmax).round_()
            if inside is None:  # codes · g, less v · g where it passes
                part = codes.mul_(blended).sub_(v.mul_(to_x))
            else:  # per element: no cancellation in bf16
                part = torch.where(inside, codes - v, codes).mul_(blended)
            to_step = part.sum_to_size(step.shape) * ctx.grad_scale
        if not ctx.needs_input_grad[0]:
            to_x = None
        elif not ctx.one:
            to_x = to_x + grad * (1 - alpha[0])
        return to_x, to_step, None, None, None, None


def lsq(x: Tensor, step: Tensor, bits: int, signed: bool = True,
        grad_scale: float = 1.0, full: bool = False, alpha: Tensor | None = None) -> Tensor:
    """Learned step size quantization (Esser et al., ICLR 2020, eqs. 1-3):
    ``round(clamp(x / s, qmin, qmax)) · s``. The gradient to ``x`` passes straight
    through inside the grid's reach (zero outside); the gradient to ``s`` is LSQ's
    ``round(x/s) - x/s`` inside and ``qmin``/``qmax`` outside, multiplied by
    ``grad_scale`` (LSQ's ``1 / sqrt(N · qmax)``). The value is ``s · codes`` exactly,
    as the converted layer computes it. ``full``: see :func:`grid`. ``alpha``: the value
    is ``lerp(x, that, alpha)``, with lerp's gradient to ``x`` (``None``: α = 1; α gets
    none: it is a buffer). ``step`` broadcasts to ``x`` (one per tensor, channel or
    block). One autograd node."""
    qmin, qmax = grid(bits, signed, full)
    if alpha is not None:
        alpha = alpha.to(x.dtype)
    return _LearnedStep.apply(x, step, alpha, qmin, qmax, grad_scale)


def check_group_size(group_size: int | None) -> None:
    """The one rule for a block size: ``None``, or a power of two >= 16 (ONNX Runtime's
    4-bit ``MatMulNBits`` kernels, which run block-quantized weights, take no other)."""
    if group_size is None:
        return
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or \
            group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16 (ONNX Runtime's 4-bit "
                         f"MatMulNBits kernels take no other block size), got {group_size!r}")


def block_layout(shape: tuple[int, ...], axis: int, group_size: int) -> tuple[int, int, int]:
    """``(rows, K, blocks)`` of a weight cut into blocks: one row per output channel
    (``axis``), ``K`` the row's other elements in memory order, ``blocks = ceil(K / G)``
    (the last block holds the remainder when ``G`` does not divide ``K``)."""
    rows = shape[axis]
    k = math.prod(shape) // max(rows, 1)
    return rows, k, -(-k // group_size)


def to_blocks(w: Tensor, axis: int, group_size: int) -> Tensor:
    """``w`` as ``(rows · blocks, G)``: each output channel's elements in blocks of ``G``,
    the last block zero-padded (zeros change no PPQ sum: their codes are 0)."""
    rows, k, blocks = block_layout(tuple(w.shape), axis, group_size)
    flat = w.movedim(axis, 0).reshape(rows, k)
    pad = blocks * group_size - k
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(rows * blocks, group_size)


def from_blocks(b: Tensor, shape: tuple[int, ...], axis: int, group_size: int) -> Tensor:
    """Inverse of :func:`to_blocks`: a tensor of ``shape`` from its blocks."""
    rows, k, blocks = block_layout(tuple(shape), axis, group_size)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return b.reshape(rows, blocks * group_size)[:, :k].reshape(moved).movedim(0, axis)


def expand_blocks(scale: Tensor, shape: tuple[int, ...], axis: int, group_size: int) -> Tensor:
    """A ``(rows, blocks)`` block scale repeated over each block's elements, shaped like
    the weight (differentiable: LSQ's step gradient sums over each block)."""
    rows, k, blocks = block_layout(tuple(shape), axis, group_size)
    per_element = scale.reshape(rows, blocks, 1).expand(rows, blocks, group_size)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return per_element.reshape(rows, blocks * group_size)[:, :k].reshape(moved).movedim(0, axis)


def block_lengths(shape: tuple[int, ...], axis: int, group_size: int) -> Tensor:
    """The element count of every block of a weight, row by row (int64, for
    :func:`ppq_segments`)."""
    rows, k, blocks = block_layout(tuple(shape), axis, group_size)
    lengths = torch.full((rows, blocks), group_size, dtype=torch.long)
    lengths[:, -1] = k - (blocks - 1) * group_size
    return lengths.reshape(-1)


def int8_multiples(bits: int) -> int:
    """How many whole multiples of one per-channel unit a block scale may take in a layer
    trained for an int8 matrix product (``QuantPolicy(int8_matmul=True)``): the most for
    which every code times its multiple stays within -64..64 (``2^(7 - bits)``: 8 at 4
    bits), so the product of a uint8 input and such a weight never saturates the 16-bit
    pair sums of x86's u8·s8 instructions (AVX2 without VNNI)."""
    if not 2 <= bits <= 4:
        raise ValueError(f"int8 matmul weights take 2..4-bit codes, got {bits}")
    return 2 ** (7 - bits)


def snap_block_scales(scale: Tensor, multiples: int, ceil: bool = False,
                      dtype: torch.dtype | None = None) -> Tensor:
    """Block scales ``(rows, blocks)`` moved onto whole multiples ``1..multiples`` of one
    unit per row, ``unit ≈ max(row) / multiples`` (so the row's largest block keeps its
    scale to the unit's rounding): nearest multiple, or the next one up with ``ceil``
    (min/max scales: nothing that fitted clips). The unit keeps as many significant bits
    as ``dtype`` (the weight's; default ``scale``'s) holds less those of ``multiples``, so
    every ``multiple · unit`` is exact in it, in bfloat16 too. Then ``codes · multiple`` is
    an int8 weight with the per-row scale ``unit`` (:func:`int8_weight_of_blocks`). A row
    whose scales are all 0 stays."""
    significant = round(-math.log2(torch.finfo(dtype or scale.dtype).eps)) + 1  # 24 in float32
    digits = significant - multiples.bit_length()
    peak = scale.float().amax(-1, keepdim=True)
    mantissa, exponent = torch.frexp(peak / multiples)  # mantissa in [0.5, 1)
    kept = mantissa * 2.0 ** digits
    kept = torch.ceil(kept) if ceil else torch.round(kept)
    unit = torch.ldexp(kept / 2.0 ** digits, exponent)
    ratio = scale.float() / torch.where(unit > 0, unit, torch.ones_like(unit))
    k = torch.ceil(ratio * (1 - 2.0 ** -20)) if ceil else torch.round(ratio)
    return torch.where(unit > 0, unit * k.clamp(1, multiples), scale.float()).to(scale.dtype)


def int8_weight_of_blocks(codes: Tensor, scale: Tensor, multiples: int,
                          group_size: int) -> tuple[Tensor, Tensor]:
    """``(int8 weight, unit)`` of block codes ``(rows, K)`` and scales ``(rows, blocks)``
    (blocks of ``group_size``, the last holding the remainder) snapped by
    :func:`snap_block_scales`: ``codes · multiple`` per block and one float unit per row,
    so that ``unit · weight`` is ``scale · codes`` (to float rounding)."""
    k = codes.shape[1]
    scale = scale.float()
    unit = scale.amax(-1, keepdim=True) / multiples  # exact: the largest multiple's block
    safe = torch.where(unit > 0, unit, torch.ones_like(unit))
    mult = torch.round(scale / safe).clamp(0, multiples)
    if ((mult * unit - scale).abs() > 1e-5 * scale.abs()).any():
        raise ValueError(f"block scales are not whole multiples 1..{multiples} of one unit "
                         "per row: train with QuantPolicy(int8_matmul=True)")
    per_element = mult.to(torch.int16).repeat_interleave(group_size, dim=1)[:, :k]
    weight = codes.to(torch.int16) * per_element
    return weight.to(torch.int8), unit.reshape(-1)


def int8_rows(x: Tensor) -> Tensor:
    """``x`` rounded to int8 per row (its last dimension), at run time: ``s = max|x| /
    127``, ``round(x · (127 / max|x|)) · s`` in float32, as :func:`int8_blocks` with one
    block a row (the input rounding of a layer trained with ``int8_matmul``; its export
    writes it with standard operators before ``MatMulInteger``)."""
    return int8_blocks(x, x.shape[-1])


def int8_blocks(x: Tensor, block: int) -> Tensor:
    """``x`` rounded as ONNX Runtime's ``MatMulNBits`` rounds its input at accuracy level 4:
    along the last dimension, per block of ``block`` elements, ``s = max|x| / 127`` and
    ``clamp(round(x · (127 / max|x|)), -128, 127) · s`` in float32 (a block whose peak is
    0, or so small that ``127 / max|x|`` overflows, becomes 0). Measured against the
    kernel (onnxruntime 1.32, x86): equal to float32 rounding of its accumulation. Both
    divisions are true float32 divisions, as the kernel's (PyTorch may otherwise multiply by
    a reciprocal, which rounds twice). Returns ``x``'s dtype and shape."""
    k = x.shape[-1]
    blocks = -(-k // block)
    xf = x.float()
    if blocks * block != k:
        xf = torch.nn.functional.pad(xf, (0, blocks * block - k))
    xb = xf.reshape(*xf.shape[:-1], blocks, block)
    peak = xb.abs().amax(-1, keepdim=True)
    finite = peak > 127.0 / torch.finfo(torch.float32).max  # 127 / peak stays finite
    levels = torch.full_like(peak, 127.0)
    inverse = torch.where(finite, levels / peak, torch.zeros_like(peak))
    codes = torch.clamp(torch.round(xb * inverse), -128, 127)
    out = (codes * (peak / levels)).reshape(xf.shape)
    return out[..., :k].to(x.dtype)


def ppq_segments(x: Tensor, lengths: Tensor, bits: int, scale: Tensor, max_iter: int,
                 codes: Tensor | None = None, signed: bool = True, full: bool = False,
                 index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`ppq` of many tensors at once: ``x`` is their flat concatenation, cut into
    consecutive segments of ``lengths`` (one per output channel, or one per tensor),
    each with its own scale (``scale``, one per segment, the warm start). Runs exactly
    ``max_iter`` iterations (no host synchronisation); the number of operations does not
    grow with the number of tensors. ``codes``: an output buffer like ``x``;
    ``signed``/``full``: the grid (:func:`grid`). ``index``: each row's segment
    (``segment_index(lengths)``), for callers that run many PPQs over one layout: a
    gather by index is several times faster on the CPU than ``repeat_interleave``.

    ``x`` may also be 2-D, ``(rows, chunk)``, with ``lengths`` counting rows: each
    segment is whole rows (zero-padded at its end: zeros change neither sum). Its sums
    then run as row sums, vectorised and spread over threads, before the segment
    reduction, which is a serial loop on the CPU (~30× slower than a sum per element).

    Returns ``(codes, scale)`` flat, as :func:`ppq` would per segment (up to the order of
    floating-point summation)."""
    qmin, qmax = grid(bits, signed, full)
    gamma = scale
    for _ in range(max_iter):
        # sizes given and lengths trusted: neither op reads a value back to the host
        per_row = torch.index_select(gamma, 0, index) if index is not None else \
            torch.repeat_interleave(gamma, lengths, output_size=x.shape[0])
        codes = _codes(x, per_row.view(-1, *[1] * (x.dim() - 1)), qmin, qmax, codes)
        num = segment_sum(x * codes, lengths)  # (S,)
        den = segment_sum(codes * codes, lengths)
        gamma = torch.where(den > 0, num / den.clamp(min=1), gamma)
    return codes, gamma


def segment_index(lengths: Tensor) -> Tensor:
    """The segment of each row, for :func:`ppq_segments` (``lengths``: rows a segment)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def segment_sum(t: Tensor, lengths: Tensor) -> Tensor:
    """Sums of consecutive runs of ``lengths`` rows of ``t`` (rows: dim 0)."""
    if t.dim() > 1:
        t = t.sum(dim=tuple(range(1, t.dim())))
    return torch.segment_reduce(t, "sum", lengths=lengths, unsafe=True)
