"""The α = 1 model rounds an integer layer's output and a residual add as ONNX Runtime's
int8 kernels do (``QLinearConv``: a float32 multiplier; ``QLinearAdd``: two fused
multiply-adds), so at 4 bits, where an output within ~1e-6 of a rounding midpoint
moves the next layer by a sizeable part of a step, the deployed model computes what was
trained: checked kernel by kernel against ONNX Runtime, then on a model end to end."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import blendq
from blendq import functional as F

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# MLAS picks its QLinearAdd kernel by the CPU: the emulated one is the AVX2 kernel
_AVX2 = "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


def _session(nodes, inputs, outputs, inits, tmp_path, name):
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _exact(value: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(value), 0, 255)


def test_conv_requantization_is_onnx_runtimes_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    c_in, c_out = 16, 64
    x = rng.integers(0, 16, (64, c_in, 32, 32), dtype=np.uint8)  # 4-bit codes in uint8
    w = rng.integers(-7, 8, (c_out, c_in, 1, 1), dtype=np.int8)
    bias = rng.integers(-200, 200, c_out).astype(np.int32)
    # half the channels with γ_x·γ_w/γ_y within float32 rounding of 1/10: every odd
    # multiple of 5 in the accumulator lands on a rounding midpoint (a lattice
    # coincidence, as seen in a trained model), where the float32 roundings decide
    xs = np.float32(0.0371)
    ws = rng.uniform(0.01, 0.05, c_out).astype(np.float32)
    ws[: c_out // 2] = np.float32(0.0297)
    ys = np.float32(np.float32(xs * ws[0]) * np.float32(10))
    inits = {"xs": xs, "xz": np.uint8(0), "w": w, "ws": ws, "wz": np.zeros(c_out, np.int8),
             "ys": ys, "yz": np.uint8(0), "b": bias}
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"])
    session = _session([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                       [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits,
                       tmp_path, "conv")
    got = session.run(None, {"x": x})[0].astype(np.float32)

    acc = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                     torch.from_numpy(w).double()).round()
    total = acc + torch.from_numpy(bias).double().reshape(1, -1, 1, 1)
    unit = torch.from_numpy(xs * ws)  # fl32(γ_x·γ_w), as the runtime multiplies
    ours = F.runtime_requantize(total.float(), unit, torch.tensor(ys), 1, 0, 255)
    assert np.array_equal(ours.numpy(), got)
    # the test has teeth: exact arithmetic rounds some outputs the other way
    exact = _exact(total.numpy() * (np.float64(xs) * ws.astype(np.float64)).reshape(1, -1, 1, 1)
                   / np.float64(ys))
    assert (exact != got).sum() > 0


@pytest.mark.skipif(not _AVX2, reason="the emulated QLinearAdd is MLAS's AVX2 kernel")
def test_add_is_onnx_runtimes_qlinearadd_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, 1 << 21, dtype=np.uint8)
    b = rng.integers(0, 256, 1 << 21, dtype=np.uint8)
    sa, sb, sc = np.float32(0.0633), np.float32(0.0523), np.float32(0.0444)
    inits = {"sa": sa, "za": np.uint8(128), "sb": sb, "zb": np.uint8(128), "sc": sc,
             "zc": np.uint8(0)}
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"],
                            domain="com.microsoft")
    vi = [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("a", "b")]
    session = _session([node], vi, [helper.make_tensor_value_info("c", TensorProto.UINT8, None)],
                       inits, tmp_path, "add")
    got = session.run(None, {"a": a, "b": b})[0].astype(np.float32)
    ours = F.runtime_add(torch.from_numpy(a).float(), torch.tensor(sa), 128,
                         torch.from_numpy(b).float(), torch.tensor(sb), 128, torch.tensor(sc), 0)
    assert np.array_equal(ours.numpy(), got)
    exact = _exact(((a.astype(np.float64) - 128) * np.float64(sa) +
                    (b.astype(np.float64) - 128) * np.float64(sb)) / np.float64(sc))
    assert (exact != got).sum() > 0  # where the float32 roundings decide


class _Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # as users write it: in place
        return torch.relu(out)


def test_alpha_one_model_rounds_as_onnx_runtime_end_to_end(tmp_path, monkeypatch):
    from blendq.export import export_onnx, onnx_session, run_onnx
    from blendq.export.verify import output_step

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), torch.nn.BatchNorm2d(16),
                              torch.nn.ReLU(), *[_Block(16) for _ in range(3)],
                              torch.nn.Conv2d(16, 8, 1), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10))
    model = blendq.prepare(net, blendq.QuantPolicy(w_bits=4, a_bits=4, per_channel=True))
    x = torch.randn(32, 3, 8, 8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    blendq.set_alpha(model.eval(), 1.0)
    from blendq import quantizers

    calls = {"rounded as the runtime": 0, "add": 0}
    runtime_codes, runtime_add = quantizers.runtime_codes, F.runtime_add

    def codes(*args):
        out = runtime_codes(*args)
        calls["rounded as the runtime"] += out is not None
        return out

    def add(*args):
        calls["add"] += 1
        return runtime_add(*args)

    monkeypatch.setattr(quantizers, "runtime_codes", codes)
    monkeypatch.setattr(F, "runtime_add", add)
    with torch.no_grad():
        model(x)  # the first forward offers; from here every output is rounded so
        calls.update({"rounded as the runtime": 0, "add": 0})
        ref = model(x)
    # every quantizer reading a layer's output (8: the stem, two a block, the 1x1 conv
    # through the flatten into the Linear) or a residual add's (3)
    assert calls["rounded as the runtime"] == 11 and calls["add"] >= 3, calls
    with torch.no_grad():
        converted = blendq.convert(copy.deepcopy(model))
        assert torch.equal(converted(x), ref)
        session = onnx_session(export_onnx(converted, tmp_path / "m.onnx", x))
        out = run_onnx(session, x)
    # the same codes in every layer: the logits differ by float32 rounding alone
    assert float((out - ref).abs().max()) <= 1e-3 * output_step(ref)


class _Shared(torch.nn.Module):
    """A ReLU6 output read by two layers (each with its own input quantizer), their sum
    into a Linear: ResNet's stem and a downsampling block's two branches, MobileNet's
    ReLU6."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1),
                                        torch.nn.BatchNorm2d(16), torch.nn.ReLU6())
        self.a = torch.nn.Conv2d(16, 16, 1)
        self.b = torch.nn.Conv2d(16, 16, 3, 1, 1)
        self.head = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(self.a(h) + self.b(h)).flatten(1))


def test_a_shared_output_and_relu6_run_as_int8_kernels_as_trained(tmp_path):
    """Two quantizers of different scales reading one layer's ReLU6 output, their grids
    ending above 6 (a learned step): ONNX Runtime runs every convolution as
    ``QLinearConv`` (the layer copied for each reader, the ReLU6 a clamp of the codes at
    ``round(6 / scale)``, not a float convolution and clip), and the α = 1 model rounds
    as those kernels do."""
    from blendq.export import export_onnx, onnx_session, run_onnx
    from blendq.export.verify import output_step

    torch.manual_seed(0)
    model = blendq.prepare(_Shared(), blendq.QuantPolicy(w_bits=4, a_bits=4, per_channel=True))
    x = 3 * torch.randn(64, 3, 8, 8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        model.a.a_quant.scale.fill_(0.4321)  # 15 steps: 6.48 and 6.85, past ReLU6's 6
        model.b.a_quant.scale.fill_(0.4567)
    blendq.set_alpha(model.eval(), 1.0)
    with torch.no_grad():
        model(x)
        ref = model(x)
        path = export_onnx(blendq.convert(copy.deepcopy(model)), tmp_path / "m.onnx", x)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4 and not {"Conv", "FusedConv"} & set(ops), ops
    out = run_onnx(onnx_session(path), x)
    assert float((out - ref).abs().max()) <= 1e-3 * output_step(ref)


def test_a_noted_output_whose_id_comes_again_counts_as_the_newest():
    """Quantizer outputs are noted by ``id`` (an add's operands are found by it). A freed
    tensor's id comes back for a new one, which must then be the newest note, not keep
    the dead one's place among the oldest and be dropped early: that lost a residual
    add's operand depending on where memory was allocated, and the α = 1 model rounded
    that add otherwise in some runs."""
    from blendq import quantizers

    quantizers._kept()
    scale = torch.tensor(0.5)
    value = torch.ones(4)
    others = [torch.full((4,), float(i)) for i in range(3 * quantizers._KEPT)]
    quantizers._note(value, value * 2, scale, False)
    for other in others[:5]:
        quantizers._note(other, other * 2, scale, False)
    quantizers._note(value, value * 2, scale, False)  # as a new tensor with a reused id
    for other in others[5:5 + 2 * quantizers._KEPT - 1]:
        quantizers._note(other, other * 2, scale, False)
    assert id(value) in quantizers._runtime.noted


def test_a_kept_output_matches_where_codes_differ_at_midpoints_only():
    """Which kept output a quantizer's input is, is read from the values: the runtime's
    codes may differ from ``round(x / scale)`` by one where ``x`` lies at a rounding
    midpoint (float32 roundings decide there), and nowhere else."""
    from blendq.quantizers import _agrees

    scale = torch.tensor(0.5)
    x = torch.arange(64, dtype=torch.float32) * 0.37  # a small output: 64 elements
    x[10] = 5.25  # 10.5 steps, a midpoint
    own = F.quantize(x, scale, 8, False, full=True)
    codes = own.clone()
    codes[10] += 1  # the runtime rounded the midpoint up
    assert _agrees(codes, own, x, scale)
    codes[20] += 1  # and elsewhere: another tensor's values
    assert not _agrees(codes, own, x, scale)
    codes = own.clone()
    codes[10] += 2
    assert not _agrees(codes, own, x, scale)


@pytest.mark.parametrize("seed", range(20))
def test_clamp_of_kept_codes_changes_only_the_extreme_elements(seed):
    """``_clamped`` (which skips its passes where no code lies past ``x``'s own codes'
    extremes) equals the rule it states: where ``x`` takes its largest value, codes no
    more than its own; where its smallest, no less; everywhere else untouched."""
    from blendq.quantizers import _clamped

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 50, generator=g) * 2  # elements near an extreme share its code
    x[0, :3], x[1, :2] = x.max(), x.min()  # the extreme values held by several elements
    own = torch.round(x / 0.5)
    codes = own + torch.randint(-1, 2, own.shape, generator=g).float() * (seed % 3 > 0)
    expected = torch.where(x == x.max(), torch.minimum(codes, own), codes)
    expected = torch.where(x == x.min(), torch.maximum(expected, own), expected)
    assert torch.equal(_clamped(codes.clone(), x, own), expected)
