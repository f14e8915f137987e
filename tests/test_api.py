"""The public API is pinned, and the library layers import only from below."""

import ast
import pathlib

import blendq

PUBLIC = {
    "AlphaController",
    "QuantPolicy",
    "Schedule",
    "alpha_view",
    "binarize",
    "blend",
    "constant",
    "convert",
    "cubic",
    "exponential",
    "format_summary",
    "full_precision",
    "linear",
    "ppq",
    "prepare",
    "quantized",
    "set_alpha",
    "summary",
}

# Each part of the library may import only parts of a lower rank (docs/architecture.md).
RANK = {"functional": 0, "schedules": 1, "scales": 1.2, "methods": 1.5, "toy": 2,
        "quantizers": 2, "layers": 3, "converted": 4, "policy": 4, "placement": 4.5,
        "transform": 5, "distill": 5,
        "export": 6, "data": 6, "models": 6, "plots": 6, "engine": 9, "integrations": 9,
        "cli": 10, "__main__": 11}


def test_public_names_are_pinned():
    assert set(blendq.__all__) >= PUBLIC
    assert all(hasattr(blendq, name) for name in blendq.__all__)


def test_layers_import_only_from_below():
    src = pathlib.Path(blendq.__file__).parent
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts == ("__init__",):
            continue
        rank = RANK[parts[0]]
        depth = len(parts) - 1  # 0 for blendq/x.py, 1 for blendq/pkg/x.py
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            if node.level == depth + 1:  # relative to blendq/
                target = (node.module or "").split(".")[0]
            elif node.level == depth and depth:  # inside the same sub-package
                continue
            else:
                continue
            if target in RANK and target != parts[0]:
                assert RANK[target] < rank, f"{'/'.join(parts)} imports {target} from above"


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, blendq; heavy = {'onnx', 'onnxruntime', 'matplotlib', 'torchvision',"
        " 'sklearn'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
