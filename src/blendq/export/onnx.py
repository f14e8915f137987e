"""ONNX export: the captured program (:mod:`blendq.export.capture`) through PyTorch's
own ONNX exporter (``torch.onnx.export(..., dynamo=True)``).

The quantize/dequantize operators become QuantizeLinear/DequantizeLinear around the
float Conv/Gemm/MatMul; ONNX Runtime's optimiser fuses the patterns it knows into int8
kernels (QLinearConv, QGemm, MatMulInteger). One clean-up helps it: a ReLU whose only
consumer quantizes onto an unsigned grid (zero point 0) is dropped, since the
quantizer's clamp at 0 does its work; that puts the QuantizeLinear right after the
convolution, the pattern ONNX Runtime fuses.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .capture import ExportError, capture, example_args

__all__ = ["export_onnx", "to_onnx", "onnx_session", "run_onnx", "fused_ops"]


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ExportError(f"ONNX export needs the '{module}' package: pip install "
                          "'blendq[export]'") from err


def to_onnx(program: torch.export.ExportedProgram, example_input):
    """An ``onnx.ModelProto`` of a captured program (checked with ``full_check``)."""
    onnx = _require("onnx")
    _require("onnxscript")
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            exported = torch.onnx.export(program, example_args(example_input), dynamo=True,
                                         external_data=False, optimize=True, verbose=False)
    except Exception as err:
        raise ExportError(f"the ONNX exporter cannot translate the model: "
                          f"{type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
    finally:
        logger.setLevel(level)
    model = exported.model_proto
    _drop_relu_before_unsigned_quantize(model)
    model.producer_name = "blendq"
    onnx.checker.check_model(model, full_check=True)
    return model


def _drop_relu_before_unsigned_quantize(model) -> int:
    """``Relu -> QuantizeLinear(uint8, zero point 0)`` with the Relu's output read only
    there: the Relu is redundant (the quantizer clamps at 0); rewire and drop it."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped = []
    for relu in graph.node:
        if relu.op_type != "Relu" or relu.output[0] in outputs:
            continue
        users = readers.get(relu.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(users[0].input) < 3:
            continue
        zp_name = users[0].input[2]
        if zp_name in inits:
            zp = numpy_helper.to_array(inits[zp_name])
        elif zp_name in consts:
            zp = numpy_helper.to_array(consts[zp_name].attribute[0].t)
        else:
            continue
        if str(zp.dtype) != "uint8" or zp.any():
            continue
        users[0].input[0] = relu.input[0]
        dropped.append(relu)
    for relu in dropped:
        graph.node.remove(relu)
    return len(dropped)


def export_onnx(converted_model: nn.Module, path: str | os.PathLike, example_input,
                program: torch.export.ExportedProgram | None = None) -> Path:
    """Export a converted model (``blendq.convert``) to an ONNX file at ``path``.

    ``example_input`` is a tensor (or a tuple of the forward's positional tensors) the
    model runs on; its batch size stays dynamic where the model allows it. Any model
    that ``torch.export`` can capture exports. The file passes ``onnx.checker`` with
    ``full_check`` and runs in ONNX Runtime.

    Raises:
        ExportError: the model is not converted, cannot be captured or translated
            (the reason is in the message), or ``onnx``/``onnxscript`` is missing.
    """
    onnx = _require("onnx")
    program = capture(converted_model, example_input) if program is None else program
    model = to_onnx(program, example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_session(path: str | os.PathLike, optimize: bool = True,
                 optimized_path: str | os.PathLike | None = None):
    """An ONNX Runtime CPU session. ``optimize`` (the default) lets ORT fuse the QDQ
    pattern into int8 kernels (QLinearConv); ``False`` runs the QDQ graph as written
    (float operations on dequantized values: the exact QDQ semantics, slower).
    ``optimized_path``: where ORT writes the graph it runs (to check what it fused)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
