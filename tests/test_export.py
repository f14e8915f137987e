"""Deployment: integer engine == alpha=1 model, artifact round trip, ONNX Runtime agreement."""

import copy

import pytest
import torch
from conftest import small_cnn
from torch import nn

import blendq
from blendq.data import FASHION_MNIST_DIR
from blendq.export import (
    ExportError,
    IntegerEngine,
    export_onnx,
    load_artifact,
    onnx_session,
    run_onnx,
    save_artifact,
    to_graph,
)
from blendq.export.ir import integer_bias
from blendq.models import build_model

FAMILIES = {  # the paper's model families, small widths, random weights
    "binarynet": ({"width": 0.125}, {"first_layer": (1, None)}),
    "mobilenet_v1": ({"width": 0.25}, {"first_layer": 8, "depthwise": 8}),
    "resnet50_v1": ({"width": 0.125}, {}),
    "resnet50_v2": ({"width": 0.125}, {}),
}


def _converted(name, bits, per_channel, seed=0):
    torch.manual_seed(seed)
    model_args, rules = FAMILIES[name]
    model = build_model(name, image_size=32, **model_args)
    a_bits = bits if bits > 1 or name == "binarynet" else 8
    policy = blendq.QuantPolicy(w_bits=bits, a_bits=a_bits, per_channel=per_channel, **rules)
    model = blendq.prepare(model, policy)
    x = torch.randn(6, 3, 32, 32)
    model.train()
    for _ in range(2):
        model(x)
    for m in model.modules():  # batch norm with negative multipliers and offsets
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.normal_()
    blendq.set_alpha(model.eval(), 1.0)
    return blendq.convert(model), x


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_engine_equals_alpha_one_model(name, bits, per_channel):
    converted, x = _converted(name, bits, per_channel)
    graph = to_graph(converted)
    out = IntegerEngine(graph)(x)
    ref64 = copy.deepcopy(converted).double()(x.double())
    torch.testing.assert_close(out, ref64, rtol=1e-5, atol=1e-5 * ref64.abs().max().item())
    assert torch.equal(out.argmax(1), converted(x).argmax(1))
    for node in graph.nodes:  # int8-kernel layers: bias in whole accumulator units
        if node.op in ("qconv", "qlinear") and integer_bias(node):
            units = node.tensors["add"] / node.tensors["mul"].abs()
            assert torch.allclose(units, units.round(), rtol=0, atol=1e-6)
    if name in ("binarynet", "mobilenet_v1", "resnet50_v1"):  # every BN folded away
        assert not any(n.op == "affine" for n in graph.nodes) or name == "binarynet"


def test_batch_norm_is_folded_including_negative_multipliers():
    converted, x = _converted("binarynet", 1, True)
    graph = to_graph(converted)
    quant = [n for n in graph.nodes if n.op in ("qconv", "qlinear")]
    assert len(quant) == 9
    # conv -> BN folded into the rescale; conv -> maxpool -> BN: rescale moved after the pool
    assert sum("rescale_after" in n.attrs for n in quant) == 3
    assert any((n.tensors["mul"] < 0).any() for n in quant)
    assert all(n.op != "affine" or n.name in {q.attrs.get("rescale_after") for q in quant}
               for n in graph.nodes)


def test_accumulators_fit_int32():
    converted, x = _converted("resnet50_v1", 8, True)
    stats = IntegerEngine(to_graph(converted)).max_accumulator(x)
    assert stats and max(stats.values()) < 2**31


@pytest.mark.parametrize("bits, ratio", [(1, 32), (4, 8), (8, 4)])
def test_artifact_round_trip_and_size(tmp_path, bits, ratio):
    torch.manual_seed(0)
    model = build_model("binarynet", image_size=32, width=0.5)  # 3.5 M weights
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    policy = blendq.QuantPolicy(w_bits=bits, a_bits=bits, per_channel=True,
                                first_layer=(bits, None))
    model = blendq.prepare(model, policy)
    x = torch.randn(4, 3, 32, 32)
    model.train()(x)
    blendq.set_alpha(model.eval(), 1.0)
    graph = to_graph(blendq.convert(model))
    size = save_artifact(graph, tmp_path / "m.safetensors")
    loaded = load_artifact(tmp_path / "m.safetensors")
    assert torch.equal(IntegerEngine(loaded)(x), IntegerEngine(graph)(x))
    # float64 per-channel rescales and the JSON graph add ~10 % at 1 bit, ~1 % at 8 bits
    assert fp32_bytes / ratio * 0.95 < size < fp32_bytes / ratio * 1.15


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    converted, x = _converted("mobilenet_v1", 8, True)
    path = export_onnx(converted, tmp_path / "m.onnx", x)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    int32 = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    assert any(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in proto.graph.node)
    out = run_onnx(onnx_session(path), x)
    ref = converted(x).detach()
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_bad_input_gives_one_clear_error(tmp_path):
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(a_bits=None))
    with pytest.raises(ExportError, match="call blendq.convert"):
        to_graph(model)
    with pytest.raises(ExportError, match="no quantized layers"):
        to_graph(small_cnn())

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.GELU()

        def forward(self, x):
            return self.act(self.fc(x))

    odd = blendq.prepare(Odd(), blendq.QuantPolicy(a_bits=None))
    blendq.set_alpha(odd, 1.0)
    with pytest.raises(ExportError, match="layer act: GELU is not supported"):
        to_graph(blendq.convert(odd))
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ExportError, match="not a readable blendq artifact"):
        load_artifact(tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ExportError, match="not a blendq artifact"):
        load_artifact(tmp_path / "y.safetensors")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (installed by .ci/run)")
def test_onnxruntime_agrees_with_alpha_one_on_fashion_mnist_w8a8(tmp_path):
    pytest.importorskip("onnxruntime")
    from blendq.data import TensorLoader
    from blendq.engine import TrainConfig, train
    from blendq.export.verify import verify_model

    base = TrainConfig(model="fmnist_cnn", data="fashion-mnist", train_subset=4000,
                       epochs=1, lr=2e-3, device="cpu", seed=0, model_args={"width": 16})
    train(base.replace(quantize=False), tmp_path / "fp", progress=False)
    run = train(base.replace(w_bits=8, a_bits=8, per_channel=True, lr=5e-4,
                             init_from=str(tmp_path / "fp")), tmp_path / "q", progress=False)
    model = run.model
    graph = to_graph(blendq.convert(model))
    data = __import__("blendq.data", fromlist=["load_dataset"]).load_dataset("fashion-mnist")
    test = TensorLoader(data.test_images, data.test_labels, 1000)
    with blendq.quantized(model) as alpha_one:
        ref, engine, fused, unfused = verify_model(alpha_one, graph, test)
    # the acceptance bar (>= 99.9 % top-1, <= 1 output step) for the engine, ONNX
    # Runtime's fused int8 kernels (its default) and the QDQ graph as written
    for row in (engine, fused, unfused):
        assert row.top1_agreement >= 99.9 and row.max_steps <= 1.0, row.row()
    assert ref.accuracy > 60.0
