"""Deployment speed: blendq's exported int8 models beside ONNX Runtime's own
post-training quantization, in ONNX Runtime and OpenVINO.

For each network (the paper's MobileNet v1 and ResNet-50 v1 from ``blendq.models``,
random weights and batch-norm statistics: speed does not depend on the values) and
batch size, four ONNX files:

- ``fp32``: ``torch.onnx.export(dynamo=True)`` of the float network;
- ``quantize_static``: ``onnxruntime.quantization.quantize_static`` of that file (QDQ,
  per-channel int8 weights, uint8 activations, a few calibration batches, after
  ``quant_pre_process``): the anchor a user would otherwise reach for;
- ``blendq W8A8`` and ``blendq W4A8`` (and the W4A8 file's size with INT4 weight
  storage, ``export_onnx(weights="int4")``, which runs as the int8 file once
  ``blendq.export.onnx_session`` expands it): ``prepare`` (per-channel, the default graph
  placement), two training forwards, α = 1, ``convert``, ``export_onnx`` with the
  batch size fixed, as the other two files have it (``dynamic_batch=False``).

Each file is timed in ONNX Runtime (CPU, ``--threads`` intra-op threads) and, when
installed, OpenVINO (``compile_model(path, "CPU")``). Runs alternate between the files
in one process (round robin, the order rotated each round), so a change in machine load
hits them alike; the figure is the median. ORT sessions do not spin-wait between runs
(``session.intra_op.allow_spinning = 0``): with taking turns, a finished session's
spinning threads slowed the next session by up to 2x, and unevenly. Printed per file:
ms, speed relative to fp32 and to quantize_static, file size, and the int8 kernels in
the graph ORT runs (``optimized_model_filepath``, from a separate session).

    python benchmarks/deploy_speed.py                       # 224 px, batch 1 and 16
    python benchmarks/deploy_speed.py --json runs/deploy.json --repeats 30
    python benchmarks/deploy_speed.py --smoke               # tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import blendq
from blendq.export import export_onnx, fused_ops
from blendq.models import build_model

KERNELS = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearConcat", "QLinearGlobalAveragePool",
           "Conv", "FusedConv", "Gemm", "MatMul")


def float_model(name: str, size: int, width: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000, image_size=size, width=width).eval()
    for m in model.modules():  # batch norms with statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    return model


def ort_session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # sessions take turns: a finished session's threads must not spin on the cores the
    # next one needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_static(fp32: Path, out: Path, shape: tuple[int, ...], threads: int) -> Path:
    """ONNX Runtime's own static quantization of ``fp32`` (QDQ, U8S8, per channel)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
    )
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = 4
            self.name = ort_session(fp32, threads).get_inputs()[0].name
            self.rng = np.random.default_rng(0)

        def get_next(self):
            if self.left == 0:
                return None
            self.left -= 1
            return {self.name: self.rng.standard_normal(shape).astype(np.float32)}

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    ort_quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    return out


def blendq_file(model: torch.nn.Module, w_bits: int, x: torch.Tensor, out: Path,
                placement: str = "graph") -> Path:
    prepared = blendq.prepare(copy.deepcopy(model), blendq.QuantPolicy(
        w_bits=w_bits, a_bits=8, per_channel=True, placement=placement))
    prepared.train()
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(2, *x.shape[1:]))
    blendq.set_alpha(prepared.eval(), 1.0)
    converted = blendq.convert(prepared)
    if w_bits <= 4:  # the file with 4-bit storage: its size (it runs as the int8 one)
        export_onnx(converted, out.with_name(out.stem + "-int4.onnx"), x, dynamic_batch=False,
                    weights="int4")
    return export_onnx(converted, out, x, dynamic_batch=False)


def timers(files: dict[str, Path], x: np.ndarray, threads: int, tmp: Path,
           runtimes: tuple[str, ...]) -> dict:
    """One callable per (file, runtime), and the kernels ORT runs for each file."""
    calls, kernels = {}, {}
    core = None
    if "openvino" in runtimes:
        try:
            import openvino as ov

            core = ov.Core()
        except ImportError:
            print("openvino is not installed: ORT only (pip install 'blendq[openvino]')")
    for label, path in files.items():
        optimized = tmp / f"{path.stem}-ort-optimized.onnx"
        ort_session(path, threads, optimized)  # writes the graph ORT runs, to count kernels
        session = ort_session(path, threads)  # timed apart: saving the graph is not free
        feed = {session.get_inputs()[0].name: x}
        if "ort" in runtimes:
            calls[(label, "ORT")] = lambda s=session, f=feed: s.run(None, f)
        ops = fused_ops(optimized)
        kernels[label] = {k: ops[k] for k in KERNELS if ops.get(k)}
        if core is not None:
            compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
            request = compiled.create_infer_request()
            calls[(label, "OpenVINO")] = lambda r=request: r.infer({0: x})
    return {"calls": calls, "kernels": kernels}


def round_robin(calls: dict, repeats: int) -> dict:
    """Median ms of each call, the calls alternating, the order rotated every round (so
    no file always runs right after the same other one); two warm-up rounds first."""
    keys = list(calls)
    times = {key: [] for key in keys}
    for round_ in range(repeats + 2):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            calls[key]()
            if round_ >= 2:
                times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def run(name: str, size: int, batch: int, width: float, repeats: int, threads: int,
        tmp: Path, runtimes: tuple[str, ...] = ("ort", "openvino"), layers_row: bool = False
        ) -> list[dict]:
    model = float_model(name, size, width)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    files = {"fp32": tmp / f"{name}-{batch}-fp32.onnx"}
    torch.onnx.export(model, (x,), str(files["fp32"]), dynamo=True, external_data=False,
                      optimize=True, verbose=False)
    files["quantize_static"] = quantize_static(files["fp32"], tmp / f"{name}-{batch}-qs.onnx",
                                               tuple(x.shape), threads)
    for w_bits in (8, 4):
        files[f"blendq W{w_bits}A8"] = blendq_file(model, w_bits, x,
                                                  tmp / f"{name}-{batch}-w{w_bits}a8.onnx")
    if layers_row:  # the placement before activation sites: weight-layer inputs only
        files["blendq W8A8 layers"] = blendq_file(model, 8, x, tmp / f"{name}-{batch}-lay.onnx",
                                                  placement="layers")
    built = timers(files, x.numpy(), threads, tmp, runtimes)
    ms = round_robin(built["calls"], repeats)
    rows = []
    for label, path in files.items():
        for runtime in ("ORT", "OpenVINO"):
            if (label, runtime) not in ms:
                continue
            t = ms[(label, runtime)]
            rows.append({
                "model": name, "size": size, "batch": batch, "file": label, "runtime": runtime,
                "ms": round(t, 3), "x_fp32": round(ms[("fp32", runtime)] / t, 3),
                "x_quantize_static": round(ms[("quantize_static", runtime)] / t, 3),
                "mb": round(path.stat().st_size / 1e6, 2),
                "mb_int4": _int4_size(path),
                "ort_kernels": built["kernels"][label]})
    return rows


def _int4_size(path: Path) -> float | None:
    int4 = path.with_name(path.stem + "-int4.onnx")
    return round(int4.stat().st_size / 1e6, 2) if int4.exists() else None


def show(rows: list[dict]) -> None:
    head = f"{'model':13s} {'bs':>3s} {'file':19s} {'runtime':8s} {'ms':>8s} " \
           f"{'x fp32':>7s} {'x q_static':>10s} {'MB':>6s}  ORT kernels"
    print(head)
    for r in rows:
        kernels = ", ".join(f"{k} {v}" for k, v in r["ort_kernels"].items()) \
            if r["runtime"] == "ORT" else ""
        print(f"{r['model']:13s} {r['batch']:3d} {r['file']:19s} {r['runtime']:8s} "
              f"{r['ms']:8.2f} {r['x_fp32']:7.2f} {r['x_quantize_static']:10.2f} "
              f"{r['mb']:6.1f}  {kernels}", flush=True)
    for r in rows:
        if r["mb_int4"] and r["runtime"] == "ORT":
            print(f"{r['model']} {r['file']}: {r['mb_int4']:.1f} MB with INT4 weight storage "
                  f"({r['mb_int4'] / r['mb']:.2f}x the int8 file)")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v1", "resnet50_v1"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", nargs="+", choices=("ort", "openvino"),
                    default=["ort", "openvino"])
    ap.add_argument("--layers-row", action="store_true",
                    help="also blendq W8A8 with placement='layers' (no activation sites)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny networks and images (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.width, a.repeats, a.batches = 32, 0.25, 2, [1]
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            for batch in a.batches:
                rows += run(name, a.size, batch, a.width, a.repeats, a.threads, Path(tmp),
                            tuple(a.runtimes), a.layers_row)
    show(rows)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        from _harness import cpu_name

        a.json.write_text(json.dumps({"machine": cpu_name(),
                                      "threads": a.threads, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
