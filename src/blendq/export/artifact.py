"""The blendq artifact: the captured program (:func:`blendq.export.capture`) saved with
``torch.export.save``, codes of 4 bits or fewer packed (two per byte, eight per byte
for 1-bit signs) and unpacked inside the graph.

The file needs no Python class of the model to load (``torch.export.load`` rebuilds
the graph from the file alone, without unpickling code) and runs in the integer
reference engine or as a module (``load_artifact(path).module()``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from .capture import ExportError, capture, example_args

__all__ = ["save_artifact", "load_artifact"]


def save_artifact(converted_model: nn.Module, path: str | os.PathLike, example_input) -> int:
    """Capture ``converted_model`` with packed codes and write it to ``path`` (``.pt2``);
    returns the file size in bytes."""
    args = example_args(example_input)
    program = capture(converted_model, tuple(a[:2] for a in args), packed=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path.stat().st_size


def load_artifact(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """The program in an artifact; a file that is not one is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"artifact {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path} is not a blendq artifact (not a torch.export archive)")
    try:
        return torch.export.load(str(path))
    except Exception as err:
        raise ExportError(f"{path} is not a readable blendq artifact "
                          f"({type(err).__name__}: {err})") from None
