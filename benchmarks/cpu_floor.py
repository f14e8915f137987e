"""Where an AB step's time goes on the CPU, beside the plain step, and what its activation
quantization costs against what PyTorch offers instead.

    python benchmarks/cpu_floor.py [--model resnet50_v1] [--width 0.125] [--batch 32]
    python benchmarks/cpu_floor.py --compile    # also the whole model under torch.compile

Prints, for the model (28 px, one channel, AB W4A8 per channel at α = 0.5):
- the values the activation quantizers see in a training forward;
- ATen operations' own time a step (``torch.profiler``), AB minus plain, largest first,
  both models profiled alternately in one process;
- one 200 k-value activation (32×32×14×14, ReLU output): one division, ATen's
  ``fake_quantize_per_tensor_affine``, blendq's CPU straight-through fake quantization
  (forward and backward) and the compiled kernel of ``fake_quantize`` (forward and
  backward), beside a ReLU's forward and backward;
- the weight groups' projection alone (``WeightGroup.project``, the controller's work);
- with ``--compile``: eager and compiled steps of both models (compiling takes minutes).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from _harness import commit, train_step
from torch import nn
from torch.profiler import profile

import blendq
from blendq import functional as F
from blendq.models import build_model
from blendq.quantizers import ActQuantizer


def _timed(fn, n: int) -> float:
    """Median seconds of ``fn`` over 5 rounds of ``n`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def _activation_values(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
             for m in model.modules() if isinstance(m, ActQuantizer)]
    model(x)
    for h in hooks:
        h.remove()
    return len(seen), sum(seen)


def _op_times(steps: dict, n: int, repeats: int = 2) -> dict[str, dict[str, float]]:
    """ms a step of each ATen operation's own time, per model."""
    out = {name: {} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            with profile() as prof:
                for _ in range(n):
                    step()
            for e in prof.key_averages():
                if e.key.startswith("aten::"):
                    out[name][e.key] = out[name].get(e.key, 0.0) + \
                        e.self_cpu_time_total / 1e3 / (n * repeats)
    return out


def _activation_kernels() -> None:
    x0 = torch.randn(32, 32, 14, 14).relu()
    grad = torch.randn_like(x0)
    scale, alpha = torch.tensor(0.02), torch.tensor(0.5)
    x = x0.clone().requires_grad_()

    def backward_of(fn):
        def run():
            fn().backward(grad)
        return run

    rows = {
        "one division x / s (forward)": lambda: torch.div(x0, scale),
        "ATen fake_quantize_per_tensor_affine (forward)":
            lambda: torch.fake_quantize_per_tensor_affine(x0, 0.02, 0, 0, 255),
        "ReLU, forward and backward": backward_of(lambda: torch.relu(x)),
        "blendq CPU straight-through (fwd + bwd)": backward_of(
            lambda: F.straight_through_fake_quantize(x, scale, alpha, 0, 255)),
        "fake_quantize compiled kernel (fwd + bwd)": backward_of(
            lambda: F.fake_quantize(x, scale, alpha, 8, False, "ste", fused=True)[0]),
    }
    print(f"\none activation of {x0.numel():,} values, median of 5 rounds x 50 calls:")
    for label, fn in rows.items():
        print(f"  {label:48s} {_timed(fn, 50) * 1e6:9.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50_v1")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="steps per profiled round")
    p.add_argument("--top", type=int, default=16, help="operations listed")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    base = build_model(args.model, in_channels=1, image_size=28, width=args.width).train()
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    ab = blendq.prepare(copy.deepcopy(base), blendq.QuantPolicy(w_bits=4, a_bits=8,
                                                                per_channel=True))
    blendq.set_alpha(ab, 0.5)
    print(f"{args.model} width {args.width}, batch {args.batch}, CPU "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, commit {commit()}, seed 0")
    quantizers, values = _activation_values(copy.deepcopy(ab).train(), x)
    print(f"{quantizers} activation quantizers see {values:,} values a training forward")

    steps = {"plain": train_step(copy.deepcopy(base), x, y, lr=1e-3),
             "AB": train_step(ab, x, y, lr=1e-3)}
    for step in steps.values():
        for _ in range(3):
            step()
    times = _op_times(steps, args.steps)
    total = {name: sum(t.values()) for name, t in times.items()}
    print(f"\nATen operations' own time a step (profiler): plain {total['plain']:.2f} ms, "
          f"AB {total['AB']:.2f} ms; largest differences:")
    keys = set(times["plain"]) | set(times["AB"])
    diffs = sorted(((times["AB"].get(k, 0.0) - times["plain"].get(k, 0.0), k) for k in keys),
                   reverse=True)
    for d, k in diffs[:args.top]:
        print(f"  {k:40s} {d:+8.2f} ms  (AB {times['AB'].get(k, 0.0):7.2f}, "
              f"plain {times['plain'].get(k, 0.0):7.2f})")

    _activation_kernels()

    controller = blendq.AlphaController(ab, blendq.constant(0.5))
    controller.step(0)
    ab(x)  # every layer's first projection, so the groups project from here
    n = sum(len(g.quantizers) for g in controller.groups)
    spent = _timed(lambda: [g.project() for g in controller.groups], 10)
    print(f"\nweight groups' projection ({len(controller.groups)} groups, {n} layers): "
          f"{spent * 1e3:.2f} ms a step")

    if args.compile:
        variants = {
            "plain eager": train_step(copy.deepcopy(base), x, y, lr=1e-3),
            "AB eager": train_step(copy.deepcopy(ab), x, y, lr=1e-3),
            "plain compiled": train_step(copy.deepcopy(base), x, y, lr=1e-3,
                                         compile_mode="default"),
            "AB compiled": train_step(copy.deepcopy(ab), x, y, lr=1e-3,
                                      compile_mode="default")}
        print()
        for name, step in variants.items():
            t0 = time.perf_counter()
            step(), step()  # the second compiles
            warm = time.perf_counter() - t0
            print(f"  {name:16s} {_timed(step, 10) * 1e3:8.2f} ms a step "
                  f"(first two steps {warm:.1f} s)")


if __name__ == "__main__":
    main()
