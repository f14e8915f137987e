"""A small graph of a converted model: what the integer engine runs, the artifact
stores and the ONNX exporter emits.

``to_graph(converted_model)`` traces the model with ``torch.fx`` and keeps only
operations blendq knows: quantized Linear/Conv (integer core, one rescale per
output channel), per-channel affine (batch norm in eval), ReLU/ReLU6/Hardtanh,
max and average pooling, flatten, add. Batch norm is folded into the preceding
quantized layer's rescale and bias, directly or across a max pool (the rescale
is then applied after the pool, which is exact because the pool sees integer
accumulators), negative multipliers included (DESIGN §2.6).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from ..converted import QuantConv1d, QuantConv2d, QuantMixin
from ..functional import round_bias
from ..layers import BlendMixin, bn_affine

__all__ = ["Node", "Graph", "to_graph", "ExportError", "integer_bias"]


class ExportError(ValueError):
    """The model cannot be exported (not converted, or an unsupported operation)."""


@dataclass
class Node:
    """One operation. ``op`` is one of :data:`OPS`; tensors are float64/int8."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Graph:
    nodes: list[Node]
    output: str

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]


OPS = ("input", "qconv", "qlinear", "affine", "relu", "clip", "maxpool", "avgpool",
       "global_avgpool", "flatten", "add", "identity")


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantMixin | nn.modules.batchnorm._BatchNorm) or \
            super().is_leaf_module(m, qualname)


def _tuple2(v) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


def _quant_node(name: str, m: QuantMixin, src: str) -> Node:
    codes = m.weight_codes
    out_ch = codes.shape[0]
    w_scale = m.weight_scale.double().reshape(-1).expand(out_ch) if m.per_channel else \
        m.weight_scale.double().reshape(()).expand(out_ch)
    one = torch.ones((), dtype=torch.float64)
    a_scale = m.act_scale.double().reshape(()) if m.a_bits is not None else one
    bias = m.bias.detach().double() if m.bias is not None else torch.zeros(out_ch).double()
    attrs = {"w_bits": m.w_bits, "a_bits": m.a_bits, "a_signed": m.a_signed,
             "per_channel": m.per_channel}
    if isinstance(m, QuantConv2d | QuantConv1d):
        if m.padding_mode != "zeros":
            raise ExportError(f"layer {name}: padding_mode={m.padding_mode!r} is not supported")
        dims = 2 if isinstance(m, QuantConv2d) else 1
        attrs.update(dims=dims, stride=list(m.stride), padding=list(m.padding),
                     dilation=list(m.dilation), groups=m.groups)
        op = "qconv"
    else:
        op = "qlinear"
    tensors = {"codes": codes.clone(), "act_scale": a_scale.clone(),
               "mul": (w_scale * a_scale).clone(), "add": bias.clone()}
    return Node(name, op, [src], attrs, tensors)


def _module_node(name: str, m: nn.Module, src: str) -> Node:
    if isinstance(m, QuantMixin):
        return _quant_node(name, m, src)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        if m.running_mean is None:
            raise ExportError(f"layer {name}: batch norm without running statistics")
        k, t = bn_affine(m)
        return Node(name, "affine", [src], {}, {"mul": k, "add": t})
    if isinstance(m, nn.ReLU):
        return Node(name, "relu", [src])
    if isinstance(m, nn.ReLU6):
        return Node(name, "clip", [src], {"min": 0.0, "max": 6.0})
    if isinstance(m, nn.Hardtanh):
        return Node(name, "clip", [src], {"min": float(m.min_val), "max": float(m.max_val)})
    if isinstance(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)) or m.return_indices:
            raise ExportError(f"layer {name}: MaxPool2d with dilation/indices is not supported")
        return Node(name, "maxpool", [src], {"kernel": _tuple2(m.kernel_size),
                                             "stride": _tuple2(m.stride or m.kernel_size),
                                             "padding": _tuple2(m.padding),
                                             "ceil_mode": m.ceil_mode})
    if isinstance(m, nn.AvgPool2d):
        return Node(name, "avgpool", [src], {"kernel": _tuple2(m.kernel_size),
                                             "stride": _tuple2(m.stride or m.kernel_size),
                                             "padding": _tuple2(m.padding),
                                             "ceil_mode": m.ceil_mode,
                                             "count_include_pad": m.count_include_pad})
    if isinstance(m, nn.AdaptiveAvgPool2d) and _tuple2(m.output_size) == [1, 1]:
        return Node(name, "global_avgpool", [src])
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ExportError(f"layer {name}: only Flatten(start_dim=1) is supported")
        return Node(name, "flatten", [src])
    if isinstance(m, nn.Identity | nn.Dropout):
        return Node(name, "identity", [src])
    if isinstance(m, BlendMixin):
        raise ExportError(f"layer {name} is a blended layer: call blendq.convert(model) first")
    raise ExportError(f"layer {name}: {type(m).__name__} is not supported by the exporter "
                      "(supported: quantized Linear/Conv, BatchNorm, ReLU, ReLU6, Hardtanh, "
                      "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, add)")


def _function_node(name: str, node: torch.fx.Node, args: list[str]) -> Node:
    target = node.target
    if target in (operator.add, torch.add) or target == "add":
        return Node(name, "add", args)
    if target in (torch.flatten,) or target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start != 1:
            raise ExportError(f"{name}: only flatten(x, 1) is supported")
        return Node(name, "flatten", args[:1])
    if target in (torch.relu, nn.functional.relu) or target == "relu":
        return Node(name, "relu", args[:1])
    raise ExportError(f"operation {name} ({target}) is not supported by the exporter")


def to_graph(model: nn.Module) -> Graph:
    """Trace a converted model into a :class:`Graph`, folding batch norm."""
    if any(isinstance(m, BlendMixin) for m in model.modules()):
        raise ExportError("model holds blended layers: call blendq.convert(model) before export")
    if not any(isinstance(m, QuantMixin) for m in model.modules()):
        raise ExportError("model has no quantized layers: prepare, train and convert it first")
    traced = torch.fx.GraphModule(model, _Tracer().trace(model))
    nodes, output = [], None
    for n in traced.graph.nodes:
        args = [a.name for a in n.args if isinstance(a, torch.fx.Node)]
        if n.op == "placeholder":
            if nodes:
                raise ExportError("models with more than one input are not supported")
            nodes.append(Node(n.name, "input", []))
        elif n.op == "call_module":
            nodes.append(_module_node(n.name, traced.get_submodule(n.target), args[0]))
            nodes[-1].attrs["module"] = n.target
        elif n.op in ("call_function", "call_method"):
            nodes.append(_function_node(n.name, n, args))
        elif n.op == "output":
            output = args[0]
        else:
            raise ExportError(f"{n.name}: fx op {n.op} is not supported")
    graph = Graph(nodes, output)
    _fold_affine(graph)
    return graph


def integer_bias(node: Node) -> bool:
    """Whether a quantized layer runs on an integer input grid, where int8 kernels add
    its bias to the int32 accumulator (not for a float or a sign (±1) input)."""
    bits = node.attrs["a_bits"]
    return bits is not None and not (bits == 1 and node.attrs["a_signed"])


def _single_consumer(graph: Graph, node: Node) -> Node | None:
    users = graph.consumers(node.name)
    return users[0] if len(users) == 1 and node.name != graph.output else None


def _fold_affine(graph: Graph) -> None:
    """``qlayer -> affine`` and ``qlayer -> maxpool -> affine``: merge the affine into
    the rescale: ``k·(m·acc + o) + t = (k·m)·acc + (k·o + t)``. The bias of a layer with
    an integer input (the affine merged in, or before it moves past a pool) becomes a
    whole number of accumulator units ``|m|``: int8 runtimes add it to the int32
    accumulator, and the α = 1 model evaluates it so (``FoldedBatchNorm``)."""
    for node in list(graph.nodes):
        if node.op not in ("qconv", "qlinear"):
            continue
        nxt = _single_consumer(graph, node)
        if nxt is not None and nxt.op == "affine":
            _merge(node, nxt, graph)
        if integer_bias(node):
            node.tensors["add"] = round_bias(node.tensors["add"], node.tensors["mul"])
        if nxt is not None and nxt.op == "maxpool":
            bn = _single_consumer(graph, nxt)
            if bn is not None and bn.op == "affine":
                # the pool sees the integer accumulator; the whole rescale moves after it
                k, t = bn.tensors["mul"], bn.tensors["add"]
                bn.tensors = {"mul": k * node.tensors["mul"],
                              "add": k * node.tensors["add"] + t}
                node.tensors["mul"] = torch.ones_like(node.tensors["mul"])
                node.tensors["add"] = torch.zeros_like(node.tensors["add"])
                node.attrs["rescale_after"] = bn.name


def _merge(node: Node, affine: Node, graph: Graph) -> None:
    k, t = affine.tensors["mul"], affine.tensors["add"]
    node.tensors["mul"] = k * node.tensors["mul"]
    node.tensors["add"] = k * node.tensors["add"] + t
    graph.nodes.remove(affine)
    for other in graph.nodes:
        other.inputs = [node.name if i == affine.name else i for i in other.inputs]
    if graph.output == affine.name:
        graph.output = node.name
