"""Training-step cost of quantization on the CPU: plain, AB, STE, LSQ and torch.ao QAT.

    python benchmarks/cpu_step.py [--batch 128] [--steps 30] [--model fmnist_cnn]
    python benchmarks/cpu_step.py --model resnet50_v1 --width 0.125   # a residual CNN
    python benchmarks/cpu_step.py --breakdown [--sample 262144]   # where AB's step goes

Same model, data and batch for every variant, timed in one process, alternating
rounds so that drifts in machine load hit all variants alike; prints the fastest
round (least disturbed by other work on the machine) and the median. AB and STE use W4A8
per-channel with codes recomputed every step (``quant_every=1``, the worst case)
and with ``quant_every=8``; LSQ learns its steps (weights and activations, per channel);
AB also with each activation statistic computed where its batch is quantized instead
of all at the next step (``defer_statistics=False``). Also
prints the ATen operations of one step of each variant (counted at dispatch; views and
detach left out) and PPQ throughput on the model's weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch
from _harness import cpu_name, torch_ao_qat, train_step
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import blendq
from blendq.functional import ppq, search_scale
from blendq.models import build_model
from blendq.quantizers import ActQuantizer, ActStatistics


def _variants(base: nn.Module) -> dict[str, nn.Module]:
    out = {"plain fp32": copy.deepcopy(base)}
    for method in ("ab", "ste"):
        for every in (1, 8):
            policy = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True, method=method,
                                        quant_every=every)
            model = blendq.prepare(copy.deepcopy(base), policy)
            blendq.set_alpha(model, 0.5 if method == "ab" else 1.0)
            out[f"{method.upper()} W4A8 quant_every={every}"] = model
    model = blendq.prepare(copy.deepcopy(base), blendq.QuantPolicy(  # learned steps
        w_bits=4, a_bits=8, per_channel=True, method="lsq", act_method="lsq"))
    blendq.set_alpha(model, 1.0)
    out["LSQ W4A8 (weights and activations)"] = model
    # where the time goes: weights alone, and one activation PPQ iteration per batch
    for label, policy, act_iters in (
            ("AB W4 weights only", blendq.QuantPolicy(w_bits=4, a_bits=None, per_channel=True),
             None),
            ("AB W4A8 1 act. iteration", blendq.QuantPolicy(w_bits=4, a_bits=8,
                                                           per_channel=True), 1)):
        model = blendq.prepare(copy.deepcopy(base), policy)
        blendq.set_alpha(model, 0.5)
        for _, layer in blendq.transform.blend_layers(model):
            if act_iters is not None and layer.a_quant is not None:
                layer.a_quant.spec = dataclasses.replace(layer.a_quant.spec, max_iter=act_iters)
        out[label] = model
    model = blendq.prepare(copy.deepcopy(base), blendq.QuantPolicy(w_bits=4, a_bits=8,
                                                                  per_channel=True))
    blendq.set_alpha(model, 0.5)
    out[IMMEDIATE] = model
    qat = torch_ao_qat(base)
    if qat is not None:
        out["torch.ao QAT (int8 fake-quant)"] = qat
    return out


IMMEDIATE = "AB W4A8, statistics not deferred"  # each EMA updated where its batch is quantized


class _CountOps(TorchDispatchMode):
    """ATen operations that compute (views and detach only change metadata)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False) and func.__name__.split(".")[0] != "detach":
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(step) -> int:
    with _CountOps() as count:
        step()
    return count.count


def _breakdown(steps: dict, n: int) -> None:
    """Where the AB step's time goes: wall time inside the activation quantizers'
    forwards and inside the settles of their statistics, per step (``--breakdown``)."""
    name = "AB W4A8 quant_every=1"
    spent = {"activation quantizer forwards": 0.0, "statistics settles": 0.0}
    originals = (ActQuantizer.forward, ActStatistics.settle)

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
        return wrapper

    ActQuantizer.forward = timed("activation quantizer forwards", originals[0])
    ActStatistics.settle = timed("statistics settles", originals[1])
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            steps[name]()
        total = (time.perf_counter() - t0) / n
    finally:
        ActQuantizer.forward, ActStatistics.settle = originals
    print(f"{name}: {total * 1e3:.2f} ms a step, of which " + ", ".join(
        f"{label} {t / n * 1e3:.2f} ms" for label, t in spent.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist_cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=float, default=None, help="width multiplier (ResNets)")
    p.add_argument("--sample", type=int, default=None,
                   help="elements of an activation statistic's sample (default: ActSpec's)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the AB step's activation forwards and settles")
    args = p.parse_args()
    torch.manual_seed(0)
    extra = {} if args.width is None else {"width": args.width}
    base = build_model(args.model, in_channels=1, image_size=28, **extra).train()
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    variants = _variants(base)
    for model in variants.values():
        for a in blendq.transform._act_quantizers(model) if args.sample else ():
            a.spec = dataclasses.replace(a.spec, sample=args.sample)
    steps = {name: train_step(m.train(), x, y, lr=1e-3, defer_statistics=name != IMMEDIATE)
             for name, m in variants.items()}
    for fn in steps.values():  # warm up (first projection, allocator)
        for _ in range(3):
            fn()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    best, med = ({k: f(t) for k, t in times.items()} for f in (min, statistics.median))
    ops = {name: _ops_per_step(fn) for name, fn in steps.items()}
    print(f"{args.model}, batch {args.batch}, CPU {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':40s} {'best ms':>9s} {'ratio':>7s} {'median ms':>10s} {'ratio':>7s} "
          f"{'ATen ops':>9s}")
    for name in times:
        print(f"{name:40s} {best[name] * 1e3:9.2f} {best[name] / best['plain fp32']:7.3f} "
              f"{med[name] * 1e3:10.2f} {med[name] / med['plain fp32']:7.3f} {ops[name]:9d}")
    if args.breakdown:
        _breakdown(steps, args.steps)
    weights = [m.weight.detach() for m in base.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    n = sum(w.numel() for w in weights)
    for label, fn in (("PPQ 3 warm iterations", lambda w: ppq(w, 4, axis=0, max_iter=3,
                                                               fixed=True, scale=0.01)),
                      ("search start + 10 iterations",
                       lambda w: ppq(w, 4, axis=0, max_iter=10, fixed=True,
                                     scale=search_scale(w, 4, axis=0)))):
        t0 = time.perf_counter()
        for _ in range(10):
            for w in weights:
                fn(w)
        dt = (time.perf_counter() - t0) / 10
        print(f"{label:36s} {dt * 1e3:9.3f} ms for {n:,} weights ({n / dt / 1e6:.0f} M/s)")


if __name__ == "__main__":
    main()
