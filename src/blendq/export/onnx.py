"""ONNX export: the captured program (:mod:`blendq.export.capture`) through PyTorch's
own ONNX exporter (``torch.onnx.export(..., dynamo=True)``).

The quantize/dequantize operators become QuantizeLinear/DequantizeLinear around the
float Conv/Gemm/MatMul; ONNX Runtime's optimiser fuses the patterns it knows into int8
kernels (QLinearConv, QGemm, MatMulInteger). One clean-up helps it: a QuantizeLinear
moves back across max pooling and, on an unsigned grid, ReLU (both commute with it), so
it sits right after the convolution, the pattern ONNX Runtime fuses.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import numbers
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .capture import ExportError, capture, example_args

__all__ = ["export_onnx", "to_onnx", "onnx_session", "run_onnx", "fused_ops", "int8_weights",
           "WEIGHT_STORAGE"]


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ExportError(f"ONNX export needs the '{module}' package: pip install "
                          "'blendq[export]'") from err


WEIGHT_STORAGE = ("int8", "int4")
INT8_BLOCKS = ("blendq", "Int8Blocks")  # domain and type of the placeholder node
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def to_onnx(program: torch.export.ExportedProgram, example_input, weights: str = "int8",
            accuracy_level: int | None = 0):
    """An ``onnx.ModelProto`` of a captured program (checked with ``full_check``);
    ``weights="int4"`` stores codes of 4 bits or fewer as ONNX INT4 (see
    :func:`export_onnx`); ``accuracy_level``: of the ``MatMulNBits`` nodes written for
    block-quantized matmuls of 4 bits or fewer (``None``: none written)."""
    if weights not in WEIGHT_STORAGE:
        raise ExportError(f"weights must be one of {WEIGHT_STORAGE}, got {weights!r}")
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or not isinstance(
            accuracy_level, numbers.Integral) or accuracy_level not in ACCURACY_LEVELS):
        raise ExportError(f"accuracy_level must be one of {ACCURACY_LEVELS} (0: float32 "
                          f"activations, as trained; 4: int8), got {accuracy_level!r}")
    onnx = _require("onnx")
    _require("onnxscript")
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            exported = torch.onnx.export(program, example_args(example_input), dynamo=True,
                                         external_data=False, optimize=True, verbose=False,
                                         **_block_options(program))
    except Exception as err:
        raise ExportError(f"the ONNX exporter (torch.onnx) cannot translate the captured "
                          f"model: {_reason(err)}") from err
    finally:
        logger.setLevel(level)
    model = exported.model_proto
    _unshare_producers(model)
    _hoist_quantize(model)
    _matmul_integer(model, int4=weights == "int4")
    if accuracy_level is not None:
        _matmul_nbits(model, accuracy_level)
    _int8_blocks(model)
    if weights == "int4":
        _int4_weights(model)
    model.producer_name = "blendq"
    onnx.checker.check_model(model, full_check=True)
    return model


def _block_options(program: torch.export.ExportedProgram) -> dict:
    """Exporter options for block-quantized weights (``blendq::dequantize_blocks``):
    written as ``DequantizeLinear`` with ``block_size``, which needs opset 21."""
    op = torch.ops.blendq.dequantize_blocks.default
    rounding = torch.ops.blendq.int8_blocks.default
    if not any(n.target in (op, rounding) for n in program.graph.nodes):
        return {}
    from onnxscript import opset21
    from onnxscript.values import Opset

    blendq_ops = Opset(INT8_BLOCKS[0], 1)
    _register_int8_blocks()

    def dequantize_blocks(codes, scale, block_size: int, axis: int):
        return opset21.DequantizeLinear(codes, scale, axis=axis, block_size=block_size)

    def int8_blocks(x, block: int):  # a placeholder node that _int8_blocks resolves
        return blendq_ops.Int8Blocks(x, block=block, k=x.shape[-1])

    return {"opset_version": 21,
            "custom_translation_table": {op: dequantize_blocks, rounding: int8_blocks}}


def _register_int8_blocks() -> None:
    """An ONNX schema for the placeholder, so the exporter's checks accept it until
    :func:`_int8_blocks` replaces it (process-wide, once)."""
    from onnx import defs

    if defs.has(INT8_BLOCKS[1], INT8_BLOCKS[0]):
        return
    schema = defs.OpSchema
    defs.register_schema(schema(
        INT8_BLOCKS[1], INT8_BLOCKS[0], 1,
        inputs=[schema.FormalParameter("x", "T")], outputs=[schema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "float")],
        attributes=[schema.Attribute("block", schema.AttrType.INT, "block size"),
                    schema.Attribute("k", schema.AttrType.INT, "last dimension")]))


def _int8_blocks(model) -> int:
    """Resolve each ``blendq.Int8Blocks`` placeholder (:func:`blendq.functional.int8_blocks`
    of a layer trained with ``int8_block_inputs``): where only ``MatMulNBits`` nodes of
    its block size read it, that kernel's own input rounding at accuracy level 4 is the
    same computation, so the node goes and they run at level 4; elsewhere it is written
    out in standard operators. Returns the number handed to the kernel."""
    graph = model.graph
    readers = _readers(graph)
    consts = {t.name: t for t in graph.initializer}
    handed = 0
    for node in [n for n in graph.node if (n.domain, n.op_type) == INT8_BLOCKS]:
        block, k = _attr(node, "block"), _attr(node, "k")
        kernels = _kernels_reading(
            node.output[0], k, readers, consts, {o.name for o in graph.output},
            lambda user, _, block=block: user.op_type == "MatMulNBits" and
            _attr(user, "block_size") == block)
        if kernels is not None:
            for user in readers[node.output[0]]:  # MatMulNBits, or a Reshape before it
                user.input[0] = node.input[0]
            for kernel in kernels:
                for a in kernel.attribute:
                    if a.name == "accuracy_level":
                        a.i = 4
            graph.node.remove(node)
            handed += 1
        else:
            at = list(graph.node).index(node)
            graph.node.remove(node)
            for i, new in enumerate(_int8_blocks_nodes(graph, node, block, k)):
                graph.node.insert(at + i, new)
    for opset in [o for o in model.opset_import if o.domain == INT8_BLOCKS[0]]:
        model.opset_import.remove(opset)
    return handed


def _kernels_reading(value: str, k: int, readers, consts, outputs: set[str],
                     takes) -> list | None:
    """The nodes that read ``value`` directly or through a ``Reshape`` keeping the last
    dimension ``k`` (rows flattened for a 2-D matmul) and that ``takes(node, value)``
    accepts, where those are all its readers; else ``None``."""
    from onnx import numpy_helper

    kernels = []
    if value in outputs:
        return None
    for user in readers.get(value, []):
        if user.op_type == "Reshape" and user.input[0] == value and user.input[1] in consts:
            shape = numpy_helper.to_array(consts[user.input[1]])
            if shape.size == 0 or int(shape[-1]) != k:
                return None
            found = _kernels_reading(user.output[0], k, readers, consts, outputs, takes)
            if found is None:
                return None
            kernels += found
        elif user.input[0] == value and takes(user, value):
            kernels.append(user)
        else:
            return None
    return kernels or None


def _matmul_integer(model, int4: bool = False) -> int:
    """Write the matmuls of layers trained with ``int8_matmul`` as integer matrix
    products: each ``blendq.Int8Blocks`` placeholder whose block is its whole row
    (:func:`blendq.functional.int8_rows`) goes, and each matmul reading it (directly or
    through a ``Reshape`` keeping rows) whose weight is a constant per-channel
    ``DequantizeLinear`` of int8 codes becomes: the row rounding in standard operators
    (codes stored as uint8 with zero point 128, the row's scale ``max|x|/127``),
    ``MatMulInteger`` of those codes and the int8 weight (exact int32 sums), then the
    row's scale, the channel's scale and the bias in float32. The weights are within
    -64..64, so x86's u8·s8 pair sums (AVX2 without VNNI) never saturate. A placeholder
    read otherwise is left to :func:`_int8_blocks` (standard operators, float matmul).
    ``int4``: each weight is stored as INT4 codes and an int8 multiple per 16 inputs
    (:func:`_int4_multiples`), multiplied out by constant operators that a runtime folds
    into the int8 weight when it loads the file. Returns the number of matmuls written."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    written, dead = 0, []

    patterns = {}  # matmul output -> its weight pattern, read once (codes can be large)

    def per_channel(user, _) -> bool:
        if user.op_type not in ("MatMul", "Gemm"):
            return False
        found = _nbits_pattern(user, producer, readers, inits)
        patterns[user.output[0]] = found
        return found is not None and not _attr(found[0], "block_size", 0)

    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.value_info, *graph.input, *graph.output]}
    shared = {}  # a rounded input: (uint8 codes, row scale), for every matmul reading it
    constants = {}

    def const(name: str, value) -> str:
        if name not in constants:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            constants[name] = name
        return name

    for node in [n for n in graph.node if (n.domain, n.op_type) == INT8_BLOCKS]:
        k = _attr(node, "k")
        if _attr(node, "block") < k:
            continue
        matmuls = _kernels_reading(node.output[0], k, readers, inits, outputs, per_channel)
        if matmuls is None:
            continue
        for user in readers[node.output[0]]:
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = node.input[0]
        dead.append(node)
        for mm in matmuls:
            dq, chain, codes, scale, _ = patterns[mm.output[0]]
            x, base = mm.input[0], f"{mm.output[0]}.int"
            new = []
            if x not in shared:
                r = f"{x}.rows"
                n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{r}.{out}"], **kw)  # noqa: E731,B023
                xf = x
                if types.get(x, TensorProto.FLOAT) != TensorProto.FLOAT:  # rounded in float32
                    new.append(n("Cast", [x], "f", to=TensorProto.FLOAT))
                    xf = f"{r}.f"
                axes = const("blendq.rows.axes", np.array([-1], np.int64))
                new += [
                    # a row holding NaN or inf is NaN, as in PyTorch
                    *_guarded_peak(n, xf, r, axes, const("blendq.rows.zero", np.float32(0))),
                    n("Greater", [f"{r}.peak", const("blendq.rows.tiny", np.float32(127) /
                                                     np.float32(np.finfo(np.float32).max))],
                      "nz"),
                    n("Div", [const("blendq.rows.q", np.float32(127)), f"{r}.peak"], "inv0"),
                    n("Where", [f"{r}.nz", f"{r}.inv0", "blendq.rows.zero"], "inv"),
                    n("Mul", [xf, f"{r}.inv"], "scaled"),
                    # round half to even, clamp to -128..127, + 128 as uint8: one operator
                    n("QuantizeLinear", [f"{r}.scaled", const("blendq.rows.one", np.float32(1)),
                                         const("blendq.rows.zero_point", np.uint8(128))],
                      "u8"),
                    n("Div", [f"{r}.peak", "blendq.rows.q"], "step")]
                shared[x] = (f"{r}.u8", f"{r}.step")
            u8, step = shared[x]
            weight, unit = f"{base}.weight", f"{base}.unit"
            graph.initializer.append(numpy_helper.from_array(scale[0].astype(np.float32), unit))
            folded = _int4_multiples(graph, codes.astype(np.int8), weight, const) if int4 \
                else None
            if folded is None:
                graph.initializer.append(numpy_helper.from_array(codes.astype(np.int8), weight))
            else:
                new += folded
            bias = mm.input[2] if mm.op_type == "Gemm" and len(mm.input) > 2 else ""
            out = mm.output[0]
            cast_back = types.get(x, TensorProto.FLOAT) != TensorProto.FLOAT
            last = f"{base}.y" if bias or cast_back else out
            new += [
                helper.make_node("MatMulInteger", [u8, weight, "blendq.rows.zero_point"],
                                 [f"{base}.acc"]),
                helper.make_node("Cast", [f"{base}.acc"], [f"{base}.f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{base}.f", step], [f"{base}.rows"]),
                helper.make_node("Mul", [f"{base}.rows", unit], [last])]
            if cast_back:  # the matmul's own type (a bias is in it)
                cast = f"{base}.typed" if bias else out
                new.append(helper.make_node("CastLike", [last, x], [cast]))
                last = cast
            if bias:
                new.append(helper.make_node("Add", [last, bias], [out]))
            at = list(graph.node).index(mm)
            for i, added in enumerate(new):
                graph.node.insert(at + i, added)
            dead += [mm, *chain]
            written += 1
    if dead:
        _drop(graph, dead)
        _topological_sort(graph)  # a shared rounding may sit after a later reader
        if int4:
            _opset_21(model)
    return written


def _opset_21(model) -> None:
    """Raise the default domain's opset to 21, where INT4 tensors are read."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21


def _drop(graph, dead: list) -> None:
    """Remove ``dead`` nodes, the nodes whose outputs nothing reads any more, and the
    initializers no node reads; shapes inferred before are stale (``value_info``
    cleared)."""
    for node in dead:
        graph.node.remove(node)
    outputs = {o.name for o in graph.output}
    while True:  # and what only they read (a zero point left as a Cast)
        read = {i for n in graph.node for i in n.input} | outputs
        unread = [n for n in graph.node if not any(o in read for o in n.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    del graph.value_info[:]


INT4_RUN = 16  # inputs that share a multiple in INT4 storage: divides every block size


def _int4_multiples(graph, weight, name: str, const) -> list | None:
    """Nodes computing the int8 weight ``name`` ``[K, N]`` of an ``int8_matmul`` layer from
    INT4 codes and one int8 multiple per run of 16 inputs of a column (each block of the
    trained weight is whole runs: its multiple divides them all, so their greatest common
    divisor leaves codes in -8..7), all constant: a runtime folds them into the weight at
    load (ONNX Runtime does, at its default optimisation level). ``None`` where ``K`` is no
    whole number of runs or a run has no such divisor (then the weight is stored int8)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    if k % INT4_RUN:
        return None
    runs = weight.reshape(k // INT4_RUN, INT4_RUN, n).astype(np.int16)
    # a run's greatest common divisor: its block's multiple divides it, so the quotients
    # are no larger than the block's codes (an all-zero run: multiple 1)
    multiple = np.gcd.reduce(runs, axis=1, keepdims=True)
    multiple[multiple == 0] = 1
    codes = runs // multiple
    if codes.min() < -8 or codes.max() > 7 or not (codes * multiple == runs).all():
        return None
    graph.initializer.extend([
        _int4_tensor(f"{name}.codes", codes.reshape(k, n).astype(np.int8)),
        numpy_helper.from_array(multiple.astype(np.int8), f"{name}.multiple")])
    n_ = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], **kw)  # noqa: E731
    nodes = [n_("Cast", [f"{name}.codes"], f"{name}.c32", to=TensorProto.INT32),
             n_("Reshape", [f"{name}.c32", const(f"{name}.runs", np.array(
                 [k // INT4_RUN, INT4_RUN, n], np.int64))], f"{name}.c3"),
             n_("Cast", [f"{name}.multiple"], f"{name}.m32", to=TensorProto.INT32),
             n_("Mul", [f"{name}.c3", f"{name}.m32"], f"{name}.w3"),
             n_("Reshape", [f"{name}.w3", const(f"{name}.shape", np.array([k, n], np.int64))],
                f"{name}.w32"),
             n_("Cast", [f"{name}.w32"], name, to=TensorProto.INT8)]
    return nodes


def _guarded_peak(n, x: str, prefix: str, axes: str, zero: str) -> list:
    """Nodes for ``max|x|`` along ``axes`` (kept) as ``{prefix}.peak``, NaN where the slice
    holds NaN or inf, as in PyTorch: ONNX Runtime's ``ReduceMax`` passes NaN by, so the
    slice's sum times 0 is added (a slice whose sum overflows float32 is NaN too).
    ``n(op, inputs, out)`` names its output ``{prefix}.{out}``."""
    return [n("Abs", [x], "abs"),
            n("ReduceMax", [f"{prefix}.abs", axes], "peak0", keepdims=1),
            n("ReduceSum", [x, axes], "sum", keepdims=1),
            n("Mul", [f"{prefix}.sum", zero], "nan"),
            n("Add", [f"{prefix}.peak0", f"{prefix}.nan"], "peak")]


def _int8_blocks_nodes(graph, node, block: int, k: int) -> list:
    """:func:`blendq.functional.int8_blocks` in standard ONNX operators (float32); a block
    holding NaN or inf comes out NaN, as in PyTorch."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    blocks = -(-k // block)
    name = node.output[0]

    def const(suffix: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value),
                                                         f"{name}.c_{suffix}"))
        return f"{name}.c_{suffix}"

    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{name}.{out}"], **kw)  # noqa: E731
    nodes = [n("Shape", [node.input[0]], "shape"),
             n("Cast", [node.input[0]], "f", to=TensorProto.FLOAT),
             n("Reshape", [f"{name}.f", const("rows", np.array([-1, k], np.int64))], "rows"),
             n("Pad", [f"{name}.rows", const("pads", np.array([0, 0, 0, blocks * block - k],
                                                                np.int64))], "padded"),
             n("Reshape", [f"{name}.padded", const("blocks", np.array([-1, blocks, block],
                                                                      np.int64))], "b"),
             *_guarded_peak(n, f"{name}.b", name, const("axes", np.array([-1], np.int64)),
                            const("zero", np.float32(0))),
             n("Greater", [f"{name}.peak", const("tiny", np.float32(127) / np.float32(
                 np.finfo(np.float32).max))], "nz"),
             n("Mul", [f"{name}.peak", f"{name}.c_zero"], "zeros"),
             n("Div", [const("q", np.float32(127)), f"{name}.peak"], "inv0"),
             n("Where", [f"{name}.nz", f"{name}.inv0", f"{name}.zeros"], "inv"),
             n("Mul", [f"{name}.b", f"{name}.inv"], "scaled"),
             n("Round", [f"{name}.scaled"], "round"),
             n("Clip", [f"{name}.round", const("lo", np.float32(-128)),
                        const("hi", np.float32(127))], "codes"),
             n("Div", [f"{name}.peak", f"{name}.c_q"], "step"),
             n("Mul", [f"{name}.codes", f"{name}.step"], "value"),
             n("Reshape", [f"{name}.value", const("flat", np.array([-1, blocks * block],
                                                                   np.int64))], "flat"),
             n("Slice", [f"{name}.flat", const("start", np.array([0], np.int64)),
                         const("end", np.array([k], np.int64)),
                         const("axis", np.array([1], np.int64))], "kept"),
             n("Reshape", [f"{name}.kept", f"{name}.shape"], "back")]
    nodes.append(helper.make_node("CastLike", [f"{name}.back", node.input[0]], [name]))
    return nodes


def _reason(err: Exception) -> str:
    """The informative line of a torch.onnx error (its 'Exception summary'), or its first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return re.sub(r"\x1b\[[0-9;]*m", "", after[0])
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _readers(graph) -> dict[str, list]:
    """The nodes reading each value of ``graph``."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


_INTEGER_OPS = ("Conv", "Add")  # what ONNX Runtime fuses with its quantizers (QLinearConv,
# QLinearAdd); a matmul is left alone: its weight read twice would not become MatMulNBits
_CLAMPS = ("Relu", "Clip")
_ON_CODES = _CLAMPS + ("MaxPool",)  # what may sit between a layer and its quantizer


def _unshare_producers(model) -> int:
    """Give each quantizer reading one integer layer's output its own copy of the layer.
    Where two quantizers of different scales read one output (a ResNet's stem, read by
    the first block's branch and its shortcut, each layer with its own input
    quantizer), ONNX Runtime cannot fuse the layer with either: it runs it in float32,
    rounded as its own float kernels sum, not as the layer was trained. A copy per
    quantizer (the layer, the clamps and max pooling after it) lets each fuse into an int8 kernel
    (``QLinearConv``, ``QLinearAdd``) that requantizes to its reader's scale, as the
    α = 1 model rounds it. Returns the number of copies."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    initializers = {t.name for t in graph.initializer}

    def dequantized(layer) -> bool:  # its operands dequantized codes (a bias may be float)
        return all(k == 2 and name in initializers or (
            name in producer and producer[name].op_type == "DequantizeLinear")
            for k, name in enumerate(layer.input) if name)

    def quantizes(node) -> bool:  # a QuantizeLinear, after clamps read by nothing else
        while node.op_type in _CLAMPS and node.output[0] not in outputs and \
                len(readers.get(node.output[0], [])) == 1:
            node = readers[node.output[0]][0]
        return node.op_type == "QuantizeLinear"

    copies = 0
    for layer in [n for n in graph.node if n.op_type in _INTEGER_OPS]:
        if not dequantized(layer):
            continue
        path, value = [layer], layer.output[0]
        while value not in outputs and len(readers.get(value, [])) == 1 and \
                readers[value][0].op_type in _ON_CODES and len(readers[value][0].output) == 1:
            path.append(readers[value][0])
            value = path[-1].output[0]
        shared = readers.get(value, [])
        if value in outputs or len(shared) < 2 or not all(quantizes(r) for r in shared):
            continue
        for k, reader in enumerate(shared[1:], 1):
            source = None
            for node in path:
                clone = copy.deepcopy(node)
                clone.name = f"{node.name or node.output[0]}.copy{k}"
                if source is not None:
                    clone.input[0] = source
                clone.output[0] = source = f"{node.output[0]}.copy{k}"
                graph.node.append(clone)
            reader.input[0] = source
            copies += 1
    if copies:
        _topological_sort(graph)
    return copies


def _hoist_quantize(model) -> int:
    """Move each QuantizeLinear back across the operations between it and the value they
    start from that commute with it, where every value on the way has one reader: max
    pooling, zero padding and a clamp to any constant bounds (they then work on the 8-bit
    codes: a 4-bit grid's clamp in uint8), and a Relu or Clip that the quantizer's own
    clamping makes redundant (a Relu before an unsigned grid with zero point 0; ReLU6
    where the grid ends below 6). ``V -> Relu -> Pad -> Q -> DQ`` becomes
    ``V -> Q -> Pad' -> DQ``. The
    values are the same; the Q then sits right after the convolution, the pattern ONNX
    Runtime fuses into QLinearConv. Returns the number of moves."""
    from onnx import numpy_helper

    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                   for n in graph.node if n.op_type == "Constant" and n.attribute})
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    moves, dropped, unread = 0, [], []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        zp, scale = consts.get(q.input[2]), consts.get(q.input[1])
        if zp is None or scale is None or zp.size != 1 or scale.size != 1:
            continue
        chain, drop, value = [], [], q.input[0]
        while value in producer and value not in outputs and len(readers[value]) == 1:
            node = producer[value]
            how = _commutes(node, zp, float(scale), consts)
            if how is None:
                break
            (drop if how == "drop" else chain).append(node)
            value = node.input[0]
        if not chain and not drop:
            continue
        kept = list(reversed(chain))  # in graph order
        dropped += drop
        q.input[0] = value
        codes = q.output[0]
        if kept:  # the kept ops read the codes; the codes' readers read the last one
            last = kept[-1].output[0]
            for reader in readers.get(codes, []):
                reader.input[:] = [last if i == codes else i for i in reader.input]
            kept[0].input[0] = codes
            for a, b in zip(kept, kept[1:], strict=False):
                b.input[0] = a.output[0]
            for node in kept:
                unread += _to_codes(graph, node, zp, float(scale), consts)
        moves += 1
    if moves:  # types and shapes of moved values changed: let shape inference redo them
        del graph.value_info[:]
    for node in dropped:
        graph.node.remove(node)
        unread += list(node.input[1:])
    # constants only the moved or dropped clamps read (their float bounds), where nothing
    # else reads them (subgraphs included)
    read = _names_read(graph) | outputs | {i.name for i in graph.input}
    gone = set(unread) - read
    for init in [t for t in graph.initializer if t.name in gone]:
        graph.initializer.remove(init)
    _topological_sort(graph)
    return moves


def _names_read(graph) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs reads."""
    from onnx import AttributeProto

    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                names |= _names_read(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    names |= _names_read(g)
    return names


def _commutes(node, zp, scale: float, consts) -> str | None:
    """How ``node`` passes behind a quantizer of zero point ``zp`` and ``scale``:
    ``"keep"`` (max pooling; zero padding, filled with the zero point's code; a clamp,
    on the codes: they work on the codes), ``"drop"`` (a Relu before a grid whose
    lowest code is 0's, or a Clip whose bounds the quantizer's own range makes
    redundant), ``None`` (it does not commute: the move stops)."""
    import numpy as np

    if node.op_type == "MaxPool":
        return "keep" if len(node.output) == 1 else None
    if node.op_type == "Relu":  # where 0 is the codes' lowest, the quantizer's own clamp;
        # else (a signed grid stored in uint8, zero point 128) a clamp of the codes at it
        return "drop" if zp.item() <= np.iinfo(zp.dtype).min else "keep"
    if node.op_type == "Clip":
        bounds = _clip_codes(node, zp, scale, consts)
        if bounds is None:
            return None
        # bounds beyond the codes' range: the quantizer's own clamping; bounds within
        # it (a grid narrower than the codes' type, 4 bits in uint8, or ReLU6 below a
        # grid that ends above 6): the clamp moves behind the quantizer onto the
        # codes, which leaves the convolution before it followed by its QuantizeLinear
        # (what ONNX Runtime fuses); exact, as clamping and rounding are both monotone
        return "drop" if all(code is None for code in bounds.values()) else "keep"
    if node.op_type == "Pad":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        value = node.input[2] if len(node.input) > 2 else ""
        fill_zero = value == "" or (value in consts and not consts[value].any())
        axes = len(node.input) < 4 or node.input[3] == "" or node.input[3] in consts
        # (a fill of 0 is the zero point's code on any grid: signed ones pad with 128)
        ok = mode == b"constant" and node.input[1] in consts and fill_zero and axes
        return "keep" if ok else None
    return None


def _clip_codes(node, zp, scale: float, consts) -> dict[int, int | None] | None:
    """A Clip's bounds (input index -> code) as a quantizer of zero point ``zp`` and
    ``scale`` sees them: ``None`` for a bound its own clamping makes redundant (beyond
    the codes' range, or infinite that way); else the bound's code, ``round(bound /
    scale)`` (the clamp and the rounding commute: both are monotone); ``None`` for the
    whole where a bound is not a constant."""
    import math

    import numpy as np

    info, found = np.iinfo(zp.dtype), {}
    for k, toward in ((1, -1), (2, 1)):
        name = node.input[k] if len(node.input) > k else ""
        if not name:
            continue
        if name not in consts or consts[name].size != 1:
            return None
        value = float(consts[name])
        if math.isinf(value) and value * toward > 0:
            found[k] = None
            continue
        if not math.isfinite(value):
            return None
        # the bound's code as the runtime quantizes it (float32 division, half to even):
        # a value beyond the bound has a code beyond it too, rounding being monotone
        code = int(np.round(np.float32(value) / np.float32(scale))) + int(zp)
        found[k] = None if (k == 1 and code <= info.min) or (k == 2 and code >= info.max) \
            else min(max(code, info.min), info.max)  # (a bound past the other end: all of it)
    return found


def _to_codes(graph, node, zp, scale: float = 1.0, consts: dict | None = None) -> list:
    """A Pad now working on codes fills with the zero point, a Clip clamps to its bounds'
    codes (in the codes' type; a redundant bound left out). Returns the names of the
    constants it no longer reads."""
    import numpy as np
    from onnx import numpy_helper

    if node.op_type == "Relu":
        name = f"{node.name or node.output[0]}.bound1"
        graph.initializer.append(numpy_helper.from_array(zp.reshape(()).astype(zp.dtype), name))
        node.op_type = "Clip"
        node.input.append(name)
        return []
    if node.op_type == "Clip":
        replaced = []
        for k, code in _clip_codes(node, zp, scale, consts).items():
            replaced.append(node.input[k])
            name = "" if code is None else f"{node.name or node.output[0]}.bound{k}"
            if code is not None:
                graph.initializer.append(numpy_helper.from_array(
                    np.array(code, dtype=zp.dtype), name))
            node.input[k] = name
        while node.input and not node.input[-1]:
            node.input.pop()
        return replaced
    if node.op_type != "Pad":
        return []
    while len(node.input) < 3:
        node.input.append("")
    name = f"{node.name or node.output[0]}.fill"
    graph.initializer.append(numpy_helper.from_array(np.array(int(zp), dtype=zp.dtype), name))
    node.input[2] = name
    return []


def _matmul_nbits(model, accuracy_level: int) -> int:
    """Write each matmul whose weight is a constant ``DequantizeLinear`` that ONNX Runtime
    would fuse into ``MatMulNBits`` as that node itself, with the ``accuracy_level`` the
    file means: block-quantized weights (blocks along ``K``), and per-channel or per-layer
    weights of weight-only layers (float input; as ORT does, in blocks of 32 with the
    channel's scale repeated). Read by ``MatMul``, or by ``Gemm`` directly or through a
    ``Transpose``. Codes in -8..7 are packed two a byte as 4 bits, wider ones one a byte
    as 8 bits (stored ``code + 2^(bits-1)``, the kernel's default zero point); one float32
    scale a block; the bias folded in. ORT's own fusion of these patterns takes its
    session default, level 4, which rounds activations to int8 inside the kernel: a
    computation training did not see. Returns the number of nodes written."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    written, dead = 0, []
    for node in list(graph.node):
        found = _nbits_pattern(node, producer, readers, inits)
        if found is None:
            continue
        dq, chain, codes, scale, block = found  # codes [K, N], scale [blocks, N]
        bits = 4 if codes.min() >= -8 and codes.max() <= 7 else 8
        zero = 2 ** (bits - 1)
        k, n = codes.shape
        blocks = -(-k // block)
        padded = np.full((n, blocks * block), zero, np.uint8)  # the zero point: value 0
        padded[:, :k] = (codes + zero).T
        padded = padded.reshape(n, blocks, block)
        packed = padded[..., 0::2] | (padded[..., 1::2] << 4) if bits == 4 else padded
        base = dq.input[0]  # codes the exporter merged may serve two layers: names per node
        names = (f"{base}.nbits{written}", f"{base}.nbits{written}_scale")
        graph.initializer.extend([
            numpy_helper.from_array(packed.astype(np.uint8), names[0]),
            numpy_helper.from_array(scale.T.reshape(-1).astype(np.float32), names[1])])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        inputs = [node.input[0], *names] + (["", "", bias] if bias else [])
        fused = helper.make_node("MatMulNBits", inputs, list(node.output),
                                 name=f"{node.name or base}.nbits", domain="com.microsoft",
                                 K=k, N=n, bits=bits, block_size=block,
                                 accuracy_level=accuracy_level)
        graph.node.insert(list(graph.node).index(node), fused)
        dead += [node, *chain]
        written += 1
    if written:
        _drop(graph, dead)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return written


def _attr(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


NBITS_BLOCK = 32  # the block a per-channel weight is written in (ORT's own default)


def _constant(value: str, producer, inits):
    """The array of ``value`` where it is an initializer, a ``Constant`` node's tensor, or
    a ``Cast`` of either (the exporter leaves a large zero point cast, unfolded); else
    ``None``."""
    from onnx import helper, numpy_helper

    if value in inits:
        return numpy_helper.to_array(inits[value])
    node = producer.get(value)
    if node is None:
        return None
    if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "Cast":
        inner = _constant(node.input[0], producer, inits)
        return None if inner is None else \
            inner.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
    return None


def _nbits_pattern(node, producer, readers, inits):
    """``(DequantizeLinear, nodes to drop with it, codes [K, N], scales [blocks, N],
    block)`` where ``node`` is a matmul that ``MatMulNBits`` can replace, else ``None``."""
    import numpy as np
    from onnx import numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1
                                   or _attr(node, "beta", 1.0) != 1):
        return None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and \
            node.input[2] not in inits:
        return None
    value, chain = node.input[1], []
    flips = int(node.op_type == "Gemm" and bool(_attr(node, "transB", 0)))
    t = producer.get(value)
    if t is not None and t.op_type == "Transpose" and len(readers[value]) == 1:
        if list(_attr(t, "perm", [])) != [1, 0]:
            return None
        chain.append(t)
        value, flips = t.input[0], flips + 1
    dq = producer.get(value)
    if dq is None or dq.op_type != "DequantizeLinear" or len(readers[value]) != 1 or \
            dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    if len(dq.input) > 2 and dq.input[2]:
        zero = _constant(dq.input[2], producer, inits)
        if zero is None or zero.any():
            return None
    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int16)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    if codes.ndim != 2 or codes.min() < -128 or codes.max() > 127:
        return None
    out_axis = 0 if flips % 2 else 1  # the dimension of N in the dequantized weight
    codes = codes.T if flips % 2 else codes  # [K, N]
    k, n = codes.shape
    axis = _attr(dq, "axis", 1) % 2
    block = _attr(dq, "block_size", 0)
    if block:
        if axis == out_axis:
            return None  # blocks along N: not a MatMulNBits layout
        return dq, [*chain, dq], codes, (scale.T if flips % 2 else scale), block
    a = producer.get(node.input[0])
    if a is not None and a.op_type == "DequantizeLinear":
        return None  # quantized input: ORT's int8 kernels (QGemm, MatMulInteger) run it
    if scale.size == 1:
        per_n = np.full(n, float(scale.reshape(())), np.float32)
    elif scale.ndim == 1 and scale.size == n and axis == out_axis:
        per_n = scale
    else:
        return None
    blocks = -(-k // NBITS_BLOCK)
    return dq, [*chain, dq], codes, np.tile(per_n[None, :], (blocks, 1)), NBITS_BLOCK


def _int4_weights(model) -> int:
    """Store every int8 weight initializer whose codes fit 4 bits (layers of 4 bits or
    fewer: codes in -7..7) as ONNX INT4 (two codes a byte), with its zero point, and
    raise the opset to 21 (where DequantizeLinear reads INT4). Lossless. Returns the
    number of initializers converted."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    done = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        codes_init = inits[node.input[0]]
        if codes_init.data_type != TensorProto.INT8 or \
                any(r.op_type != "DequantizeLinear" for r in readers[node.input[0]]):
            continue
        codes = numpy_helper.to_array(codes_init)
        zero_name = node.input[2] if len(node.input) > 2 else ""
        zero = numpy_helper.to_array(inits[zero_name]) if zero_name in inits else None
        if codes.min() < -8 or codes.max() > 7 or (zero is not None and zero.any()):
            continue
        codes_init.CopyFrom(_int4_tensor(codes_init.name, codes))
        if zero is not None and inits[zero_name].data_type == TensorProto.INT8:
            inits[zero_name].CopyFrom(_int4_tensor(zero_name, zero))
        done += 1
    if done:
        _opset_21(model)
        del graph.value_info[:]
    return done


def int8_weights(model) -> int:
    """Expand the INT4 weight initializers of an ONNX model (and their zero points) to
    INT8, in place: the same values, in the type the runtimes' int8 kernels read (block
    -quantized ones stay: runtimes dequantize those from INT4). Returns the number
    expanded."""
    from onnx import TensorProto, numpy_helper

    blocked = {n.input[0] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and _attr(n, "block_size")}
    done = 0
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.INT4 and tensor.name not in blocked:
            tensor.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype("int8"), tensor.name))
            done += 1
    return done


def _int4_tensor(name: str, codes) -> object:
    """``codes`` (int8 in -8..7) as an ONNX INT4 tensor: two a byte, the first element
    in the low four bits."""
    import numpy as np
    from onnx import TensorProto, helper

    flat = codes.astype(np.int16).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ExportError("internal error: the ONNX graph has a cycle after clean-up")
        for node in ready:
            ordered.append(node)
            known.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def export_onnx(converted_model: nn.Module, path: str | os.PathLike, example_input,
                program: torch.export.ExportedProgram | None = None,
                dynamic_batch: bool = True, weights: str = "int8",
                accuracy_level: int | None = 0, dynamic_shapes=None) -> Path:
    """Export a converted model (``blendq.convert``) to an ONNX file at ``path``.

    ``example_input`` is a tensor (or a tuple of the forward's positional tensors) the model
    runs on; its batch size stays dynamic where the model allows it, unless
    ``dynamic_batch=False`` fixes it to ``example_input``'s (ONNX Runtime plans memory ahead
    for fixed shapes: measured 3-10 ms faster per call on ResNet-50 at batch 1,
    docs/performance.md). ``dynamic_shapes`` (``torch.export``'s form) names the dynamic
    dimensions instead: a language model's sequence length, so that one file serves one
    token and a prompt (:func:`blendq.export.capture.capture`). ``weights="int4"`` stores
    the codes of layers of 4 bits or fewer as ONNX INT4 (opset 21; a W4A8 ResNet-50 file is
    0.52x the W8A8 one), but ONNX Runtime 1.32 and OpenVINO 2026.4 run no int8 kernel from
    INT4 weights (ResNet-50: 6x and 1.9x slower); :func:`onnx_session` expands them to int8
    in memory, lossless, so the int8 kernels run from the small file. Block-quantized
    (``QuantPolicy(group_size=...)``) matmul weights of 4 bits or fewer (Linear, ``Conv1D``,
    attention projections) are written as ONNX Runtime's ``MatMulNBits`` (4-bit codes, one
    scale a block) with ``accuracy_level`` (0, the default: float32 activations, what
    training computed; 4: int8 activations inside the kernel, faster, not what was trained,
    unless the model was trained with ``QuantPolicy(int8_block_inputs=True)``: such layers
    are written at level 4 whatever ``accuracy_level`` says, their input rounding being the
    kernel's own; docs/int4.md; ``None``: standard ONNX only, for other runtimes); other
    block-quantized weights as ``DequantizeLinear`` with ``block_size`` (opset 21). Any
    model that ``torch.export`` can capture exports. The file passes ``onnx.checker`` with
    ``full_check`` and runs in ONNX Runtime.

    Raises:
        ExportError: the model is not converted, cannot be captured or translated
            (the reason is in the message), or ``onnx``/``onnxscript`` is missing.
    """
    onnx = _require("onnx")
    if program is None:
        program = capture(converted_model, example_input, dynamic_batch=dynamic_batch,
                          dynamic_shapes=dynamic_shapes)
    model = to_onnx(program, example_input, weights, accuracy_level)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_session(path: str | os.PathLike, optimize: bool = True,
                 optimized_path: str | os.PathLike | None = None):
    """An ONNX Runtime CPU session. ``optimize`` (the default) lets ORT fuse the QDQ
    pattern into int8 kernels (QLinearConv); ``False`` runs the QDQ graph as written
    (float operations on dequantized values: the exact QDQ semantics, slower).
    ``optimized_path``: where ORT writes the graph it runs (to check what it fused).
    A file with INT4 weights (``export_onnx(weights="int4")``) is expanded to int8 in
    memory first (:func:`int8_weights`), so ORT's int8 kernels run."""
    ort = _require("onnxruntime")
    onnx = _require("onnx")
    if not Path(path).is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError names no file
        raise ExportError(f"{path} is not a readable ONNX model (damaged or truncated?): "
                          f"{type(err).__name__}: {err}") from err
    source = str(path)
    if int8_weights(model):
        source = model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(session, example_input) -> Tensor:
    """The first output of ``session`` on ``example_input`` (a tensor or tuple)."""
    args = example_args(example_input)
    feeds = {i.name: a.numpy() if not a.is_floating_point() else a.float().numpy()
             for i, a in zip(session.get_inputs(), args, strict=False)}
    return torch.from_numpy(session.run(None, feeds)[0])


def fused_ops(session_or_path) -> dict[str, int]:
    """Operator counts of an ONNX file (e.g. the optimised graph ORT wrote)."""
    onnx = _require("onnx")
    counts: dict[str, int] = {}
    for node in onnx.load(str(session_or_path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
