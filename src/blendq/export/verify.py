"""Agreement between the α = 1 model, the integer engine and ONNX Runtime.

Differences are reported in units of the output step: the step of an 8-bit
quantization of the reference logits, ``max |logit| / 127`` (what an int8 output
of the model could resolve).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .capture import ExportError
from .onnx import onnx_session, run_onnx, to_onnx
from .reference import IntegerEngine, first_tensor

__all__ = ["Agreement", "compare_logits", "output_step", "verify_model", "RUNTIMES",
           "openvino_model"]

RUNTIMES = ("ort", "openvino")


TIE = 1e-4  # reference logits this close (in output steps) are tied: either pick agrees


@dataclass(frozen=True)
class Agreement:
    name: str
    top1_agreement: float  # % of samples whose pick is the reference's (ties: either)
    max_abs_diff: float
    mean_abs_diff: float
    max_steps: float  # max_abs_diff in output steps
    accuracy: float | None = None
    strict_top1: float | None = None  # % with the very same arg-max, ties not excused
    ties: int = 0  # samples whose reference top-2 logits are within TIE steps
    within_step: float = 100.0  # % of samples whose every logit is within one output step

    def row(self) -> str:
        acc = "" if self.accuracy is None else f"  acc {self.accuracy:6.2f}%"
        strict = "" if self.strict_top1 is None or self.strict_top1 == self.top1_agreement \
            else f" (same arg-max {self.strict_top1:.3f}%; {self.ties} tied references)"
        return (f"{self.name:28s} top-1 agree {self.top1_agreement:7.3f}%{strict}  within 1 "
                f"step {self.within_step:7.3f}%  max |Δ| {self.max_abs_diff:.3g} "
                f"({self.max_steps:.3g} steps)  mean |Δ| {self.mean_abs_diff:.3g}{acc}")


def output_step(reference_logits: Tensor) -> float:
    """One step of an 8-bit quantization of the logits: ``max |logit| / 127``."""
    return max(float(reference_logits.abs().max()) / 127.0, 1e-30)


def compare_logits(name: str, ref: Tensor, other: Tensor, step: float,
                   labels: Tensor | None = None) -> Agreement:
    """Agreement of ``other`` with ``ref``. A pick counts as agreeing when the reference
    logit it picks is within ``TIE`` output steps of the reference's top one: logits
    tied in exact arithmetic (whole-unit biases on integer accumulators make exact ties
    possible) are ordered by float rounding, which no two runtimes share."""
    ref, other = ref.double(), other.double()
    ref, other = ref.reshape(-1, ref.shape[-1]), other.reshape(-1, other.shape[-1])
    diff = (ref - other).abs()
    pick = other.argmax(-1)
    top = ref.max(-1).values
    agree = 100.0 * float((ref.gather(-1, pick[:, None])[:, 0] >= top - TIE * step)
                          .double().mean())
    strict = 100.0 * float((ref.argmax(-1) == pick).double().mean())
    top2 = ref.topk(min(2, ref.shape[-1]), -1).values
    ties = int((top2[:, 0] - top2[:, -1] <= TIE * step).sum()) if ref.shape[-1] > 1 else 0
    acc = None if labels is None else 100.0 * float((pick == labels).double().mean())
    within = 100.0 * float((diff.amax(-1) <= step).double().mean())
    return Agreement(name, agree, float(diff.max()), float(diff.mean()),
                     float(diff.max()) / step, acc, strict, ties, within)


def openvino_model(path: str | Path):
    """The ONNX file at ``path`` compiled by OpenVINO for the CPU (a callable on numpy).

    Raises:
        ExportError: openvino is not installed (the message says how to install it).
    """
    try:
        import openvino
    except ImportError as err:
        raise ExportError("verifying on OpenVINO needs the 'openvino' package: pip install "
                          "'blendq[openvino]'") from err
    return openvino.Core().compile_model(str(path), "CPU")


def _runtime_sessions(path: Path, runtimes: tuple[str, ...]) -> dict[str, object]:
    """``{row name: callable(x) -> logits}`` for each runtime asked for."""
    calls = {}
    if "ort" in runtimes:
        for name, optimize in (("ONNX Runtime, int8 kernels", True),
                               ("ONNX Runtime, QDQ unfused", False)):
            session = onnx_session(path, optimize=optimize)
            calls[name] = lambda x, s=session: run_onnx(s, x)
    if "openvino" in runtimes:
        compiled = openvino_model(path)
        calls["OpenVINO, CPU"] = lambda x, c=compiled: torch.from_numpy(
            c({0: x.float().numpy()})[0].copy())
    return calls


@torch.no_grad()
def verify_model(alpha_one_model: nn.Module, program: torch.export.ExportedProgram, batches,
                 onnx: bool = True, runtimes: tuple[str, ...] = ("ort",)) -> list[Agreement]:
    """Run the α = 1 model (float32), the integer engine and each runtime in ``runtimes``
    (``"ort"``: ONNX Runtime with its int8 kernels, and the QDQ graph unfused;
    ``"openvino"``: OpenVINO on the CPU) on ``batches`` of ``(x, y)`` (``y`` may be
    ``None``); compare each with the α = 1 model. ``program`` is
    :func:`blendq.export.capture` of the converted model; ``onnx=False`` skips the
    runtimes.

    Raises:
        ValueError: an unknown runtime name.
        ExportError: a runtime's package is missing (the message says how to install it).
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"runtimes must be among {RUNTIMES}, got {unknown}")
    engine = IntegerEngine(program)
    calls: dict[str, object] | None = None if onnx else {}
    refs, ints, labels = [], [], []
    outputs: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for x, y in batches:
            if calls is None:
                import onnx as onnx_lib

                path = Path(tmp) / "model.onnx"
                onnx_lib.save(to_onnx(program, x), str(path))
                calls = _runtime_sessions(path, tuple(runtimes))
                outputs = {name: [] for name in calls}
            refs.append(first_tensor(alpha_one_model(x)).float())
            ints.append(engine(x))
            for name, call in calls.items():
                outputs[name].append(call(x))
            labels.append(y)
    ref = torch.cat(refs)
    y = None if any(lab is None for lab in labels) else torch.cat(labels)
    step = output_step(ref)
    results = [compare_logits("alpha=1 model (reference)", ref, ref, step, y),
               compare_logits("integer engine (float64)", ref, torch.cat(ints), step, y)]
    for name, outs in outputs.items():
        if outs:
            results.append(compare_logits(name, ref, torch.cat(outs), step, y))
    return results
