"""Callbacks that quantize in the training loops users already have.

- :class:`HuggingFaceCallback`: a ``transformers.TrainerCallback`` (extra ``hf``);
- :class:`DistillationTrainer`: a ``transformers.Trainer`` whose loss also learns from
  the float model (:mod:`blendq.distill`);
- :class:`LightningCallback`: a ``lightning.Callback`` (extra ``lightning``);
- :class:`AlphaWindow`: what both do, for a plain loop or another trainer.

Each steps α from the trainer's global step over a window given in fractions of the
run's total steps (as ``blendq train --alpha-window``), refreshes the weight codes as
blendq's engine does (:class:`blendq.AlphaController`), and logs α and the per-epoch
telemetry into the trainer's own logs. α is a pure function of the global step, and
the quantizers' state lives in the model's state dict, so a run resumed from the
trainer's own checkpoint continues both exactly. The trainers are imported only when
their callback is used.
"""

from __future__ import annotations

from .window import AlphaWindow

__all__ = ["AlphaWindow", "DistillationTrainer", "HuggingFaceCallback", "LightningCallback"]


def __getattr__(name: str):
    if name == "HuggingFaceCallback":
        from .huggingface import HuggingFaceCallback

        return HuggingFaceCallback
    if name == "DistillationTrainer":
        from .huggingface import DistillationTrainer

        return DistillationTrainer
    if name == "LightningCallback":
        from .lightning import LightningCallback

        return LightningCallback
    raise AttributeError(f"module 'blendq.integrations' has no attribute {name!r}")
