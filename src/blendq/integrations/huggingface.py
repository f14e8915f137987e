"""blendq under Hugging Face's ``transformers.Trainer``."""

from __future__ import annotations

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("blendq.integrations.HuggingFaceCallback needs transformers: pip "
                      "install 'blendq[hf]'") from err

from ..distill import Teacher, kd_loss, logits_of
from .window import AlphaWindow

__all__ = ["HuggingFaceCallback", "DistillationTrainer"]


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


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss learns from a float teacher as well:
    ``(1 - distill_weight) · task loss + distill_weight · kd_loss`` (:mod:`blendq.distill`;
    the task loss is the model's own, from ``labels``; without labels, the distillation
    loss alone). The teacher sees the student's batch (``labels`` left out), frozen and
    in eval mode, on the student's device.

        teacher = blendq.distill.Teacher(model, copy=True)      # before prepare
        model = blendq.prepare(model, policy)
        trainer = DistillationTrainer(model=model, args=args, train_dataset=data,
                                      teacher=teacher, callbacks=[HuggingFaceCallback()])

    Raises:
        ValueError: at the first step, a teacher whose logits' shape differs from the
            student's (both named).
    """

    def __init__(self, *args, teacher: Teacher, distill_weight: float = 0.5,
                 temperature: float = 2.0, **kwargs) -> None:
        if not isinstance(teacher, Teacher):
            teacher = Teacher(teacher)
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
        super().__init__(*args, **kwargs)
        self.teacher, self.distill_weight, self.temperature = teacher, distill_weight, \
            temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # as the Trainer's own: where the model normalises its loss over the accumulated
        # batch (num_items_in_batch), the Trainer does not divide by the accumulation
        # steps, so the distillation term (a mean over this micro-batch) is divided here
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        kwargs = {"num_items_in_batch": num_items_in_batch} if scaled else {}
        outputs = model(**inputs, **kwargs)
        student = logits_of(outputs)
        self.teacher.to(student.device)
        teacher = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"})
        task = outputs.get("loss") if isinstance(outputs, dict) else \
            getattr(outputs, "loss", None)
        kd = kd_loss(student, teacher, self.temperature)
        if scaled:
            kd = kd / getattr(self, "current_gradient_accumulation_steps",
                              self.args.gradient_accumulation_steps)
        w = self.distill_weight
        loss = kd if task is None else (1.0 - w) * task + w * kd
        return (loss, outputs) if return_outputs else loss
