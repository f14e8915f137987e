"""The blendq artifact: one safetensors file with packed integer weights, float64
per-channel rescales and a JSON description of the graph (in the file's metadata).

Packing: 1-bit codes eight per byte (bit set = +1), 4-bit (and 2-, 3-bit) codes
two per byte as ``code + 8`` nibbles, other widths one int8 per code. The
loader rebuilds the :class:`~blendq.export.ir.Graph` from the file alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .ir import ExportError, Graph, Node

__all__ = ["save_artifact", "load_artifact", "ARTIFACT_FORMAT", "pack_codes", "unpack_codes"]

ARTIFACT_FORMAT = "blendq-artifact-v1"


def pack_codes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, str]:
    """Integer codes -> ``(uint8/int8 tensor, packing name)``."""
    flat = codes.reshape(-1).to(torch.int16).numpy()
    if bits == 1:
        return torch.from_numpy(np.packbits(flat > 0)), "sign1"
    if bits <= 4:
        nibbles = (flat + 8).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        return torch.from_numpy((nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)), "nibble4"
    return codes.reshape(-1).to(torch.int8).clone(), "int8"


def unpack_codes(packed: torch.Tensor, packing: str, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape))
    data = packed.numpy()
    if packing == "sign1":
        flat = np.unpackbits(data)[:n].astype(np.int8) * 2 - 1
    elif packing == "nibble4":
        nib = np.empty(data.size * 2, dtype=np.int16)
        nib[0::2], nib[1::2] = data & 0x0F, data >> 4
        flat = (nib[:n] - 8).astype(np.int8)
    elif packing == "int8":
        flat = data.astype(np.int8)
    else:
        raise ExportError(f"unknown weight packing {packing!r} in artifact")
    return torch.from_numpy(flat.copy()).reshape(shape)


def save_artifact(graph: Graph, path: str | os.PathLike) -> int:
    """Write ``graph`` to ``path``; returns the file size in bytes."""
    from safetensors.torch import save_file

    tensors, nodes = {}, []
    for node in graph.nodes:
        entry = {"name": node.name, "op": node.op, "inputs": node.inputs, "attrs": node.attrs,
                 "tensors": {}}
        for key, value in node.tensors.items():
            if key == "codes":
                packed, packing = pack_codes(value, node.attrs["w_bits"])
                entry["codes"] = {"packing": packing, "shape": list(value.shape)}
                value = packed
            tensors[f"{node.name}.{key}"] = value.contiguous()
            entry["tensors"][key] = f"{node.name}.{key}"
        nodes.append(entry)
    meta = {"format": ARTIFACT_FORMAT,
            "graph": json.dumps({"nodes": nodes, "output": graph.output})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return Path(path).stat().st_size


def load_artifact(path: str | os.PathLike) -> Graph:
    """Rebuild the graph from an artifact; a file that is not one is a clear error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"artifact {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != ARTIFACT_FORMAT:
                raise ExportError(f"{path} is not a blendq artifact (no {ARTIFACT_FORMAT!r} "
                                  "metadata)")
            spec = json.loads(meta["graph"])
            nodes = []
            for entry in spec["nodes"]:
                tensors = {k: f.get_tensor(name) for k, name in entry["tensors"].items()}
                if "codes" in tensors:
                    c = entry["codes"]
                    tensors["codes"] = unpack_codes(tensors["codes"], c["packing"], c["shape"])
                nodes.append(Node(entry["name"], entry["op"], entry["inputs"], entry["attrs"],
                                  tensors))
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        if isinstance(err, ExportError):
            raise
        raise ExportError(f"{path} is not a readable blendq artifact ({err})") from None
    return Graph(nodes, spec["output"])
