"""Quantization methods: one object per method, chosen once by name.

A method decides, for a quantizer, everything that differs between AB, STE and LSQ:
the value the layer computes with and its gradient (:meth:`Method.mix`), the gradient
of a bias rounded to accumulator units (:meth:`Method.bias`), whether α rises under a
schedule or is 1 from the first forward (``blends``), whether the scale is learned
(``learns_scale``), whether weight refreshes can run as one grouped PPQ (``groups``)
and what the gradient becomes once α reaches 1 (:meth:`Method.at_alpha_one`). The
eager path and the fused kernel (:func:`blendq.functional.fake_quantize`, told the
method's ``gradient`` rule) ask the same object.

To add a method: subclass :class:`Method`, set ``name``, override what differs, and
register it with :func:`register`; the policy, the CLI and the quantizers accept it by
name from then on, and ``tests/test_methods.py`` runs every registered method through
prepare, training, convert and export.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Method", "AlphaBlend", "StraightThrough", "LearnedStep", "METHODS", "get",
           "register", "check_method"]


class Method:
    """What one quantization method does (the base is straight-through)."""

    name = "ste"
    blends = False  # α rises from 0 under a schedule (else it is 1 from the first forward)
    learns_scale = False  # the scale is a Parameter (``step``) trained by the optimizer
    groups = True  # weight refreshes may run as one PPQ over many layers (WeightGroup)
    gradient = "ste"  # the rule the fused kernel applies: "ste" (mask) or "ab" (1 - α)

    def mix(self, x: Tensor, xq: Tensor, alpha: Tensor, lo=None, hi=None) -> Tensor:
        """The tensor a layer computes with, ``lerp(x, xq, α)``, and its gradient.
        ``xq`` must be a fresh tensor: the straight-through value is written into it;
        ``lo``/``hi``: where the straight-through gradient passes."""
        xq, alpha = xq.to(x.dtype), alpha.to(x.dtype)
        if torch.compiler.is_compiling():  # fused by the compiler; out= would break its graph
            value = torch.lerp(x.detach(), xq, alpha)
        elif F.alpha_is_one(alpha):
            value = xq  # lerp's exact value at 1
        else:
            value = torch.lerp(x.detach(), xq, alpha, out=xq)
        return F.straight_through(x, value, lo, hi)

    def bias(self, bias: Tensor, rounded: Tensor, alpha: Tensor, training: bool) -> Tensor:
        """``b + α·(R(b) - b)`` (the bias rounded to accumulator units, blended), with
        this method's gradient to ``b`` in training: straight through."""
        if not training:
            return torch.lerp(bias, rounded, alpha)
        return bias + (torch.lerp(bias.detach(), rounded, alpha) - bias.detach())

    def at_alpha_one(self, after: str) -> Method:
        """The method once α reaches 1 (``after``: ``"freeze"`` or ``"ste"``)."""
        return self

    @property
    def kernel(self) -> str | None:
        """The gradient rule under which the fused activation kernel
        (:func:`blendq.functional.fake_quantize`) computes exactly this method's value
        and gradient, or ``None``: the kernel implements :meth:`Method.mix` (``"ste"``)
        and :meth:`AlphaBlend.mix` (``"ab"``) only, so a method that defines its own
        ``mix`` runs the eager path on every device, never the kernel's gradient."""
        own = type(self).mix
        if own is Method.mix and self.gradient == "ste":
            return "ste"
        if own is AlphaBlend.mix and self.gradient == "ab":
            return "ab"
        return None

    @property
    def bias_kernel(self) -> str | None:
        """The rule under which the fused bias operator
        (:func:`blendq.functional.blend_bias`) computes exactly this method's
        :meth:`bias` in training (``"ste"``: :meth:`Method.bias`, ``"ab"``:
        :meth:`AlphaBlend.bias`), or ``None`` for a method with a ``bias`` of its own."""
        own = type(self).bias
        return "ste" if own is Method.bias else "ab" if own is AlphaBlend.bias else None

    def __repr__(self) -> str:
        return self.name


class StraightThrough(Method):
    """STE: the quantized value forward, the gradient passed straight through inside the
    grid's reach (Bengio et al. 2013)."""


class AlphaBlend(Method):
    """AB (paper eq. 4): ``(1 - α)·x + α·P(x)``; the gradient reaches ``x`` only through
    ``1 - α``, nothing is estimated."""

    name = "ab"
    blends = True
    gradient = "ab"

    def mix(self, x: Tensor, xq: Tensor, alpha: Tensor, lo=None, hi=None) -> Tensor:
        return F.blend(x, xq, alpha)

    def bias(self, bias: Tensor, rounded: Tensor, alpha: Tensor, training: bool) -> Tensor:
        return torch.lerp(bias, rounded, alpha)  # d/db = 1 - α

    def at_alpha_one(self, after: str) -> Method:
        return _AlphaBlendThenStraight() if after == "ste" else self


class _AlphaBlendThenStraight(StraightThrough):
    """AB once α = 1 under ``after="ste"`` (the hybrid): the forward value at α = 1 is the
    same, the latent weights keep training straight-through. Still reported as AB."""

    name = "ab"
    blends = True


class LearnedStep(StraightThrough):
    """LSQ (Esser et al. 2020): a learned ``step`` per tensor or channel, started from the
    PPQ scale, with LSQ's scaled gradient (:func:`blendq.functional.lsq`)."""

    name = "lsq"
    learns_scale = True
    groups = False


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available by its name."""
    METHODS[method.name] = method
    return method


for _method in (AlphaBlend(), StraightThrough(), LearnedStep()):
    register(_method)


def check_method(field: str, name: str) -> None:
    """The one rule for a method name (``field``: what the name was given as)."""
    if name not in METHODS:
        raise ValueError(f"{field} must be one of {tuple(METHODS)}, got {name!r}")


def get(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        ValueError: no method has that name.
    """
    check_method("method", name)
    return METHODS[name]
