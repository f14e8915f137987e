"""Deployment: graph of a converted model, integer engine, artifact, ONNX, verification."""

from .artifact import load_artifact, save_artifact
from .engine import IntegerEngine, run_graph
from .ir import ExportError, Graph, Node, to_graph
from .onnx_qdq import export_onnx, graph_to_onnx, onnx_session, run_onnx

__all__ = ["ExportError", "Graph", "IntegerEngine", "Node", "export_onnx", "graph_to_onnx",
           "load_artifact", "onnx_session", "run_graph", "run_onnx", "save_artifact", "to_graph"]
