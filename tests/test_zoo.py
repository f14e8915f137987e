"""Architectures nobody here wrote (Hugging Face transformers, small configs, random
weights; timm where it imports): prepare W4A8 per-channel -> train to alpha = 1 ->
convert == alpha = 1 -> export -> ONNX Runtime and the integer engine against the
alpha = 1 model on 64 inputs (benchmarks/zoo.py does the work)."""

import sys
from pathlib import Path

import pytest
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
zoo = pytest.importorskip("zoo")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

TIMM = [f"timm/{n}" for n in zoo.TIMM] if zoo.timm_available() else []
MATMUL = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.MultiheadAttention)


@pytest.mark.parametrize("name", zoo.HF + TIMM)
def test_architecture_end_to_end(name):
    row = zoo.run_model(name, seed=0)
    model, _ = zoo.build(name)
    layers = sum(isinstance(m, MATMUL) or zoo.blendq.layers.is_hf_conv1d(m)
                 for m in model.modules())
    assert row["quantized"] == layers  # every Linear/conv/attention/Conv1D weight
    assert row["convert_equals_alpha_one"]
    # within one int8 output step and on every prediction; where the alpha = 1 model
    # itself moves by more than a step under a one-in-a-million nudge of its input (a
    # chaotic random network: any rounding tie flips), within twice that floor and on
    # at least 95 % of the predictions (such a network's own picks move under the nudge)
    chaotic = row["rounding_floor_steps"] >= 1.0
    least = 95.0 if chaotic else 100.0
    assert row["ort_top1"] >= least and row["engine_top1"] >= least, row
    bound = max(1.0, 2 * row["rounding_floor_steps"])
    assert row["ort_max_steps"] <= bound and row["engine_max_steps"] <= bound, row
    assert row["integer_layers"] >= 1
