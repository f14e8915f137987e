"""blendq under Hugging Face's ``transformers.Trainer``."""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("blendq.integrations.HuggingFaceCallback needs transformers: pip "
                      "install 'blendq[hf]'") from err

from .window import AlphaWindow

__all__ = ["HuggingFaceCallback"]


class HuggingFaceCallback(TrainerCallback):
    """Steps α from ``state.global_step`` over ``window`` (fractions of
    ``state.max_steps``), adds ``alpha`` to every entry the Trainer logs and the
    telemetry (``blendq/w_rel_dist``, ``blendq/codes_changed``, ``blendq/act_clipped``)
    at each evaluation and epoch end, all in ``state.log_history``.

        trainer = Trainer(model=blendq.prepare(model, policy), args=args,
                          train_dataset=data, callbacks=[HuggingFaceCallback()])

    Raises (at the start of training):
        ValueError: the model has no blendq layers, or the Trainer does not know its
            total step count (set ``max_steps``).
    """

    def __init__(self, window: tuple[float, float] = (0.0, 1.0), schedule: str = "cubic",
                 after: str = "freeze") -> None:
        self.alpha = AlphaWindow(window, schedule, after)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.alpha.bind(model, state.max_steps)  # α is applied at each step's begin

    def on_step_begin(self, args, state, control, **kwargs):
        self.alpha.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.alpha.settle()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.alpha.controller is None or logs is None:
            return
        logs["alpha"] = self.alpha.alpha
        if state.log_history:
            state.log_history[-1]["alpha"] = self.alpha.alpha

    def _telemetry(self, state) -> None:
        if self.alpha.controller is not None:
            state.log_history.append({**self.alpha.epoch_metrics(), "alpha": self.alpha.alpha,
                                      "epoch": state.epoch, "step": state.global_step})

    def on_epoch_end(self, args, state, control, **kwargs):
        self._telemetry(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._telemetry(state)
