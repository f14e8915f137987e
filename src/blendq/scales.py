"""Where a quantizer's scale comes from: one object per scale source, apart from the
method (:mod:`blendq.methods`), which gives the value and the gradient.

A quantizer holds one source, chosen once from its spec's ``scale`` and its method
(:func:`for_quantizer`):

- :class:`LeastSquares` (``"ppq"``, the paper's): a weight's projection by PPQ,
  warm-started from the cached scale (the first one searched), and refreshed with its
  group as one flat PPQ (``groups``); an activation batch's least-squares scale on a
  strided sample, which can wait for one settle of many quantizers (``defers``);
- :class:`Ranges` (``"minmax"``, TensorFlow's QAT: Jacob et al. 2018, Krishnamoorthi
  2018): a weight's largest magnitude, an activation batch's largest magnitude (largest
  value on an unsigned grid), one reduction where the batch is quantized;
- :class:`LearnedStep` (LSQ, Esser et al. 2020): a ``step`` Parameter the optimizer
  trains (``learned``), started from the source it wraps.

The activation EMA over batches is the quantizer's; what each batch contributes is the
source's (:meth:`ScaleSource.batch`), and so is how a calibration combines its batches
(:meth:`ScaleSource.calibrated`). Sign grids (1 bit, or a ±1 activation) take their
scale from :func:`blendq.functional.binarize` whatever the source.
"""

from __future__ import annotations

from torch import Tensor

from . import functional as F

__all__ = ["ScaleSource", "LeastSquares", "Ranges", "LearnedStep", "SOURCES", "get",
           "for_quantizer"]


class ScaleSource:
    """A scale source (the base says what each part of a quantizer may ask of one)."""

    name = ""
    groups = False  # weight refreshes can run as one flat PPQ over many layers
    defers = False  # a sampled activation statistic can wait for a settle of many
    learned = False  # the scale is a Parameter (``step``) the optimizer trains
    warm_start = False  # starts each batch's statistic from the EMA (0 before the first)

    def weight(self, x: Tensor, bits: int, axis: int | None, warm: Tensor | None,
               max_iter: int, init_iter: int) -> tuple[Tensor, Tensor]:
        """``(codes, scale)`` of a weight (``x``: blocks as rows where the weight has
        them; ``axis``: one scale per slice along it, ``None``: one for all); ``warm``:
        the cached scale, ``None`` before the first projection."""
        raise NotImplementedError

    def batch(self, x: Tensor, bits: int, signed: bool, warm: Tensor, max_iter: int,
              sample: int | None) -> Tensor:
        """An activation batch's scale (0-d; ``warm``: the EMA, 0 before the first)."""
        raise NotImplementedError

    def calibrated(self, scales: Tensor) -> Tensor:
        """One scale from the calibration batches' (stacked on the first dimension)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class LeastSquares(ScaleSource):
    """PPQ (the paper's Algorithm 2): the scale that minimises the squared error."""

    name = "ppq"
    groups = True
    defers = True
    warm_start = True

    def weight(self, x, bits, axis, warm, max_iter, init_iter):
        if warm is not None:
            return F.ppq(x, bits, axis=axis, max_iter=max_iter, scale=warm, fixed=True)
        start = F.search_scale(x, bits, axis=axis)
        return F.ppq(x, bits, axis=axis, max_iter=init_iter, scale=start, fixed=True)

    def batch(self, x, bits, signed, warm, max_iter, sample):
        if sample is not None:
            x = F.strided_sample(x, sample)
        _, scale = F.ppq(x, bits, signed=signed, max_iter=max_iter, scale=warm, fixed=True,
                         full=True)
        return scale.reshape(())

    def calibrated(self, scales):
        return scales.mean(0)


class Ranges(ScaleSource):
    """Min/max ranges (TensorFlow's QAT, the paper's "TF" columns): the largest magnitude
    (on an unsigned grid, the largest value) onto the grid's end, the whole batch."""

    name = "minmax"

    def weight(self, x, bits, axis, warm, max_iter, init_iter):
        return F.minmax(x, bits, axis=axis)

    def batch(self, x, bits, signed, warm, max_iter, sample):
        return F.minmax(x, bits, signed=signed, full=True)[1].reshape(())

    def calibrated(self, scales):
        return scales.amax(0)


class LearnedStep(ScaleSource):
    """LSQ's learned step: a Parameter trained by the optimizer with LSQ's scaled
    gradient (:func:`blendq.functional.lsq`), started from ``start``'s scale (the first
    projection of the weight, the first training batch's statistic)."""

    learned = True

    def __init__(self, start: ScaleSource) -> None:
        self.start = start
        self.name = f"lsq from {start.name}"
        self.warm_start = start.warm_start

    def weight(self, x, bits, axis, warm, max_iter, init_iter):
        return self.start.weight(x, bits, axis, warm, max_iter, init_iter)

    def batch(self, x, bits, signed, warm, max_iter, sample):
        return self.start.batch(x, bits, signed, warm, max_iter, sample)

    def calibrated(self, scales):
        return self.start.calibrated(scales)


SOURCES: dict[str, ScaleSource] = {"ppq": LeastSquares(), "minmax": Ranges()}
assert tuple(SOURCES) == F.SCALES  # the names the specs accept


def get(name: str) -> ScaleSource:
    """The source of a spec's ``scale`` name (checked by the spec)."""
    F.check_scale("scale", name)
    return SOURCES[name]


def for_quantizer(scale: str, learns_scale: bool) -> ScaleSource:
    """A quantizer's source: the spec's ``scale``, learned from there where the method
    learns its scale (:attr:`blendq.methods.Method.learns_scale`)."""
    source = get(scale)
    return LearnedStep(source) if learns_scale else source
