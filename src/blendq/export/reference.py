"""Integer reference engine (paper eq. 7): ``y = (γ_w·γ_a)·(q_w ⋆ q_a) + b`` on the
captured graph.

The engine interprets the ``torch.export`` program that the ONNX exporter translates
(:func:`blendq.export.capture`), so it covers every model that exports. A
convolution, linear layer or transposed convolution whose input and weight are both
dequantized codes runs its core on the integer codes (float64 holds every integer
accumulator exactly while ``|acc| < 2^53``; :meth:`IntegerEngine.max_accumulator` checks
the int32 range) and applies one rescale per output channel and the bias. Every other
operation runs by its ATen definition in float64.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from .capture import example_args

__all__ = ["IntegerEngine", "first_tensor", "TIE_WINDOW"]

# An activation whose value sits this close (in codes) to the midpoint between two codes
# is on a rounding tie: float64 paths that sum in another order (another CPU, another
# thread count) may round it either way, and so may every value computed from it. Their
# errors are ~1e-13 codes; a wider window would also catch values that merely happen to
# lie near a midpoint (a constant channel 1e-6 from it was seen 75 times in one batch).
TIE_WINDOW = 1e-9

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _qd():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the operators)

    return torch.ops.quantized_decomposed


def _wide(value):
    """Float tensors (and float dtypes given as arguments) in float64."""
    if isinstance(value, Tensor) and value.dtype in _FLOATS:
        return value.double()
    if isinstance(value, torch.dtype) and value in _FLOATS:
        return torch.float64
    if isinstance(value, list | tuple):
        return type(value)(_wide(v) for v in value)
    return value


def first_tensor(out) -> Tensor:
    """The logits of a model output: a tensor, the ``logits`` of a dict-like output, or
    the first tensor of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        return out["logits"] if "logits" in out else first_tensor(next(iter(out.values())))
    return first_tensor(out[0])


class _Codes:
    """Integer codes and their scale, riding along a dequantized value."""

    def __init__(self, codes: Tensor, scale: Tensor, axis: int | None) -> None:
        self.codes, self.scale, self.axis = codes, scale, axis


class _Interpreter(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, stats: dict | None, batch: int,
                 integer: bool = True) -> None:
        super().__init__(module)
        self.integer = integer
        self.codes: dict[str, _Codes] = {}
        self.tied = torch.zeros(batch, dtype=torch.long)  # tied activations per sample
        self.stats = stats
        self.integer_layers = 0
        qd = _qd()
        self.dequantize = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor,
                           qd.dequantize_per_channel.default}
        self.quantize = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}
        self.cores = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                      torch.ops.aten.conv3d.default, torch.ops.aten.linear.default,
                      torch.ops.aten.conv_transpose1d.default,
                      torch.ops.aten.conv_transpose2d.input,
                      torch.ops.aten.conv_transpose3d.input}

    def get_attr(self, target, args, kwargs):
        return _wide(super().get_attr(target, args, kwargs))

    def placeholder(self, target, args, kwargs):
        return _wide(super().placeholder(target, args, kwargs))

    def run_node(self, n: torch.fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.target in self.quantize:  # codes of the float64 value: round(x / s) + zp
            x, scale, zero, qmin, qmax = args[:5]
            steps = x / scale
            codes = torch.round(steps)
            self._count_ties(steps, codes)
            return torch.clamp(codes + zero, qmin, qmax)
        if n.target in self.dequantize:
            q, scale, zero = args[0].double(), args[1], args[2]
            axis = args[3] if n.target is _qd().dequantize_per_channel.default else None
            scale, zero = _wide(torch.as_tensor(scale)), torch.as_tensor(zero).double()
            if axis is not None:
                view = [1] * q.dim()
                view[axis] = -1
                scale, zero = scale.reshape(view), zero.reshape(view)
            codes = q - zero
            self.codes[n.name] = _Codes(codes, scale, axis)
            return codes * scale
        if n.target in self.cores and self.integer:
            out = self._integer_core(n, args)
            if out is not None:
                return out
        return n.target(*_wide(args), **{k: _wide(v) for k, v in kwargs.items()})

    def _count_ties(self, steps: Tensor, rounded: Tensor) -> None:
        """Count the values ``steps`` (``rounded``: each rounded to the nearest whole)
        within :data:`TIE_WINDOW` of a rounding midpoint, per sample where the tensor's
        first dimension is the batch (else against every sample)."""
        tied = (steps - rounded).abs_() >= 0.5 - TIE_WINDOW
        if steps.dim() > 0 and steps.shape[0] == len(self.tied):
            self.tied += tied.reshape(len(self.tied), -1).sum(1)
        else:
            self.tied += int(tied.sum())

    def _integer_core(self, n: torch.fx.Node, args) -> Tensor | None:
        """``(s_x·s_w)·(q_x ⋆ q_w) + b`` where input and weight are codes (one input scale,
        one weight scale per output channel); ``None`` where they are not."""
        x_node, w_node = n.args[0], n.args[1]
        if not (isinstance(x_node, torch.fx.Node) and isinstance(w_node, torch.fx.Node)):
            return None
        x, w = self.codes.get(x_node.name), self.codes.get(w_node.name)
        if x is None or w is None or x.axis is not None or x.scale.numel() != 1:
            return None
        transposed = n.target not in (torch.ops.aten.conv1d.default,
                                      torch.ops.aten.conv2d.default,
                                      torch.ops.aten.conv3d.default,
                                      torch.ops.aten.linear.default)
        out_axis = 1 if transposed else 0
        if w.axis not in (None, out_axis):
            return None
        rest = list(args[3:])
        if transposed and len(rest) >= 4 and rest[3] != 1:  # groups: scales per group slice
            return None
        acc = n.target(x.codes, w.codes, None, *rest)
        if self.stats is not None:
            self.stats[n.name] = float(acc.abs().max()) if acc.numel() else 0.0
        scale = (x.scale * w.scale).reshape(-1)  # (C_out,) or (1,)
        channel = -1 if n.target is torch.ops.aten.linear.default else 1
        view = [1] * acc.dim()
        view[channel] = scale.numel()
        out = acc * scale.reshape(view)
        bias = args[2] if len(args) > 2 else None
        if bias is not None:
            view[channel] = bias.numel()
            out = out + bias.reshape(view)
        self.integer_layers += 1
        return out


class IntegerEngine(nn.Module):
    """A captured program (:func:`blendq.export.capture`) as a module: ``engine(x)`` gives
    the model's output in float64, integer cores where the layer is quantized
    (``integer=False``: the same graph with every operation in float64, the float
    reference that differs from the integer cores only by the order of float sums)."""

    def __init__(self, program: torch.export.ExportedProgram, integer: bool = True) -> None:
        super().__init__()
        self.program = program
        self.integer = integer  # False: every operation in float64 (a float reference)
        self.graph_module = program.module()
        self.integer_layers = 0  # layers run on integer codes in the last call
        # per sample of the last call: activations on a rounding tie (``TIE_WINDOW``)
        self.tied_activations = torch.zeros(0, dtype=torch.long)

    def _run(self, example_input, stats: dict | None):
        args = example_args(example_input)
        flat = torch.utils._pytree.tree_leaves(args)
        batch = flat[0].shape[0] if flat and flat[0].dim() > 0 else 1
        interpreter = _Interpreter(self.graph_module, stats, batch, self.integer)
        with torch.no_grad():
            outputs = interpreter.run(*flat)
        spec = getattr(self.graph_module, "_out_spec", None)
        if spec is not None:
            leaves = [outputs] if isinstance(outputs, Tensor) else list(outputs)
            outputs = torch.utils._pytree.tree_unflatten(leaves, spec)
        self.integer_layers = interpreter.integer_layers
        self.tied_activations = interpreter.tied
        return outputs

    def forward(self, example_input) -> Tensor:
        return first_tensor(self._run(example_input, None))

    def max_accumulator(self, example_input) -> dict[str, float]:
        """Largest ``|acc|`` per integer layer on ``example_input`` (int32 holds < 2^31)."""
        stats: dict[str, float] = {}
        self._run(example_input, stats)
        return stats
