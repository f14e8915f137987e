"""Capture a converted model as a ``torch.export`` program of standard operators.

:func:`deployable` copies a converted model and puts each quantized layer into its
deploy form (:class:`blendq.converted.Deploy`): the weight is a
``quantized_decomposed.dequantize_per_channel`` of int8 codes, the input a
quantize/dequantize pair on the layer's grid, the bias int32 accumulator units behind
a dequantize where the layer adds it to an integer accumulator. A batch norm linked to
the layer before it (``blendq.transform.link_batch_norms``) is folded into that layer:
one scale ``|k|·γ_w`` per output channel, the sign of ``k`` moved into the codes, and
the bias ``k·b + t`` in whole units of ``|k|·γ_w·γ_a``, rounded by the same
:func:`blendq.functional.round_bias` that evaluation uses. The quantization sits where
the layer consumes its input, so every other consumer of the same value (a residual
branch, a second head) reads the float value, as in the eager model.

:func:`capture` runs ``torch.export`` on that copy: the one graph that the ONNX
exporter, the integer reference engine and the artifact all start from.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ..converted import Deploy, QuantMixin, QuantSite, block_storage
from ..functional import int8_multiples, int8_weight_of_blocks, pack_codes, round_bias
from ..layers import BlendMixin, bias_units, deploy_fold, link_holds, linked_producer

__all__ = ["ExportError", "capture", "deployable", "example_args"]


class ExportError(ValueError):
    """The model cannot be exported (not converted, or not capturable by torch.export)."""


def _check_converted(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a converted torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, BlendMixin) for m in model.modules()):
        raise ExportError("model holds blended layers: call blendq.convert(model) before export")
    if not any(isinstance(m, QuantMixin) for m in model.modules()):
        raise ExportError("model has no quantized layers: prepare, train and convert it first")


def _deploy_layer(layer: QuantMixin, bn: nn.Module | None, packed: bool, name: str) -> None:
    """Put ``layer`` (in a copy) into its deploy form, folding ``bn`` into it if given (a
    layer linked to a batch norm it is not folded with keeps its float bias, as in
    evaluation)."""
    kind = layer._kind
    codes = layer.weight_codes
    out_ch = codes.shape[kind.axis]
    group = layer.group_size
    scale = layer.weight_scale.double()  # (C_out, blocks) for block scales
    if group is None:
        scale = scale.reshape(-1).expand(out_ch)  # (C_out,)
    bias = layer._parameters.get("bias")
    bias = None if bias is None else bias.detach().double()
    if bn is not None:
        scale, bias, negative = deploy_fold(scale if group is None else scale.T, bias, bn)
        scale = scale if group is None else scale.T
        sign = torch.where(negative, -1, 1).to(torch.int16)
        view = [1] * codes.dim()
        view[kind.axis] = out_ch
        codes = (codes.to(torch.int16) * sign.reshape(view)).to(torch.int8)
    unit = layer.accumulator_unit()
    a_scale = float(layer.act_scale) if layer.a_bits is not None else 1.0
    integer = unit is not None and bias is not None and (bn is not None or not layer.bias_folded)
    bias_scale = None
    if integer:
        unit = scale * a_scale  # float64, |k|·γ_w·γ_a with the fold
        units = bias_units(bias, unit)
        if units is not None:
            bias, bias_scale = units.to(torch.int32), scale.float() * torch.tensor(
                a_scale, dtype=torch.float32)
        else:  # units too small for int32 (an input scale near 0): the rounded bias in float
            rounded = round_bias(bias, unit)
            warnings.warn(f"blendq: layer {name}: its bias needs more than int32 accumulator "
                          f"units (input scale {a_scale:.3g}); exported as a float bias, so "
                          "no int8 kernel runs this layer", stacklevel=4)
            integer, bias = False, rounded.float()
    elif bias is not None:
        bias = bias.float()
    w_bits = layer.w_bits
    if group is not None and layer.int8_matmul:  # int8 per channel: codes × multiples
        moved = codes.movedim(kind.axis, 0)
        try:
            weight, unit = int8_weight_of_blocks(moved.reshape(out_ch, -1), scale.float(),
                                                 int8_multiples(w_bits), group)
        except ValueError as err:
            raise ExportError(f"layer {name}: {err}") from None
        codes = weight.reshape(moved.shape).movedim(0, kind.axis)
        scale, group, w_bits = unit.double(), None, 8
    weight_shape = tuple(codes.shape)
    block_axis = 0
    if group is not None:  # the 2-D layout the runtime's 4-bit matmul reads
        codes, scale, block_axis = block_storage(codes, scale, kind.axis)
    shape = tuple(codes.shape)
    stored = pack_codes(codes, w_bits) if packed and w_bits <= 4 else codes.clone()
    deploy = Deploy(w_bits, layer.a_bits, layer.a_signed, a_scale, kind.axis, shape,
                    integer, packed and w_bits <= 4, group)
    deploy.block_axis, deploy.weight_shape = block_axis, weight_shape
    layer.set_deploy(deploy, stored, scale.float().clone(), bias, bias_scale)


def deployable(converted_model: nn.Module, packed: bool = False,
               proven: set[str] | None = None) -> nn.Module:
    """A copy of ``converted_model`` whose quantized layers compute with standard
    quantize/dequantize operators, batch norms linked to them folded in (see module
    docstring). ``packed``: codes of 4 bits or fewer are stored packed and unpacked in
    the graph (the artifact); ONNX takes int8 codes. ``proven``: names of batch norms
    whose candidate link (``link_batch_norms``) the captured graph confirmed; the other
    candidates stay batch norms that add evaluation's rounding as a constant."""
    _check_converted(converted_model)
    model = copy.deepcopy(converted_model).eval()
    proven = proven or set()
    folded: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules()):
        producer = linked_producer(m)
        if not isinstance(producer, QuantMixin):
            continue
        if m.link_proven or name in proven:
            folded[id(producer)] = m
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Identity())
        else:
            delta = m.rounding_delta()
            m.register_buffer("deploy_delta", None if delta is None else delta.float())
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            _deploy_layer(m, folded.get(id(m)), packed, name)
        elif isinstance(m, QuantSite):
            m.set_deploy()
    return model


_LAYER_OPS = ("conv1d", "conv2d", "conv3d", "linear", "conv_transpose", "convolution")


def proven_links(converted_model: nn.Module, args: tuple) -> set[str]:
    """Names of the candidate batch-norm links that a capture of ``converted_model``
    confirms: the layer's output is read by that batch norm alone."""
    candidates = {name: m for name, m in converted_model.named_modules()
                  if isinstance(linked_producer(m), QuantMixin) and not m.link_proven}
    if not candidates:
        return set()
    layer_names = {id(m): n for n, m in converted_model.named_modules()}
    try:
        graph = torch.export.export(converted_model.eval(), args, strict=False).graph
    except Exception:  # not capturable: capture() reports that on the deploy copy
        return set()
    by_module: dict[str, list] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            by_module.setdefault(list(stack.values())[-1][0], []).append(node)
    proven = set()
    for name, bn in candidates.items():
        layer_name = layer_names[id(bn.producer)]
        cores = [n for n in by_module.get(layer_name, [])
                 if any(op in str(n.target) for op in _LAYER_OPS)]
        norms = [n for n in by_module.get(name, []) if "batch_norm" in str(n.target)]
        if len(cores) == 1 and len(norms) == 1 and list(cores[0].users) == norms:
            val = cores[0].meta.get("val")
            if link_holds(bn.producer, None if val is None else val.dim()):
                proven.add(name)
    return proven


def example_args(example_input) -> tuple:
    """``example_input`` (a tensor, or a tuple of the forward's positional arguments) as
    the tuple ``torch.export`` takes."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise ExportError("example_input must be a tensor or a tuple of tensors, got "
                          f"{type(example_input).__name__}")
    return args


def _dynamic(size) -> bool:
    """Whether one dimension's entry of ``dynamic_shapes`` lets it vary: a ``Dim``,
    ``Dim.AUTO`` or ``Dim.DYNAMIC``; not ``None``, an int or ``Dim.STATIC``."""
    if size is None or isinstance(size, int):
        return False
    return getattr(getattr(size, "type", None), "name", None) != "STATIC"


def _doubled(arg: torch.Tensor, spec) -> torch.Tensor:
    """``arg`` repeated twice along each dimension of size 1 that ``spec`` (one input's
    entry of ``dynamic_shapes``: ``{dim: Dim}`` or a list with an entry a dimension)
    names dynamic."""
    if isinstance(spec, (list, tuple)):
        spec = dict(enumerate(spec))
    if isinstance(spec, dict) and isinstance(arg, torch.Tensor):
        for dim, size in spec.items():
            if isinstance(dim, int) and _dynamic(size) and arg.shape[dim] == 1:
                arg = torch.cat([arg, arg], dim)
    return arg


def _positional(model: nn.Module, dynamic_shapes, count: int):
    """``dynamic_shapes`` as one entry per positional input: as given when it is a
    tuple or list of them, looked up by the forward's parameter names when it is a dict
    keyed by name; ``None`` where neither."""
    if isinstance(dynamic_shapes, (tuple, list)) and len(dynamic_shapes) == count:
        return tuple(dynamic_shapes)
    if isinstance(dynamic_shapes, dict):
        import inspect

        names = list(inspect.signature(model.forward).parameters)[:count]
        return tuple(dynamic_shapes.get(name) for name in names)
    return None


def capture(converted_model: nn.Module, example_input, packed: bool = False,
            dynamic_batch: bool = True, dynamic_shapes=None) -> torch.export.ExportedProgram:
    """``torch.export`` of :func:`deployable` (``converted_model``) on ``example_input``,
    the batch dimension dynamic where the model allows it; ``dynamic_shapes``, in
    ``torch.export``'s own form (a tuple with one entry per positional input, ``{dim:
    Dim}``, a list with an entry a dimension, or ``None``; or a dict keyed by the
    forward's argument names), names the dynamic dimensions instead (a language model's
    sequence length: ``({0: Dim("batch"), 1: Dim("seq", max=1024)},)``; a dimension of
    size 1 in ``example_input`` that it names dynamic is traced doubled, since
    torch.export would fix it).

    Raises:
        ExportError: the model is not converted, or torch.export cannot capture it
            (the message carries torch.export's reason).
    """
    args = example_args(example_input)
    _check_converted(converted_model)
    half = {t.dtype for t in (*converted_model.parameters(), *converted_model.buffers(), *args)
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)}
    if half:
        raise ExportError(f"the model or example_input is in {', '.join(map(str, half))}: "
                          f"export computes in float32 (the deploy form's weights and scales "
                          f"are float32); call .float() on the converted model and pass a "
                          f"float32 example_input (its codes and scales convert exactly)")
    model = deployable(converted_model, packed, proven_links(converted_model, args))
    try:
        with torch.no_grad():
            model(*args)
    except Exception as err:
        raise ExportError(f"the model does not run on example_input: {type(err).__name__}: "
                          f"{err}") from err
    if dynamic_shapes is not None:
        # contiguous: a sliced example's strides would tie a dynamic size to a constant
        traced = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        specs = _positional(model, dynamic_shapes, len(args))
        if specs is not None:  # torch.export specialises a dimension of size 1: doubled
            traced = tuple(_doubled(a, spec) for a, spec in zip(traced, specs, strict=True))
        try:
            return torch.export.export(model, traced, dynamic_shapes=dynamic_shapes,
                                       strict=False)
        except Exception as err:  # torch's first line, and its explanation ("- ...")
            lines = [line.strip() for line in str(err).strip().splitlines()] or [""]
            why = " ".join([lines[0]] + [line for line in lines[1:] if line.startswith("- ")])
            raise ExportError(f"torch.export cannot capture the model with dynamic_shapes="
                              f"{dynamic_shapes!r}: {type(err).__name__}: {why}") from err
    errors = []
    for dynamic in ((True, False) if dynamic_batch else (False,)):
        shapes = None
        traced = args
        if dynamic:
            batch = torch.export.Dim("batch", min=1, max=4096)
            shapes = tuple({0: batch} if a.dim() > 0 else None for a in args)
            # torch.export specialises a dimension of size 1: trace a batch of two
            traced = tuple(_doubled(a, spec) for a, spec in zip(args, shapes, strict=True))
        try:
            return torch.export.export(model, traced, dynamic_shapes=shapes, strict=False)
        except Exception as err:  # the reason goes into the one ExportError below
            errors.append(f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")
    raise ExportError("torch.export cannot capture the model: " + "; ".join(errors))
