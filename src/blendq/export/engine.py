"""Integer reference engine (paper eq. 7): ``y = δ((γ_w·γ_a)·(q_w ⋆ q_a) + b)``.

Each quantized layer quantizes its input to integer codes with its activation
scale, convolves (or multiplies) integer codes with integer weight codes, and
applies one rescale per output channel and a bias (batch norm folded in). The
accumulation runs in float64 on integer values, which is exact while
``|acc| < 2^53`` (an int32 accumulator holds the same values whenever they fit
in 31 bits: ``assert_int32`` checks that). Everything between quantized layers
(ReLU, pooling, adds) runs in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import quantize
from .ir import Graph, Node

__all__ = ["IntegerEngine", "run_graph"]


def _act_codes(x: Tensor, node: Node) -> Tensor:
    bits = node.attrs["a_bits"]
    if bits is None:
        return x  # float input (e.g. BinaryNet's first layer): not integer, still exact
    scale = node.tensors["act_scale"]
    return quantize(x, scale, bits, node.attrs["a_signed"])


def _channel(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))  # (1, C, 1, ...) per channel


def _quant_layer(node: Node, x: Tensor, stats: dict | None) -> Tensor:
    codes_in = _act_codes(x, node)  # integers (or the float input of a first layer)
    w = node.tensors["codes"].double()
    if node.op == "qlinear":
        acc = codes_in @ w.t()
    else:
        conv = F.conv2d if node.attrs["dims"] == 2 else F.conv1d
        acc = conv(codes_in, w, None, node.attrs["stride"], node.attrs["padding"],
                   node.attrs["dilation"], node.attrs["groups"])
    if stats is not None and node.attrs["a_bits"] is not None:
        stats[node.name] = float(acc.abs().max()) if acc.numel() else 0.0
    # mul = γ_w·γ_a per output channel (γ_a = 1 for a float input), batch norm folded
    # in; add is a whole number of |mul| units where the input is quantized (ir.py)
    mul, add = node.tensors["mul"], node.tensors["add"]
    return acc * _channel(mul, acc) + _channel(add, acc)


def run_graph(graph: Graph, x: Tensor, stats: dict | None = None) -> Tensor:
    """Run ``graph`` on ``x`` in float64 with integer cores; returns float64 logits."""
    values: dict[str, Tensor] = {}
    for node in graph.nodes:
        ins = [values[i] for i in node.inputs]
        a = node.attrs
        if node.op == "input":
            out = x.double()
        elif node.op in ("qconv", "qlinear"):
            out = _quant_layer(node, ins[0], stats)
        elif node.op == "affine":
            out = ins[0] * _channel(node.tensors["mul"], ins[0]) + _channel(
                node.tensors["add"], ins[0])
        elif node.op == "relu":
            out = torch.relu(ins[0])
        elif node.op == "clip":
            out = ins[0].clamp(a["min"], a["max"])
        elif node.op == "maxpool":
            out = F.max_pool2d(ins[0], a["kernel"], a["stride"], a["padding"],
                               ceil_mode=a["ceil_mode"])
        elif node.op == "avgpool":
            out = F.avg_pool2d(ins[0], a["kernel"], a["stride"], a["padding"],
                               ceil_mode=a["ceil_mode"], count_include_pad=a["count_include_pad"])
        elif node.op == "global_avgpool":
            out = ins[0].mean(dim=(2, 3), keepdim=True)
        elif node.op == "flatten":
            out = torch.flatten(ins[0], 1)
        elif node.op == "add":
            out = ins[0] + ins[1]
        elif node.op == "identity":
            out = ins[0]
        else:
            raise ValueError(f"unknown op {node.op!r} in node {node.name}")
        values[node.name] = out
    return values[graph.output]


class IntegerEngine(nn.Module):
    """A :class:`Graph` as a module: ``engine(x)`` gives float64 logits."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return run_graph(self.graph, x)

    @torch.no_grad()
    def max_accumulator(self, x: Tensor) -> dict[str, float]:
        """Largest ``|acc|`` per quantized layer on ``x`` (int32 holds < 2^31)."""
        stats: dict[str, float] = {}
        run_graph(self.graph, x, stats)
        return stats
