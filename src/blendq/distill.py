"""Distillation from the float model: the quantized student learns the teacher's logits.

Quantization-aware training often recovers more with a distillation loss from the float
model than with the labels alone (Hinton et al. 2015's soft targets; NVIDIA's Model
Optimizer and NNCF recommend it for low-bit QAT). Here:

- :class:`Teacher` wraps the float model: frozen (no gradients, no optimizer sees its
  Parameters), always in eval mode (batch-norm statistics and dropout fixed, whatever
  ``train()`` the surrounding code calls), evaluated without autograd on the student's
  own batch.
- :func:`kd_loss` is ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged
  over every position (a language model's tokens count one each), with one error naming
  both shapes when the two outputs do not match.
- :func:`distillation_loss` mixes it with the task loss:
  ``(1 - weight) · task + weight · kd``.

The engine (``TrainConfig(distill=...)``), the Hugging Face trainer
(:class:`blendq.integrations.DistillationTrainer`) and a Lightning module (call
:func:`distillation_loss` in ``training_step``) use these.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["Teacher", "kd_loss", "distillation_loss", "logits_of"]


def logits_of(output) -> Tensor:
    """The logits in a model's output: the tensor itself, an output object's or a dict's
    ``logits``, or a tuple's first element (Hugging Face models return either)."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else \
        getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise ValueError(f"cannot find logits in a model output of type "
                         f"{type(output).__name__}: return a tensor, or an object with "
                         "'logits'")
    return logits


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """Hinton's distillation loss, ``T² · KL(p_teacher ‖ p_student)`` at temperature
    ``T``, averaged over every position of the leading dimensions (the batch, and a
    sequence's tokens); the classes are the last dimension. ``T²`` keeps the gradient's
    scale independent of ``T``.

    Raises:
        ValueError: the two logits differ in shape (both named: another vocabulary, or
            another output), or ``temperature <= 0``.
    """
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"distillation needs the teacher's output to match the student's: "
                         f"student logits {tuple(student.shape)}, teacher logits "
                         f"{tuple(teacher.shape)} (another vocabulary or head?)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    s = nn.functional.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, -1)
    p = nn.functional.log_softmax(teacher.detach().float().reshape(-1, teacher.shape[-1]) / t,
                                  -1)
    return nn.functional.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(task: Tensor, student: Tensor, teacher: Tensor, weight: float = 0.5,
                      temperature: float = 2.0) -> Tensor:
    """``(1 - weight) · task + weight · kd_loss(student, teacher, temperature)``.

    Raises:
        ValueError: ``weight`` outside [0, 1], or what :func:`kd_loss` raises.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    return (1.0 - weight) * task + weight * kd_loss(student, teacher, temperature)


class Teacher(nn.Module):
    """A frozen float model that answers in eval mode, without autograd.

    Args:
        model: the float model (a trained one: usually the model before
            :func:`blendq.prepare`, so keep a copy, or pass ``copy=True``).
        copy: keep a deep copy (so preparing ``model`` in place afterwards leaves the
            teacher float).

    Raises:
        ValueError: ``model`` holds blendq layers (a quantized teacher teaches the
            student its own errors).
    """

    def __init__(self, model: nn.Module, copy: bool = False) -> None:
        super().__init__()
        from .converted import QuantMixin
        from .layers import BlendMixin

        if any(isinstance(m, BlendMixin | QuantMixin) for m in model.modules()):
            raise ValueError("the teacher is the float model: this one is prepared or "
                             "converted by blendq; keep a copy of the model before prepare")
        self.model = _copy(model) if copy else model
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: its statistics and dropout are fixed

    @torch.no_grad()
    def forward(self, *args, **kwargs) -> Tensor:
        if self.model.training:  # a trainer that restores modes by attribute set it
            self.model.eval()
        return logits_of(self.model(*args, **kwargs))


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
