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

# Each module may import only modules of a lower rank.
RANK = {
    "functional": 0,
    "schedules": 1,
    "toy": 2,
    "quantizers": 2,
    "layers": 3,
    "converted": 4,
    "policy": 4,
    "transform": 5,
}


def test_public_names_are_pinned():
    assert set(blendq.__all__) >= PUBLIC
    assert all(hasattr(blendq, name) for name in blendq.__all__)


def test_layers_import_only_from_below():
    src = pathlib.Path(blendq.__file__).parent
    for name, rank in RANK.items():
        tree = ast.parse((src / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                dep = node.module.split(".")[0]
                if dep in RANK:
                    assert RANK[dep] < rank, f"{name} imports {dep} from above"


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, blendq; heavy = {'onnx', 'onnxruntime', 'matplotlib', 'torchvision',"
        " 'sklearn'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
