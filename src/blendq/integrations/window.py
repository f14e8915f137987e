"""α over a window of a run, from the global step: what the trainer callbacks share."""

from __future__ import annotations

import math

from torch import nn

from ..layers import BlendMixin, BlendSite
from ..schedules import Schedule, cubic, linear
from ..transform import AFTER_ALPHA, AlphaController, check_weights, telemetry

__all__ = ["AlphaWindow"]

SCHEDULES = ("cubic", "linear")


class AlphaWindow:
    """α of a prepared model as a function of the global step: 0 before the window,
    rising (paper eq. 6: cubic; or linear) inside it, 1 from its end, which a window
    ending at 1.0 places on the run's last step. The window is in fractions of the
    run's total steps. A model with nothing to blend (STE, LSQ) is kept at α = 1.

    Args:
        window: ``(start, end)`` fractions of the run, ``0 <= start <= end <= 1``.
        schedule: ``"cubic"`` (eq. 6) or ``"linear"``.
        after: what AB's weights do once α = 1: ``"freeze"`` or ``"ste"``.

    Raises:
        ValueError: a window outside [0, 1] or reversed, an unknown schedule or ``after``
            (on construction); at :meth:`bind`, a model with no blendq layers or an
            unknown total step count.
    """

    def __init__(self, window: tuple[float, float] = (0.0, 1.0), schedule: str = "cubic",
                 after: str = "freeze") -> None:
        try:
            start, end = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError(f"window must be (start, end) fractions of the run, got "
                             f"{window!r}") from None
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start <= end <= 1 (fractions of the "
                             f"run's steps), got {window!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if after not in AFTER_ALPHA:
            raise ValueError(f"after must be one of {AFTER_ALPHA}, got {after!r}")
        self.window, self.schedule_name, self.after = (start, end), schedule, after
        self.controller: AlphaController | None = None
        self.model: nn.Module | None = None
        self.codes: dict | None = None  # the last telemetry's weight codes
        self._last_step: int | None = None  # the step α and the codes were last applied at

    def steps(self, total_steps: int) -> tuple[int, int]:
        """The window in steps; its end is at most the run's last step."""
        last = max(total_steps - 1, 0)
        end = min(round(self.window[1] * total_steps), last)
        return min(round(self.window[0] * total_steps), end), end

    def bind(self, model: nn.Module, total_steps: int | float | None) -> AlphaWindow:
        """Attach to ``model`` for a run of ``total_steps`` optimizer steps."""
        if not any(isinstance(m, BlendMixin) for m in model.modules()):
            raise ValueError("the model has no blendq layers: call blendq.prepare(model, "
                             "policy) before training it with this callback")
        if total_steps is None or not math.isfinite(total_steps) or total_steps < 1:
            raise ValueError(f"the run's total step count is unknown ({total_steps!r}): α "
                             "rises over a fraction of the run, so set max_steps (an "
                             "iterable dataset has no length)")
        self.model = model
        self._last_step = None
        self.controller = AlphaController(model, self._schedule(model, int(total_steps)),
                                          after=self.after)
        return self

    def _schedule(self, model: nn.Module, total_steps: int) -> Schedule:
        t0, t1 = self.steps(total_steps)
        blends = any(
            (isinstance(m, BlendMixin) and (m.w_quant.method.blends or (
                m.a_quant is not None and m.a_quant.method.blends)))
            or (isinstance(m, BlendSite) and m.a_quant.method.blends)
            for m in model.modules())
        if not blends:
            return cubic(0, 0)  # STE / LSQ: quantized from the first step
        return (cubic if self.schedule_name == "cubic" else linear)(t0, t1)

    def step(self, global_step: int) -> float:
        """Apply α of ``global_step`` and refresh the weight codes due (once per step,
        before that step's forward: a refresh warm-starts from the last scale, so a
        second call for the same step would move it again); returns α."""
        if self.controller is None:
            raise RuntimeError("AlphaWindow.step before bind(model, total_steps)")
        if int(global_step) == self._last_step:  # micro-batches of one optimizer step
            return self.alpha
        self._last_step = int(global_step)
        return self.controller.step(int(global_step))

    def settle(self) -> None:
        """Activation statistics still kept (forwards of a part of the model) into their
        EMAs; called by the callbacks at each step's end, on every rank, so a checkpoint
        one rank writes afterwards needs no collective."""
        if self.controller is not None and self.controller.act_stats is not None:
            self.controller.act_stats.settle()

    @property
    def alpha(self) -> float:
        return float(self.controller.alpha) if self.controller and \
            self.controller.alpha is not None else 0.0

    def epoch_metrics(self) -> dict[str, float]:
        """Telemetry since the last call (weights' distance to the grid, codes changed,
        inputs clipped), after checking the weights are finite (one host read)."""
        check_weights(self.model)
        row, self.codes = telemetry(self.model, self.codes)
        return {f"blendq/{k}": float(v) for k, v in row.items()}
