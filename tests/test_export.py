"""Deployment: capture, integer engine == alpha=1 model, artifact, ONNX Runtime agreement."""

import copy

import pytest
import torch
from conftest import small_cnn
from torch import nn

import blendq
from blendq.converted import QuantMixin
from blendq.data import FASHION_MNIST_DIR
from blendq.export import (
    ExportError,
    IntegerEngine,
    capture,
    deployable,
    export_onnx,
    fused_ops,
    load_artifact,
    onnx_session,
    run_onnx,
    save_artifact,
)
from blendq.export.verify import compare_logits, output_step
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


def _calibrated_convert(model, x):
    """Calibrate a prepared model on ``x`` (one training forward), then convert at α = 1."""
    model.train()(x)
    blendq.set_alpha(model.eval(), 1.0)
    return blendq.convert(model)


def _batch_norms(program) -> int:
    return sum("batch_norm" in str(n.target) for n in program.graph.nodes)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_integer_engine_equals_alpha_one_model(name, bits):
    converted, x = _converted(name, bits, per_channel=bits != 8)
    program = capture(converted, x)
    engine = IntegerEngine(program)
    out = engine(x)
    # The integer cores against the same graph in float64: the same constants, so they
    # differ only by the order of float sums, which decides activations on a rounding
    # tie (differently per CPU). Samples without a tie agree to float64 rounding; tied
    # activations are few, counted, and excuse only their own sample.
    ref = IntegerEngine(program, integer=False)(x)
    clean = engine.tied_activations == 0
    assert int(engine.tied_activations.sum()) <= 2 * len(x) and clean.sum() >= len(x) // 2
    torch.testing.assert_close(out[clean], ref[clean], rtol=1e-9,
                               atol=1e-9 * ref.abs().max().item())
    # Against the α = 1 model (float64 eager): the deployed graph stores folded batch-norm
    # scales in float32, so an activation within ~1e-5 of a midpoint may round the other
    # way: within one output step but for such an image, and every pick agrees.
    ref64 = copy.deepcopy(converted).double()(x.double())
    step = output_step(ref64)
    per_image = (out - ref64).abs().amax(1) / step
    assert int((per_image > 1).sum()) <= 1 and float(per_image.max()) <= 4
    assert compare_logits("engine", ref64, out, step).top1_agreement == 100.0
    assert compare_logits("float32", out, converted(x).double(), step).top1_agreement == 100.0
    layers = [m for m in converted.modules() if isinstance(m, QuantMixin)]
    assert engine.integer_layers == sum(
        m.a_bits is not None and not (m.a_bits == 1 and m.a_signed) for m in layers)
    deployed = [m for m in deployable(converted).modules() if isinstance(m, QuantMixin)]
    for m in deployed:  # int8-kernel layers: the bias in whole int32 accumulator units
        if m.deploy.integer_bias:
            assert m.deploy_bias.dtype == torch.int32
    if name in ("mobilenet_v1", "resnet50_v1"):  # every batch norm follows a conv: folded
        assert _batch_norms(program) == 0


def test_batch_norm_is_folded_including_negative_multipliers():
    converted, x = _converted("mobilenet_v1", 4, True)
    folded = deployable(converted)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    before = [m for m in converted.modules() if isinstance(m, QuantMixin)]
    after = [m for m in folded.modules() if isinstance(m, QuantMixin)]
    flipped = [not torch.equal(a.weight_codes, b.deploy_codes) for a, b in zip(
        before, after, strict=True)]
    assert any(flipped)  # negative batch-norm multipliers: the sign moved into the codes
    assert all((b.deploy_scale > 0).all() for b in after)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), converted(x), rtol=1e-4,
                                   atol=1e-4 * float(converted(x).abs().max()))


def test_accumulators_fit_int32():
    converted, x = _converted("resnet50_v1", 8, True)
    stats = IntegerEngine(capture(converted, x)).max_accumulator(x)
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
    converted = _calibrated_convert(model, x)
    size = save_artifact(converted, tmp_path / "m.pt2", x)
    loaded = load_artifact(tmp_path / "m.pt2")
    assert torch.equal(IntegerEngine(loaded)(x), IntegerEngine(capture(converted, x))(x))
    # the tensors stored: packed codes plus scales and float layers (a few per cent); the
    # serialized graph adds a fixed ~0.25 MB whatever the weights
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:
        stored = sum(i.file_size for i in archive.infolist() if "/data/weights/weight_" in
                     i.filename)
    assert fp32_bytes / ratio * 0.95 < stored < fp32_bytes / ratio * 1.15
    assert size < stored + 400_000


def test_residual_branch_reads_the_float_value(tmp_path):
    """A value feeding a quantized layer and a residual add: only the layer quantizes it."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(x + self.a(x))  # x feeds `a` (quantized) and the add (float)

    torch.manual_seed(0)
    model = blendq.prepare(Block(), blendq.QuantPolicy(w_bits=4, a_bits=4))
    x = torch.randn(64, 8)
    converted = _calibrated_convert(model, x)
    path = export_onnx(converted, tmp_path / "r.onnx", x)
    ref = converted(x).detach()
    for optimize in (True, False):
        out = run_onnx(onnx_session(path, optimize=optimize), x)
        assert float((out - ref).abs().max()) <= float(ref.abs().max()) / 127


def test_onnx_export_runs_in_onnxruntime_with_int8_kernels(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    converted, x = _converted("mobilenet_v1", 8, True)
    path = export_onnx(converted, tmp_path / "m.onnx", x)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert "BatchNormalization" not in ops
    int32 = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    assert any(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in proto.graph.node)
    session = onnx_session(path, optimized_path=tmp_path / "opt.onnx")
    assert fused_ops(tmp_path / "opt.onnx").get("QLinearConv", 0) >= 10
    for batch in (x, torch.cat([x, x, x])):  # the batch dimension is dynamic
        out = run_onnx(session, batch)
        ref = converted(batch).detach()
        assert torch.equal(out.argmax(1), ref.argmax(1))
        assert float((out - ref).abs().max()) <= float(ref.abs().max()) / 127


def test_optional_forward_arguments_and_functional_ops_export(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(16, 5)

        def forward(self, x, mask=None):
            y = self.conv(x)
            y = torch.cat([nn.functional.adaptive_avg_pool2d(y, 1).flatten(1),
                           y.mean((2, 3))], 1)
            return self.fc(y if mask is None else y * mask)

    torch.manual_seed(0)
    model = blendq.prepare(Net(), blendq.QuantPolicy(w_bits=4, a_bits=8))
    x = torch.randn(8, 3, 8, 8)
    converted = _calibrated_convert(model, x)
    out = run_onnx(onnx_session(export_onnx(converted, tmp_path / "n.onnx", x)), x)
    assert float((out - converted(x)).abs().max()) <= float(converted(x).abs().max()) / 127


def test_bad_input_gives_one_clear_error(tmp_path):
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(a_bits=None))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ExportError, match="call blendq.convert"):
        capture(model, x)
    with pytest.raises(ExportError, match="no quantized layers"):
        capture(small_cnn(), x)
    blendq.set_alpha(model, 1.0)
    converted = blendq.convert(model)
    with pytest.raises(ExportError, match="example_input must be a tensor"):
        capture(converted, [x])
    with pytest.raises(ExportError, match="does not run on example_input"):
        capture(converted, torch.randn(2, 5, 8, 8))
    with pytest.raises(ExportError, match="cannot capture the model with dynamic_shapes"):
        capture(converted, x, dynamic_shapes=({1: torch.export.Dim("channels")},))

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent branch

    dyn = blendq.prepare(Dynamic(), blendq.QuantPolicy(a_bits=None))
    blendq.set_alpha(dyn, 1.0)
    with pytest.raises(ExportError, match="torch.export cannot capture the model"):
        capture(blendq.convert(dyn), torch.randn(2, 4))
    (tmp_path / "x.pt2").write_bytes(b"not an archive at all")
    with pytest.raises(ExportError, match="not a blendq artifact"):
        load_artifact(tmp_path / "x.pt2")
    with pytest.raises(ExportError, match="does not exist"):
        load_artifact(tmp_path / "missing.pt2")


def test_dynamic_shapes_in_each_of_torch_exports_forms_trace_a_size_one_example():
    """A sequence length named dynamic stays dynamic from a one-token example, whichever
    form ``dynamic_shapes`` takes; a dimension named static keeps the example's size;
    an example sliced from a longer batch (strides of another shape) traces too."""
    Dim = torch.export.Dim
    model = blendq.prepare(nn.Sequential(nn.Linear(8, 4)), blendq.QuantPolicy(a_bits=None))
    blendq.set_alpha(model, 1.0)
    converted = blendq.convert(model)
    seq = Dim("seq", max=16)
    x = torch.randn(1, 1, 8)
    for spec in (({0: Dim.STATIC, 1: seq},), ([1, seq, None],), {"input": {1: seq}},
                 ({1: Dim.AUTO},)):
        program = capture(converted, x, dynamic_shapes=spec)
        name = program.graph_signature.user_inputs[0]
        shape = next(n for n in program.graph.nodes if n.name == name).meta["val"].shape
        assert shape[0] == 1 and not isinstance(shape[1], int) and shape[2] == 8, spec
    sliced = torch.randn(3, 6, 8)[:, :-1]
    program = capture(converted, sliced, dynamic_shapes=({0: Dim("b"), 1: seq},))
    assert program.module()(sliced[:1, :2]).shape == (1, 2, 4)


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
    data = __import__("blendq.data", fromlist=["load_dataset"]).load_dataset("fashion-mnist")
    test = TensorLoader(data.test_images, data.test_labels, 1000)
    program = capture(blendq.convert(model), data.test_images[:2])
    with blendq.quantized(model) as alpha_one:
        ref, engine, fused, unfused = verify_model(alpha_one, program, test)
    # the acceptance bar (>= 99.9 % top-1, <= 1 output step) for the engine, ONNX
    # Runtime's fused int8 kernels (its default) and the QDQ graph as written
    for row in (engine, fused, unfused):
        assert row.top1_agreement >= 99.9 and row.max_steps <= 1.0, row.row()
    assert ref.accuracy > 60.0


def test_padding_and_relu6_between_convolutions_still_fuse(tmp_path):
    """TensorFlow-style explicit padding and ReLU6 between two convolutions (Hugging Face
    MobileNetV2): the quantizer moves back across both, so ORT fuses QLinearConv."""

    class PadNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.nn.functional.relu6(self.a(nn.functional.pad(x, [1, 1, 1, 1])))
            y = torch.nn.functional.relu6(self.b(nn.functional.pad(y, [1, 1, 1, 1])))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = blendq.prepare(PadNet(), blendq.QuantPolicy(w_bits=8, a_bits=8))
    x = torch.randn(16, 3, 8, 8)
    converted = _calibrated_convert(model, x)
    path = export_onnx(converted, tmp_path / "p.onnx", x)
    session = onnx_session(path, optimized_path=tmp_path / "opt.onnx")
    # the first convolution fuses; the second feeds global pooling, which does not commute
    ops = fused_ops(tmp_path / "opt.onnx")
    assert ops.get("QLinearConv", 0) == 1 and ops.get("Relu", 0) == 0
    ref = converted(x).detach()
    out = run_onnx(session, x)
    assert float((out - ref).abs().max()) <= float(ref.abs().max()) / 127


def test_tied_logits_are_not_counted_as_disagreement():
    from blendq.export.verify import compare_logits

    ref = torch.tensor([[1.0, 3.0, 3.0], [0.0, 2.0, 1.0]])
    other = torch.tensor([[1.0, 2.999, 3.0], [0.0, 1.0, 2.0]])  # a tie; a real flip
    row = compare_logits("x", ref, other, step=3.0 / 127)
    assert row.ties == 1 and row.strict_top1 == 0.0 and row.top1_agreement == 50.0


def _eval_equals_export(model, x):
    converted = _calibrated_convert(model, x)
    with torch.no_grad():
        ref = converted(x)
        torch.testing.assert_close(deployable(converted)(x), ref, rtol=1e-4,
                                   atol=1e-4 * float(ref.abs().max()))
        engine = IntegerEngine(capture(converted, x))(x)
    torch.testing.assert_close(engine.float(), ref, rtol=1e-4,
                               atol=1e-4 * float(ref.abs().max()))


def test_batch_norm_on_a_linear_over_3d_input_is_not_folded():
    """BatchNorm1d on (N, L, C) normalises L, not the Linear's C outputs."""
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)

        def forward(self, x):
            return self.bn(self.fc(x))

    torch.manual_seed(0)
    _eval_equals_export(blendq.prepare(Seq(), blendq.QuantPolicy(w_bits=4, a_bits=8)),
                        torch.randn(4, 16, 16))


def test_a_batch_norm_called_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.c2(self.bn(self.c1(x))))

    torch.manual_seed(0)
    model = blendq.prepare(Twice(), blendq.QuantPolicy(w_bits=4, a_bits=8))
    assert type(model.bn) is nn.BatchNorm2d
    _eval_equals_export(model, torch.randn(4, 4, 6, 6))


def test_batch_norm_without_running_statistics_exports():
    torch.manual_seed(0)
    model = blendq.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(
        4, track_running_stats=False), nn.Flatten(), nn.Linear(144, 3)),
        blendq.QuantPolicy(w_bits=4, a_bits=8))
    _eval_equals_export(model, torch.randn(4, 3, 8, 8))


def _hoisted(node, inits: dict, zp, x):
    """``node -> QuantizeLinear -> DequantizeLinear`` (scale ``inits["s"]``, zero point
    ``zp``) run by ONNX Runtime on ``x`` before and after ``_hoist_quantize``: the moves,
    the model after, and both outputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from blendq.export.onnx import _hoist_quantize

    inputs = [numpy_helper.from_array(np.array(v, dtype=np.float32), n)
              for n, v in inits.items()] + [numpy_helper.from_array(zp, "zp")]
    graph = helper.make_graph(
        [node, helper.make_node("QuantizeLinear", [node.output[0], "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])], inputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    before = run(model)
    moves = _hoist_quantize(model)
    onnx.checker.check_model(model, full_check=True)
    return moves, model, before, run(model)


@pytest.mark.parametrize(("zero", "dtype", "clamped"), [
    (0, "uint8", False),  # an unsigned grid: the quantizer's own clamp, the Relu goes
    (128, "uint8", True),  # a signed grid stored in uint8: a clamp of the codes at 128
    (0, "int8", True),
])
def test_a_relu_moves_onto_the_codes(zero, dtype, clamped):
    import numpy as np
    from onnx import helper

    moves, model, before, after = _hoisted(
        helper.make_node("Relu", ["x"], ["r"], name="relu"), {"s": 0.05},
        np.array(zero, dtype=dtype), np.linspace(-8, 8, 64, dtype=np.float32))
    assert moves == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["QuantizeLinear", "Clip", "DequantizeLinear"] if clamped
                   else ["QuantizeLinear", "DequantizeLinear"])
    assert np.array_equal(after, before) and before.min() == 0


@pytest.mark.parametrize(("lo", "hi", "dtype", "moved"), [
    (-10.0, 0.5, "int8", True),  # lower bound beyond the codes: dropped, upper on grid
    (-float("inf"), 0.15, "uint8", True),  # an infinite bound, the other on grid
    (0.0, 0.15, "uint8", True),  # a 4-bit grid's clamp in uint8
    (0.0, 0.155, "uint8", True),  # a bound between steps (ReLU6 below a grid past 6)
    (0.0, 0.125, "uint8", True),  # a bound near a rounding midpoint
    (-0.0333, 0.6, "int8", True),  # both between steps
    (-0.125, 0.6, "int8", True),  # a negative bound near a midpoint
    (-1.25, -0.75, "uint8", True),  # a bound past the codes' other end: all of it
    (-2.0, 2.0, "int8", False),  # both beyond the codes: the clamp is the quantizer's
])
def test_a_clamp_moves_onto_the_codes_exactly(lo, hi, dtype, moved):
    import numpy as np
    from onnx import helper

    x = np.linspace(-3, 3, 64, dtype=np.float32)  # and the bounds, the values beside them
    near = np.array([lo, hi], dtype=np.float32)[np.isfinite([lo, hi])]
    x[:6 * len(near)] = np.concatenate([np.nextafter(near, np.float32(d)) if d else near
                                        for d in (-np.inf, 0, np.inf)] * 2)
    moves, model, before, after = _hoisted(
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
        {"lo": lo, "hi": hi, "s": 0.01}, np.array(0, dtype=dtype), x)
    assert moves == (1 if moved or (lo, hi) == (-2.0, 2.0) else 0)
    ops = [n.op_type for n in model.graph.node]
    assert ops[0] == ("QuantizeLinear" if moved or "Clip" not in ops else "Clip")
    assert np.array_equal(after, before)
    assert {t.name for t in model.graph.initializer} >= {"s", "zp"}
    assert not moved or not {"lo", "hi"} & {t.name for t in model.graph.initializer}
