"""blendq: low-precision training with alpha-blending (Liu & Mattina, IJCAI 2019)."""

from .export import export_onnx
from .functional import Execution, binarize, blend, execution_policy, ppq, set_execution
from .policy import QuantPolicy
from .schedules import Schedule, constant, cubic, exponential, linear
from .transform import (
    AlphaController,
    alpha_view,
    calibrate,
    convert,
    format_summary,
    full_precision,
    merge_lora,
    prepare,
    quantized,
    set_alpha,
    size_bytes,
    summary,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaController",
    "Execution",
    "QuantPolicy",
    "Schedule",
    "alpha_view",
    "binarize",
    "blend",
    "calibrate",
    "constant",
    "convert",
    "cubic",
    "execution_policy",
    "exponential",
    "export_onnx",
    "format_summary",
    "full_precision",
    "linear",
    "merge_lora",
    "ppq",
    "prepare",
    "quantized",
    "set_alpha",
    "set_execution",
    "size_bytes",
    "summary",
]
