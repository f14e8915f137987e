"""Deployment: capture with torch.export, ONNX, integer reference engine, artifact,
verification."""

from .artifact import load_artifact, save_artifact
from .capture import ExportError, capture, deployable
from .onnx import export_onnx, fused_ops, onnx_session, run_onnx, to_onnx
from .reference import IntegerEngine, first_tensor

__all__ = ["ExportError", "IntegerEngine", "capture", "deployable", "export_onnx",
           "first_tensor", "fused_ops", "load_artifact", "onnx_session", "run_onnx",
           "save_artifact", "to_onnx"]
