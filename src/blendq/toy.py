"""The paper's toy problem (Figure 3): ``min (w - 5.7)^2`` over the integers with AB.

Algorithm 1 on one scalar: ``w' = (1 - α)·w + α·round(w)``, plain SGD on ``w``,
α cubic (eq. 6) from 0 to 1 over the run. The paper starts at ``w = 2.0`` and
reaches ``(w, α) = (5.506555, 1)``, so ``w_q = 6``, in 20 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional import blend
from .schedules import cubic

__all__ = ["ToyStep", "toy_problem"]


@dataclass(frozen=True)
class ToyStep:
    step: int
    w: float
    alpha: float
    wq: float
    loss: float


def toy_problem(
    start: float = 2.0, target: float = 5.7, steps: int = 20, lr: float = 0.3
) -> list[ToyStep]:
    """Run Algorithm 1 on the toy loss; one :class:`ToyStep` per step, the start included."""
    schedule = cubic(0, steps)
    w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    trace = []
    for step in range(steps + 1):
        alpha = schedule(step)
        wq = torch.round(w.detach())
        loss = (blend(w, wq, alpha) - target) ** 2
        trace.append(ToyStep(step, float(w.detach()), alpha, float(wq), float(loss.detach())))
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()  # d/dw = (1 - alpha) * 2 (w' - target): eq. 5
        opt.step()
    return trace
