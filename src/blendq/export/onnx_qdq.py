"""ONNX export as a QDQ graph (QuantizeLinear/DequantizeLinear around Conv/Gemm).

Weights: int8 initializers holding the integer codes (lower bit widths stored
exactly in int8), per-output-channel DequantizeLinear scales with batch norm
folded in; a negative folded multiplier is made positive by negating that
channel's codes (DESIGN §2.6). Activations: Clip to the grid's reach, then
QuantizeLinear/DequantizeLinear (uint8 for unsigned grids, int8 for signed
ones); 1-bit activations become ``Where(x >= 0, γ, -γ)``. Biases of layers with
an integer input: int32 accumulator units behind a DequantizeLinear (the graph
already holds them as whole units, ``ir.py``), so an int8 kernel adds exactly the
integer that evaluation added. ONNX Runtime's CPU provider fuses the 8-bit pattern
into QLinearConv/QGemm.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..functional import grid
from .ir import ExportError, Graph, Node, integer_bias, to_graph

__all__ = ["export_onnx", "graph_to_onnx", "onnx_session", "run_onnx", "OPSET"]

OPSET = 13


class _Builder:
    def __init__(self, quantize: bool = True) -> None:
        from onnx import helper

        self.helper = helper
        self.quantize = quantize
        self.nodes, self.inits, self.rank = [], [], {}
        self.alias: dict[str, str] = {}  # graph value -> ONNX tensor holding it
        self.anchors: dict[str, Node] = {}  # graph value -> quantized layer whose Q goes there
        self.done: set[str] = set()  # quantized layers whose input is already Q/DQ
        self.covered: set[str] = set()  # ReLUs made redundant by an unsigned Q before them

    def get(self, name: str) -> str:
        return self.alias.get(name, name)

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


def _channel_shape(values: np.ndarray, rank: int) -> np.ndarray:
    return values.reshape(1, -1, *([1] * (rank - 2)))


_MONOTONE = ("maxpool", "identity", "flatten")  # commute with rounding to a grid


def _anchor(graph: Graph, node: Node, covered: set[str]) -> str:
    """Where a layer's input quantization can move: back across max pooling, flatten
    and (for unsigned grids) ReLU, which all commute with ``clamp(round(x/γ))``; a ReLU
    crossed is added to ``covered`` (the unsigned grid does its work). Placed right after
    a convolution, it lets ONNX Runtime fuse DQ -> Conv -> Q into QLinearConv."""
    value = node.inputs[0]
    unsigned = node.attrs["a_signed"] is False
    while True:
        producer = next((n for n in graph.nodes if n.name == value), None)
        if producer is None or len(graph.consumers(value)) != 1:
            return value
        if producer.op in _MONOTONE or (producer.op == "relu" and unsigned):
            if producer.op == "relu":
                covered.add(producer.name)
            value = producer.inputs[0]
        else:
            return value


def _quantized_input(b: _Builder, node: Node, src: str) -> str:
    bits, name = node.attrs["a_bits"], node.name
    if bits is None or name in b.done:
        return src
    scale = np.float32(node.tensors["act_scale"].item())
    signed = bool(node.attrs["a_signed"])
    if bits == 1 and signed:
        zero = b.const(f"{name}.zero", np.array(0.0, np.float32))
        mask = b.op("GreaterOrEqual", [src, zero], f"{name}.ge0")
        pos = b.const(f"{name}.pos", np.array(scale, np.float32))
        neg = b.const(f"{name}.neg", np.array(-scale, np.float32))
        return b.op("Where", [mask, pos, neg], f"{name}.sign")
    qmin, qmax = grid(bits, signed)
    clipped = src
    if (qmin, qmax) != ((0, 255) if not signed else (-128, 127)):  # else Q saturates alike
        lo = b.const(f"{name}.lo", np.array(qmin * scale, np.float32))
        hi = b.const(f"{name}.hi", np.array(qmax * scale, np.float32))
        clipped = b.op("Clip", [src, lo, hi], f"{name}.clip")
    s = b.const(f"{name}.a_scale", np.array(scale, np.float32))
    zp = b.const(f"{name}.a_zp", np.array(0, np.int8 if signed else np.uint8))
    q = b.op("QuantizeLinear", [clipped, s, zp], f"{name}.q")
    return b.op("DequantizeLinear", [q, s, zp], f"{name}.dq")


def _quantized_layer(b: _Builder, node: Node, src: str) -> str:
    name = node.name
    mul = node.tensors["mul"].double().numpy()
    a_scale = node.tensors["act_scale"].item() if node.attrs["a_bits"] is not None else 1.0
    sign = np.where(mul < 0, -1, 1)
    codes = node.tensors["codes"].numpy().astype(np.int16)
    codes = (codes * sign.reshape(-1, *([1] * (codes.ndim - 1)))).astype(np.int8)
    w_scale = (np.abs(mul) / a_scale).astype(np.float32)  # acc·mul = (q_a·γ_a)·(q_w·w_scale)
    w_scale = np.where(w_scale > 0, w_scale, np.float32(1e-30))
    add = node.tensors["add"].double().numpy()
    if b.quantize and integer_bias(node):  # whole accumulator units (ir.py)
        bias = _int32_bias(b, name, add, np.abs(mul), np.float32(a_scale) * w_scale)
    else:
        bias = b.const(f"{name}.bias", add.astype(np.float32))
    if b.quantize:
        w = b.const(f"{name}.w_codes", codes)
        ws = b.const(f"{name}.w_scale", w_scale)
        wz = b.const(f"{name}.w_zp", np.zeros(len(w_scale), np.int8))
        w_dq = b.op("DequantizeLinear", [w, ws, wz], f"{name}.w_dq", axis=0)
        x = _quantized_input(b, node, src)
    else:  # the same network in float: dequantized weights, float activations
        shape = (-1, *([1] * (codes.ndim - 1)))
        w_dq = b.const(f"{name}.w", (codes.astype(np.float32) * w_scale.reshape(shape)))
        x = src
    if node.op == "qlinear":
        b.rank[name] = 2
        return b.op("Gemm", [x, w_dq, bias], name, transB=1)
    a = node.attrs
    b.rank[name] = b.rank[node.inputs[0]]
    return b.op("Conv", [x, w_dq, bias], name, strides=a["stride"], pads=a["padding"] * 2,
                dilations=a["dilation"], group=a["groups"])


def _int32_bias(b: _Builder, name: str, add: np.ndarray, unit: np.ndarray,
                scale: np.ndarray) -> str:
    """The bias as int32 accumulator units behind a DequantizeLinear (the QDQ form that
    int8 kernels take as is, instead of rounding a float bias themselves)."""
    units = np.round(np.divide(add, unit, out=np.zeros_like(add), where=unit > 0))
    if np.abs(units).max(initial=0) >= 2**31:
        raise ExportError(f"layer {name}: bias exceeds the int32 accumulator range")
    q = b.const(f"{name}.bias_q", units.astype(np.int32))
    s = b.const(f"{name}.bias_scale", scale.astype(np.float32))
    zp = b.const(f"{name}.bias_zp", np.zeros(len(scale), np.int32))
    return b.op("DequantizeLinear", [q, s, zp], f"{name}.bias_dq", axis=0)


def _emit(b: _Builder, node: Node) -> None:
    _emit_op(b, node)
    target = b.anchors.get(node.name)
    if target is not None:  # the next quantized layer's Q/DQ goes right here
        b.alias[node.name] = _quantized_input(b, target, b.get(node.name))
        b.done.add(target.name)


def _emit_op(b: _Builder, node: Node) -> None:
    ins, name, a = [b.get(i) for i in node.inputs], node.name, node.attrs
    if node.op == "input":  # the graph input itself: nothing to compute
        return
    if node.op in ("qconv", "qlinear"):
        _quantized_layer(b, node, ins[0])
        return
    b.rank[name] = b.rank[node.inputs[0]]
    if node.op == "affine":
        rank = b.rank[node.inputs[0]]
        k = b.const(f"{name}.mul", _channel_shape(node.tensors["mul"].numpy(), rank)
                    .astype(np.float32))
        t = b.const(f"{name}.add", _channel_shape(node.tensors["add"].numpy(), rank)
                    .astype(np.float32))
        b.op("Add", [b.op("Mul", [ins[0], k], f"{name}.scaled"), t], name)
    elif node.op == "relu":
        b.op("Identity" if name in b.covered else "Relu", ins, name)
    elif node.op == "clip":
        lo = b.const(f"{name}.min", np.array(a["min"], np.float32))
        hi = b.const(f"{name}.max", np.array(a["max"], np.float32))
        b.op("Clip", [ins[0], lo, hi], name)
    elif node.op == "maxpool":
        b.op("MaxPool", ins, name, kernel_shape=a["kernel"], strides=a["stride"],
             pads=a["padding"] * 2, ceil_mode=int(a["ceil_mode"]))
    elif node.op == "avgpool":
        b.op("AveragePool", ins, name, kernel_shape=a["kernel"], strides=a["stride"],
             pads=a["padding"] * 2, ceil_mode=int(a["ceil_mode"]),
             count_include_pad=int(a["count_include_pad"]))
    elif node.op == "global_avgpool":
        b.op("GlobalAveragePool", ins, name)
    elif node.op == "flatten":
        b.rank[name] = 2
        b.op("Flatten", ins, name, axis=1)
    elif node.op == "add":
        b.op("Add", ins, name)
    elif node.op == "identity":
        b.op("Identity", ins, name)
    else:
        raise ExportError(f"node {name}: op {node.op!r} has no ONNX form")


def graph_to_onnx(graph: Graph, input_shape: tuple[int, ...], quantize: bool = True):
    """An ``onnx.ModelProto`` for ``graph`` with a dynamic batch dimension.

    ``quantize=False`` emits the same network in float32 (dequantized weights, no
    Q/DQ): the fp32 baseline that ``benchmarks/onnx_speed.py`` times against."""
    import onnx
    from onnx import TensorProto, helper

    b = _Builder(quantize)
    first = graph.nodes[0]
    b.rank[first.name] = len(input_shape)
    for node in graph.nodes if quantize else []:
        if node.op in ("qconv", "qlinear") and node.attrs["a_bits"] is not None and not (
                node.attrs["a_bits"] == 1 and node.attrs["a_signed"]):
            b.anchors[_anchor(graph, node, b.covered)] = node
    for node in graph.nodes:
        _emit(b, node)
    b.op("Identity", [b.get(graph.output)], "logits")
    inp = helper.make_tensor_value_info(first.name, TensorProto.FLOAT,
                                        ["batch", *input_shape[1:]])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])
    model = helper.make_model(helper.make_graph(b.nodes, "blendq", [inp], [out], b.inits),
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="blendq")
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(converted_model: nn.Module, path: str | os.PathLike,
                example_input: Tensor) -> Path:
    """Export a converted model (``blendq.convert``) to an ONNX QDQ file at ``path``.

    ``example_input`` fixes the input's shape (its batch size stays dynamic). The
    file passes ``onnx.checker`` with ``full_check`` and runs in ONNX Runtime.

    Raises:
        ExportError: the model is not converted, or holds an unsupported layer.
    """
    import onnx

    graph = to_graph(converted_model)
    model = graph_to_onnx(graph, tuple(example_input.shape))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_session(path: str | os.PathLike, optimize: bool = True):
    """An ONNX Runtime CPU session. ``optimize`` (the default) lets ORT fuse the QDQ
    pattern into int8 kernels (QLinearConv); ``False`` runs the QDQ graph as written
    (float convolutions of dequantized values: the exact QDQ semantics, slower)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: Tensor) -> Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.float().numpy()})[0])
