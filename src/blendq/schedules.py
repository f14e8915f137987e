"""α schedules: pure functions of the global step (paper eq. 6).

A schedule holds no counter. ``schedule(step)`` gives α in [0, 1], monotone
non-decreasing in ``step``, so resumed runs and distributed ranks agree by
construction. ``every`` (the paper's update frequency ``f``) holds α constant
between multiples of ``every``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedule", "cubic", "exponential", "linear", "constant"]

_KINDS = ("cubic", "exponential", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    """α as a function of the step. Build one with :func:`cubic` and friends.

    kind: ``cubic`` (eq. 6), ``linear``, ``exponential`` (``1 - exp(-rate·(step - t0))``)
    or ``constant``; ``t0``/``t1``: the window where α rises (for ``cubic``/``linear``
    ``t0 == t1`` is a jump from 0 to 1 at ``t0``); ``every``: update frequency.
    """

    kind: str
    t0: int = 0
    t1: int = 0
    rate: float = 0.0
    value: float = 1.0
    every: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.t0 < 0 or self.t1 < self.t0:
            raise ValueError(f"window needs 0 <= t0 <= t1, got t0={self.t0}, t1={self.t1}")
        if self.kind == "exponential" and self.rate <= 0:
            raise ValueError(f"rate must be > 0 for an exponential schedule, got {self.rate}")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"value must be in [0, 1], got {self.value}")

    def __call__(self, step: int) -> float:
        step = (int(step) // self.every) * self.every
        if self.kind == "constant":
            return float(self.value)
        if step <= self.t0:
            return 0.0
        if self.kind == "exponential":
            return 1.0 - math.exp(-self.rate * (step - self.t0))
        if step >= self.t1:
            return 1.0
        frac = (self.t1 - step) / (self.t1 - self.t0)  # in (0, 1)
        return 1.0 - frac**3 if self.kind == "cubic" else 1.0 - frac


def cubic(t0: int, t1: int, every: int = 1) -> Schedule:
    """Paper eq. 6: 0 up to ``t0``, ``1 - ((t1 - step)/(t1 - t0))^3`` in the window, then 1."""
    return Schedule("cubic", t0=t0, t1=t1, every=every)


def linear(t0: int, t1: int, every: int = 1) -> Schedule:
    """0 up to ``t0``, rising linearly to 1 at ``t1``."""
    return Schedule("linear", t0=t0, t1=t1, every=every)


def exponential(rate: float, t0: int = 0, every: int = 1) -> Schedule:
    """The paper's alternative ``1 - exp(-rate · (step - t0))`` (0 up to ``t0``)."""
    return Schedule("exponential", t0=t0, t1=t0, rate=rate, every=every)


def constant(value: float = 1.0) -> Schedule:
    """α fixed at ``value`` (``constant(1.0)``: quantized from the first step, as STE is)."""
    return Schedule("constant", value=value)
