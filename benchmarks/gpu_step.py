"""GPU training-step cost of quantization, peak memory and PPQ time, in one call.

    python benchmarks/gpu_step.py          # everything: ~10 min on an H200, mostly compiling
    python benchmarks/gpu_step.py --smoke --device cpu   # tiny shapes: checks the script runs
                                                         # and counts the GPU code path's ops
    python benchmarks/gpu_step.py --device cpu --only ppq   # PPQ rows alone, any device

Rows (ratios measured in this process, same model, data and batch; alternating rounds):

- ResNet-50 v1, batch 128, 224 px, bf16 autocast, channels-last: plain, AB W4A8
  per-channel, STE W4A8 per-channel, each with codes recomputed every step
  (``quant_every=1``) and every 8 steps; AB with each activation statistic computed
  where its batch is quantized (``defer_statistics=False``) instead of all at the next
  step; torch.ao eager QAT where it runs (it is tried under bf16 autocast, else run in
  fp32 against a plain fp32 step).
- BinaryNet W1A1 (scaled sign, first layer's input real), batch 256, 32 px, bf16,
  channels-last: plain, AB, STE.
- The same ResNet-50 rows compiled (``torch.compile`` after one eager step): plain, AB and
  STE W4A8 per-channel, ``quant_every=1`` (on a GPU; ``--compile`` elsewhere).
- MobileNet v1 (depthwise convolutions), batch 128, 224 px, bf16, channels-last: plain,
  AB and STE W4A8 per-channel.
- Peak memory of a step above what the model and optimizer hold, per variant; kernel
  launches and host synchronisations per step from the profiler (on a CPU: ATen
  operations and operations that copy a value to the host, counted at dispatch).
- Every row also goes to ``--json`` (default ``gpu_step.json``).
- PPQ of every ResNet-50 conv weight per output channel: one layer at a time to
  convergence, and the fixed 3-iteration warm refresh that training runs; against
  the bandwidth floor (one read of all weights at this device's measured copy rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from _harness import commit, torch_ao_qat, train_step
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import blendq
from blendq.functional import ppq, search_scale
from blendq.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantized(base: nn.Module, policy: blendq.QuantPolicy, alpha: float) -> nn.Module:
    model = blendq.prepare(copy.deepcopy(base), policy)
    blendq.set_alpha(model, alpha)
    return model


def _time(steps: dict, device: torch.device, rounds: int, n: int) -> dict[str, float]:
    """Median seconds per step of each variant, rounds alternating between variants."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def _peak_bytes(fn, device: torch.device) -> int:
    """Peak memory of one step above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return 0
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


_LAUNCH = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
           "cudaGraphLaunch")
_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# ATen operations that copy a value to the host (a device synchronisation on a GPU)
_HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item", "tolist"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func.__name__.split(".")[0] in _HOST_READS
        return func(*args, **(kwargs or {}))


def _per_step_counts(fn, device: torch.device, n: int = 3) -> tuple[float, float]:
    """(kernel launches, host synchronisations) per step from the profiler on CUDA; on
    other devices (ATen operations, host reads) per step counted at dispatch."""
    if device.type != "cuda":
        with _CountOps() as count:
            for _ in range(n):
                fn()
        return count.ops / n, count.reads / n
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        _sync(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in _LAUNCH)
    syncs = sum(e.count for e in events if e.key in _SYNC) - 1  # less the one after the loop
    return launches / n, max(syncs, 0) / n


def _table(title: str, variants: dict[str, tuple], x, y, args) -> list[dict]:
    """``variants``: name -> (model, bf16, compile mode or None[, defer statistics]). The
    first row of each (bf16, compiled) kind is the baseline of that kind's ratios."""
    device = x.device
    steps, models = {}, {}
    for name, (model, bf16, mode, *defer) in variants.items():
        model = model.to(device).train()
        if args.channels_last and x.dim() == 4:
            model = model.to(memory_format=torch.channels_last)
        models[name] = model
        step = train_step(model, x, y, lr=1e-4, bf16=bf16, compile_mode=mode,
                          defer_statistics=defer[0] if defer else True)
        t0 = time.perf_counter()
        try:
            for _ in range(max(args.warmup, 3 if mode else 0)):
                step()
        except Exception as err:  # noqa: BLE001 - e.g. torch.ao under bf16 autocast
            print(f"{name}: does not run ({type(err).__name__}: {str(err).splitlines()[0]})")
            continue
        if mode:
            print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        steps[name] = step
    peaks = {name: _peak_bytes(fn, device) for name, fn in steps.items()}
    counts = {name: _per_step_counts(fn, device) for name, fn in steps.items()}
    med = _time(steps, device, args.rounds, args.steps)

    def kind(name):
        return variants[name][1], variants[name][2] is not None

    base = {}
    for name in steps:
        base.setdefault(kind(name), name)
    what = ("launches", "syncs") if device.type == "cuda" else ("ATen ops", "host reads")
    print(f"\n{title}")
    print(f"{'variant':44s} {'ms/step':>9s} {'ratio':>7s} {'peak MiB':>9s} {'mem ratio':>9s} "
          f"{what[0]:>9s} {what[1]:>10s}")
    rows = []
    for name in steps:
        ref = base[kind(name)]
        mem = peaks[name] / peaks[ref] if peaks[ref] else None
        print(f"{name:44s} {med[name] * 1e3:9.2f} {med[name] / med[ref]:7.3f} "
              f"{peaks[name] / 2**20:9.0f} " + (f"{mem:9.3f}" if mem else f"{'-':>9s}") +
              f" {counts[name][0]:9.0f} {counts[name][1]:10.0f}")
        rows.append({"table": title, "variant": name, "ms_per_step": med[name] * 1e3,
                     "ratio": med[name] / med[ref], "baseline": ref,
                     "peak_mib": peaks[name] / 2**20, "mem_ratio": mem,
                     what[0].replace(" ", "_").lower() + "_per_step": counts[name][0],
                     what[1].replace(" ", "_").lower() + "_per_step": counts[name][1]})
    for model in models.values():
        model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy (read + write)."""
    x = torch.empty(256 * 2**20 // 4, device=device)
    for _ in range(3):
        x.clone()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        x.clone()
    _sync(device)
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - t0)


def _ppq_rows(base: nn.Module, device: torch.device, bits: int = 4) -> list[dict]:
    weights = [m.weight.detach().to(device) for m in base.modules() if isinstance(m, nn.Conv2d)]
    n = sum(w.numel() for w in weights)
    starts = [search_scale(w, bits, axis=0) for w in weights]

    def converged():
        for w, s in zip(weights, starts, strict=True):
            ppq(w, bits, axis=0, max_iter=100, scale=s)

    def refresh():
        for w, s in zip(weights, starts, strict=True):
            ppq(w, bits, axis=0, max_iter=3, scale=s, fixed=True)

    floor = n * 4 / _copy_bandwidth(device)
    print(f"\nPPQ, {len(weights)} conv weights, {n:,} values, {bits}-bit per channel; "
          f"bandwidth floor (one read) {floor * 1e3:.3f} ms")
    rows = []
    for label, fn in (("converged, one layer at a time", converged),
                      ("3 warm iterations (training refresh)", refresh)):
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        _sync(device)
        dt = (time.perf_counter() - t0) / 5
        print(f"{label:44s} {dt * 1e3:9.3f} ms  ({dt / floor:.0f}x the floor)")
        rows.append({"table": "PPQ", "variant": label, "ms": dt * 1e3,
                     "floor_ms": floor * 1e3, "values": n})
    return rows


def _batch(batch: int, side: int, classes: int, device: torch.device, args):
    """A random image batch (channels-last unless told otherwise) and its labels."""
    x = torch.randn(batch, 3, side, side, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), device=device)


def _resnet_table(resnet: nn.Module, side: int, batch: int, device: torch.device,
                  args) -> list[dict]:
    x, y = _batch(batch, side, 1000, device, args)
    variants = {"plain (bf16)": (copy.deepcopy(resnet), True, None)}
    for method, alpha in (("ab", 0.5), ("ste", 1.0)):
        for every in (1, 8):
            policy = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True, method=method,
                                        quant_every=every)
            variants[f"{method.upper()} W4A8 per-channel, quant_every={every}"] = (
                _quantized(resnet, policy, alpha), True, None)
    policy = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True)
    variants["AB W4A8 per-channel, statistics not deferred"] = (  # each where quantized
        _quantized(resnet, policy, 0.5), True, None, False)
    qat = torch_ao_qat(resnet)
    if qat is not None:
        variants["torch.ao QAT under bf16 autocast"] = (qat, True, None)
    if args.compile:  # compiled rows, against the compiled plain step
        variants["plain (bf16), compiled"] = (copy.deepcopy(resnet), True, "default")
        for method, alpha in (("ab", 0.5), ("ste", 1.0)):
            policy = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True, method=method)
            variants[f"{method.upper()} W4A8 per-channel, compiled"] = (
                _quantized(resnet, policy, alpha), True, "default")
    if qat is not None:
        variants["plain (fp32)"] = (copy.deepcopy(resnet), False, None)
        variants["torch.ao QAT (fp32)"] = (copy.deepcopy(qat), False, None)
    return _table(f"ResNet-50 v1, batch {batch}, {side} px", variants, x, y, args)


def _mobilenet_table(device: torch.device, args) -> list[dict]:
    side, batch, width = (32, 4, 0.25) if args.smoke else (224, 128, 1.0)
    net = build_model("mobilenet_v1", num_classes=1000, image_size=side, width=width)
    x, y = _batch(batch, side, 1000, device, args)
    variants = {"plain (bf16)": (copy.deepcopy(net), True, None)}
    for method, alpha in (("ab", 0.5), ("ste", 1.0)):
        policy = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True, method=method)
        variants[f"{method.upper()} W4A8 per-channel"] = (_quantized(net, policy, alpha),
                                                          True, None)
    return _table(f"MobileNet v1, batch {batch}, {side} px", variants, x, y, args)


def _binarynet_table(device: torch.device, args) -> list[dict]:
    side, batch, width = (32, 8, 0.125) if args.smoke else (32, 256, 1.0)
    bnn = build_model("binarynet", image_size=side, width=width)
    x, y = _batch(batch, side, 10, device, args)
    policy = {m: blendq.QuantPolicy(w_bits=1, a_bits=1, first_layer=(1, None), method=m)
              for m in ("ab", "ste")}
    return _table(f"BinaryNet W1A1, batch {batch}, {side} px",
                  {"plain (bf16)": (copy.deepcopy(bnn), True, None),
                   "AB W1A1": (_quantized(bnn, policy["ab"], 0.5), True, None),
                   "STE W1A1": (_quantized(bnn, policy["ste"], 1.0), True, None)},
                  x, y, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--only", choices=("resnet50", "mobilenet", "binarynet", "ppq"),
                   help="one part only")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="the compiled rows (default: on a GPU, and not with --smoke)")
    p.add_argument("--json", default="gpu_step.json", help="where the rows are written")
    p.add_argument("--cpu-path", action="store_true",
                   help="off a GPU, run the CPU's own paths (default: the GPU's code path, "
                        "its fused operators forced on this device: what a GPU launches, "
                        "counted as ATen operations)")

    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step: no CUDA device (use --device cpu --smoke to check the script)")
    if args.smoke:
        args.steps, args.rounds, args.warmup = 1, 1, 3  # the first steps bind and search
    if args.compile is None:
        args.compile = device.type == "cuda" and not args.smoke
    if device.type != "cuda" and not args.cpu_path:  # the CPU proxy of a GPU step
        blendq.set_execution(fused=True, cpu_native=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, blendq {blendq.__version__}, "
          f"execution policy {blendq.functional.execution()}")
    torch.manual_seed(0)
    t_start = time.perf_counter()

    side, batch, width = (32, 4, 0.125) if args.smoke else (224, 128, 1.0)
    resnet = build_model("resnet50_v1", num_classes=1000, image_size=side, width=width)
    rows = []
    if args.only in (None, "resnet50"):
        rows += _resnet_table(resnet, side, batch, device, args)
    if args.only in (None, "mobilenet"):
        rows += _mobilenet_table(device, args)
    if args.only in (None, "binarynet"):
        rows += _binarynet_table(device, args)
    if args.only in (None, "ppq"):
        rows += _ppq_rows(resnet, device)
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    with open(args.json, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "commit": commit(),
                   "execution": str(blendq.functional.execution()),
                   "total_s": total, "rows": rows}, f, indent=2)
    print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
