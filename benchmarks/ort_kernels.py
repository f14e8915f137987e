"""ONNX Runtime's CPU matmul kernels alone, at one row and at many: what a 4-bit or
int8 language-model file can run at most, before any model around them.

    python benchmarks/ort_kernels.py --out runs/ort-kernels            # GPT-2 small's MLP
    python benchmarks/ort_kernels.py --smoke --out /tmp/ort-kernels    # checks it runs

One graph per kernel holding ``--weights`` matmuls of ``K × N`` (default 768 × 3072,
GPT-2 small's first MLP layer), each with its own random weight (so nothing is shared
and ORT's common-subexpression pass cannot merge them), all reading one float32 input
of ``M × K`` rows:
- ``MatMulNBits`` (4-bit codes, one float32 scale a block) at accuracy level 0 (float32
  activations) and level 4 (int8 activations per block inside the kernel), at each
  ``--blocks`` size;
- ``MatMulInteger`` on uint8 inputs (one ``DynamicQuantizeLinear`` before it) and int8
  weights, its int32 result cast to float: ORT's int8 GEMM as a standard-ONNX file
  writes it;
- ``DynamicQuantizeMatMul``: what ``onnxruntime.quantization.quantize_dynamic`` writes.

Times: milliseconds per matmul, medians of ``--repeats`` alternating blocks of
``--inner`` calls in one process (default session options, spinning off, 2 threads
unless ``--threads``). Rows to ``OUT/ort_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from _harness import commit, cpu_name  # this folder is on the path when the script runs


def _model(nodes, inits, k: int, outputs: list[str], contrib: bool):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "kernels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    opsets = [helper.make_opsetid("", 21)] + \
        ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    return helper.make_model(graph, opset_imports=opsets)


def nbits(k: int, n: int, weights: int, block: int, level: int, rng):
    """``weights`` ``MatMulNBits`` nodes (4 bits, ``block``, ``level``) reading ``x``."""
    from onnx import helper, numpy_helper

    blocks = -(-k // block)
    nodes, inits, outputs = [], [], []
    for i in range(weights):
        codes = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
        scales = (rng.random(n * blocks, dtype=np.float32) + 0.5) / 64
        inits += [numpy_helper.from_array(codes, f"b{i}"),
                  numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block, accuracy_level=level))
        outputs.append(f"y{i}")
    return _model(nodes, inits, k, outputs, contrib=True)


def matmul_integer(k: int, n: int, weights: int, rng):
    """``DynamicQuantizeLinear`` then ``weights`` ``MatMulInteger`` + ``Cast`` nodes."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"])]
    inits, outputs = [], []
    for i in range(weights):
        inits.append(numpy_helper.from_array(
            rng.integers(-64, 65, (k, n), dtype=np.int8), f"w{i}"))
        nodes += [helper.make_node("MatMulInteger", ["q", f"w{i}", "qz"], [f"acc{i}"]),
                  helper.make_node("Cast", [f"acc{i}"], [f"y{i}"], to=TensorProto.FLOAT)]
        outputs.append(f"y{i}")
    return _model(nodes, inits, k, outputs, contrib=False)


def dynamic_quantize_matmul(k: int, n: int, weights: int, rng):
    """``weights`` ``DynamicQuantizeMatMul`` nodes (int8 per channel)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.full(n, 1 / 64, np.float32), "scale")]
    nodes, outputs = [], []
    for i in range(weights):
        inits.append(numpy_helper.from_array(
            rng.integers(-64, 65, (k, n), dtype=np.int8), f"w{i}"))
        nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", f"w{i}", "scale"],
                                      [f"y{i}"], domain="com.microsoft"))
        outputs.append(f"y{i}")
    return _model(nodes, inits, k, outputs, contrib=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ort-kernels")
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--weights", type=int, default=8, help="matmuls (distinct weights) a graph")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.k, args.n, args.weights, args.blocks = 64, 96, 2, [32]
        args.rows, args.repeats, args.inner = [1, 4], 2, 2
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    graphs = {f"MatMulNBits g{b} level {lv}": nbits(args.k, args.n, args.weights, b, lv, rng)
              for b in args.blocks for lv in (0, 4)}
    graphs["MatMulInteger (uint8 x int8)"] = matmul_integer(args.k, args.n, args.weights, rng)
    graphs["DynamicQuantizeMatMul"] = dynamic_quantize_matmul(args.k, args.n, args.weights,
                                                              rng)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {label: ort.InferenceSession(model.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
                for label, model in graphs.items()}
    rows = []
    for m in args.rows:
        x = {"x": rng.standard_normal((m, args.k), dtype=np.float32)}
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(args.repeats):  # alternating blocks: no kernel gets a quiet machine
            for label, session in sessions.items():
                session.run(None, x)
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    session.run(None, x)
                times[label].append((time.perf_counter() - t0) / args.inner / args.weights
                                    * 1e3)
        int8 = statistics.median(times["MatMulInteger (uint8 x int8)"])
        for label, values in times.items():
            ms = statistics.median(values)
            rows.append({"kernel": label, "rows": m, "ms_per_matmul": ms,
                         "x_matmulinteger": ms / int8})
    print(f"{cpu_name()}, onnxruntime {ort.__version__}, {args.threads} threads, "
          f"K {args.k} x N {args.n}, {args.weights} matmuls a graph")
    print(f"{'kernel':32s} {'rows':>5s} {'ms a matmul':>12s} {'x MatMulInteger':>16s}")
    for r in rows:
        print(f"{r['kernel']:32s} {r['rows']:5d} {r['ms_per_matmul']:12.3f} "
              f"{r['x_matmulinteger']:16.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_kernels.json").write_text(json.dumps(
        {"machine": f"CPU {cpu_name()}, {args.threads} threads", "commit": commit(),
         "onnxruntime": ort.__version__,
         "rows": rows, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
