"""What the benchmarks share: one training step as a closure, torch.ao's QAT model, the
reuse of finished runs and the commit a figure was measured at."""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from torch import nn

import blendq
from blendq.engine import TrainConfig, load_checkpoint


def finished_history(cfg: TrainConfig, out: Path) -> list[dict] | None:
    """The per-epoch history of a finished run of exactly ``cfg`` in ``out``, or ``None``
    (no run there, another config, or not finished): what lets a benchmark go on after a
    stop without training anything twice."""
    done = Path(out) / "checkpoint.pt"
    if not done.exists():
        return None
    state = load_checkpoint(done)
    if state["config"] != cfg.to_dict() or state["epoch"] != cfg.epochs:
        return None
    return state["history"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else its architecture: this project's
    machines differ in CPU maker, and a row's time is its CPU's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The short commit of this checkout, ``+dirty`` where the code (``src/``,
    ``benchmarks/``) differs from it (``"unknown"`` outside git)."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--",
                      str(here.parent / "src"), str(here))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if changed else head


def train_step(model: nn.Module, x, y, lr: float, bf16: bool = False,
               compile_mode: str | None = None, defer_statistics: bool = True):
    """A closure running one SGD step of ``model`` on ``(x, y)``; a blended model gets an
    :class:`~blendq.AlphaController` holding its current α (and marking stale codes).
    ``compile_mode``: steps after the first run ``torch.compile(model, mode=...)`` (the
    first, eager, decides the activation grids, as ``blendq train --compile`` does)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    compiled = torch.compile(model, mode=compile_mode) if compile_mode else model
    controller = None
    if any(True for _ in blendq.transform.blend_layers(model)):
        alpha = blendq.transform.get_alpha(model)
        controller = blendq.AlphaController(model, blendq.constant(alpha),
                                            defer_statistics=defer_statistics)
    autocast = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else \
        contextlib.nullcontext
    counter = [0]

    def step():
        if controller is not None:
            controller.step(counter[0])
        counter[0] += 1
        with autocast():
            loss = nn.functional.cross_entropy((compiled if counter[0] > 1 else model)(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def torch_ao_qat(base: nn.Module) -> nn.Module | None:
    """PyTorch's own eager QAT (int8 fake quantization, STE) of a copy of ``base``, or
    ``None`` (with the reason printed) where it does not prepare."""
    try:
        from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

        qat = copy.deepcopy(base).train()
        qat.qconfig = get_default_qat_qconfig("x86")
        return prepare_qat(qat)
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"torch.ao QAT unavailable: {type(err).__name__}: {err}")
        return None


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` over seeds (``(n=1)`` for a single value, ``–`` for none)."""
    if len(values) < 2:
        return f"{values[0]:.2f} (n=1)" if values else "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# two-sided 95 % quantiles of Student's t by degrees of freedom (n - 1 paired seeds)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def paired_difference(by: dict, setting: str, name: str, ref: str) -> str:
    """``name − ref`` over the seeds both have (``by``: ``{(setting, variant, seed):
    value}``): mean ± sd, `` *`` when the 95 % t-interval excludes zero."""
    diffs = [a - by[(s, ref, sd)] for (s, v, sd), a in by.items()
             if (s, v) == (setting, name) and (s, ref, sd) in by]
    if name == ref or not diffs:
        return "–"
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f} (n=1)"
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    beyond = abs(mean) > T95.get(len(diffs) - 1, 2.0) * sd / len(diffs) ** 0.5
    return f"{mean:+.2f} ± {sd:.2f}" + (" *" if beyond else "")
