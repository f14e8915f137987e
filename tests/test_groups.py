"""Block-wise (group) weight quantization: policy rules, PPQ per block, convert, 4-bit
storage, and export of weight-only layers to ONNX Runtime's MatMulNBits."""

import copy

import pytest
import torch
from torch import nn

import blendq
from blendq import functional as F


@pytest.mark.parametrize("group_size", [8, 48, 0, True, 16.0])
def test_group_sizes_the_runtime_cannot_take_are_refused_with_the_reason(group_size):
    with pytest.raises(ValueError, match="power of two >= 16.*MatMulNBits"):
        blendq.QuantPolicy(group_size=group_size)


def test_one_bit_layers_keep_their_sign_scale_and_the_rest_use_blocks():
    with pytest.raises(ValueError, match="2..8-bit"):
        blendq.quantizers.WeightSpec(bits=1, group_size=16)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    plans = blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=16,
                               first_layer=(1, None)).resolve(model)
    assert [p.w_spec.group_size for p in plans] == [None, 16]


def test_a_row_that_the_block_size_does_not_divide_ends_in_a_shorter_block():
    torch.manual_seed(0)
    layer = nn.Linear(40, 6)  # rows of 40: blocks of 16, 16 and 8
    model = blendq.prepare(nn.Sequential(layer), blendq.QuantPolicy(
        w_bits=4, a_bits=None, group_size=16, method="ste"))
    model.train()(torch.randn(2, 40))
    q, w = model[0].w_quant, model[0].float_weight.detach()
    assert q.scale.shape == (6, 3)
    assert F.block_lengths((6, 40), 0, 16)[:4].tolist() == [16, 16, 8, 16]
    for row, block, cols in ((0, 0, slice(0, 16)), (3, 2, slice(32, 40))):
        alone, scale = F.ppq(w[row, cols], 4, max_iter=q.spec.init_iter, fixed=True,
                             scale=F.search_scale(w[row, cols], 4))
        torch.testing.assert_close(q.scale[row, block], scale.reshape(()), rtol=1e-6, atol=0)
        assert torch.equal(q.codes[row, cols], alone)
    qmin, qmax = F.grid(4)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax


@pytest.mark.parametrize("method", ["ab", "ste", "lsq"])
def test_convert_equals_the_alpha_one_model_exactly(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 24), nn.ReLU(), nn.Linear(24, 5))
    prepared = blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=8, group_size=16,
                                                        method=method))
    controller = blendq.AlphaController(prepared, blendq.linear(0, 3))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    x = torch.randn(8, 3, 6, 6)
    prepared.train()
    for step in range(5):
        controller.step(step)
        loss = prepared(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert blendq.transform.get_alpha(prepared) == 1.0
    prepared.eval()
    expected = prepared(x)
    converted = blendq.convert(prepared)
    assert torch.equal(converted(x), expected)
    # 4-bit codes stored two a byte in the converted state dict, and loaded back
    state = converted.state_dict()
    assert state["3.weight_codes"].dtype == torch.uint8
    assert state["3.weight_codes"].numel() == 24 * 8 * 6 * 6 // 2
    assert state["3.weight_scale"].shape == (24, 18)
    again = copy.deepcopy(converted)
    again.load_state_dict(state)
    assert torch.equal(again(x), expected)
    rows = {r.name: r for r in blendq.summary(converted)}
    assert rows["3"].granularity == "group 16"
    assert rows["0"].granularity == "group 16"  # 3·3·3 = 27 inputs: blocks of 16 and 11


def test_summary_says_where_every_row_fits_one_block():
    model = blendq.prepare(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                                         nn.Linear(4, 2)),
                           blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=32))
    rows = {r.name: r for r in blendq.summary(model)}
    assert rows["0"].granularity == "channel (rows <= group 32)"


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


def _trained_tiny_gpt2(method: str, **policy):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = blendq.prepare(_Logits(transformers.GPT2LMHeadModel(config)), blendq.QuantPolicy(
        **{"w_bits": 4, "a_bits": None, "group_size": 32, "method": method,
           "skip": ("m.lm_head",), **policy}))
    controller = blendq.AlphaController(model, blendq.linear(0, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 17))
    model.train()
    for step in range(6):
        controller.step(step)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), ids[:, :-1]


@pytest.mark.parametrize("method", ["ab", "lsq"])
def test_gpt2_with_blocks_runs_in_onnx_runtime_as_matmulnbits(method, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.verify import compare_logits, output_step

    model, ids = _trained_tiny_gpt2(method)
    layers = [m for m in model.modules() if isinstance(m, blendq.layers.BlendMixin)]
    assert len(layers) == 8 and all(m.w_quant.spec.group_size == 32 for m in layers)
    with torch.no_grad():
        expected = model(ids)
    converted = blendq.convert(model)
    assert torch.equal(converted(ids), expected)
    fp32_bytes = sum(m.float_weight.numel() * 4 for m in layers)
    for level in (0, 4):
        path = export_onnx(converted, tmp_path / f"gpt2_{level}.onnx", ids,
                           accuracy_level=level)
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 8
        assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {level}
        # a default ONNX Runtime session, nothing set
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                  ids.numpy()})[0])
        agreement = compare_logits("ort", expected, got, output_step(expected))
        if level == 0:  # float32 activations: what was trained, to float32 rounding
            assert agreement.strict_top1 == 100.0 and agreement.max_steps <= 0.01
            # 4-bit codes two a byte and one float32 scale per 32: 0.156 of float32
            stored = sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer
                         if ".nbits" in t.name)
            assert stored <= 0.16 * fp32_bytes
        else:  # int8 activations inside the kernel: close, not the same computation
            assert agreement.max_steps <= 2.0


def test_block_quantized_convolutions_export_as_blocked_dequantize(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.onnx import onnx_session, run_onnx

    torch.manual_seed(0)
    model = blendq.prepare(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(8 * 4 * 4, 3)),
                           blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=16,
                                              method="ste"))
    x = torch.randn(2, 4, 6, 6)
    model.train()(x)
    model.eval()
    converted = blendq.convert(model)
    path = export_onnx(converted, tmp_path / "conv.onnx", x, weights="int4")
    graph = onnx.load(str(path)).graph
    blocked = [n for n in graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 1  # the convolution's; the Linear became MatMulNBits
    inits = {t.name: t for t in graph.initializer}
    assert inits[blocked[0].input[0]].data_type == onnx.TensorProto.INT4
    got = run_onnx(onnx_session(path), x)  # blocked INT4 stays INT4 in the session
    torch.testing.assert_close(got, converted(x), rtol=1e-5, atol=1e-5)


def test_artifact_and_integer_engine_read_block_scales(tmp_path):
    from blendq.export import IntegerEngine, capture
    from blendq.export.artifact import load_artifact, save_artifact

    torch.manual_seed(0)
    model = blendq.prepare(nn.Sequential(nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3)),
                           blendq.QuantPolicy(w_bits=3, a_bits=None, group_size=16,
                                              method="ste"))
    x = torch.randn(5, 48)
    model.train()(x)
    converted = blendq.convert(model.eval())
    expected = converted(x)
    size = save_artifact(converted, tmp_path / "m.pt2", x)
    assert size > 0
    program = load_artifact(tmp_path / "m.pt2")
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-6, atol=1e-6)
    engine = IntegerEngine(capture(converted, x))
    torch.testing.assert_close(engine(x).float(), expected, rtol=1e-5, atol=1e-5)


def test_two_layers_sharing_merged_codes_keep_their_own_scales(tmp_path):
    """The exporter merges equal initializers: two weights whose codes are equal but
    whose scales differ (one is twice the other) read one codes tensor; each fused node
    keeps its own scales."""
    pytest.importorskip("onnxruntime")
    from blendq.export import export_onnx
    from blendq.export.onnx import onnx_session, run_onnx

    torch.manual_seed(0)
    a, b = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        b.weight.copy_(2 * a.weight)
    model = blendq.prepare(nn.Sequential(a, nn.ReLU(), b), blendq.QuantPolicy(
        w_bits=4, a_bits=None, group_size=16, method="ste"))
    x = torch.randn(2, 4, 32)
    model.train()(x)
    converted = blendq.convert(model.eval())
    path = export_onnx(converted, tmp_path / "shared.onnx", x)
    torch.testing.assert_close(run_onnx(onnx_session(path), x), converted(x),
                               rtol=1e-5, atol=1e-5)


def test_accuracy_level_none_writes_standard_onnx_only(tmp_path):
    onnx = pytest.importorskip("onnx")
    from blendq.export import ExportError, export_onnx

    model = blendq.prepare(nn.Sequential(nn.Linear(32, 8)), blendq.QuantPolicy(
        w_bits=4, a_bits=None, group_size=16))
    x = torch.randn(2, 32)
    blendq.set_alpha(model, 1.0)
    model.train()(x)
    converted = blendq.convert(model.eval())
    path = export_onnx(converted, tmp_path / "std.onnx", x, accuracy_level=None)
    graph = onnx.load(str(path))
    assert "MatMulNBits" not in {n.op_type for n in graph.graph.node}
    assert all(o.domain in ("", "ai.onnx") for o in graph.opset_import)
    for bad in (5, True, "0"):
        with pytest.raises(ExportError, match="accuracy_level"):
            export_onnx(converted, tmp_path / "bad.onnx", x, accuracy_level=bad)


def test_batch_norm_without_affine_rounds_under_bf16_autocast():
    model = blendq.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False),
                                         nn.ReLU(), nn.Flatten(), nn.Linear(128, 3)),
                           blendq.QuantPolicy(w_bits=4, a_bits=8, method="ste"))
    x = torch.randn(4, 3, 6, 6)
    model.train()(x)
    for mode in (model.train, model.eval):
        mode()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).isfinite().all()


def test_int8_block_inputs_need_blocks_and_float_inputs():
    for bad in (dict(group_size=None), dict(group_size=32, a_bits=8)):
        with pytest.raises(ValueError, match="int8_block_inputs"):
            blendq.QuantPolicy(w_bits=4, **{"a_bits": None, **bad}, int8_block_inputs=True)
    with pytest.raises(ValueError, match="needs group_size"):
        blendq.quantizers.WeightSpec(bits=4, int8_inputs=True)


def _output_and_near_ties(model, ids, layers) -> tuple[torch.Tensor, int]:
    """The model's output on ``ids`` and how many inputs of ``layers`` lie within two ulps
    of a tie of the int8 rounding MatMulNBits applies at level 4 (``x·127/max|x|`` per
    block), where the kernel and PyTorch may round either way."""
    near_ties = []

    def count(layer, args):
        x = args[0].detach().reshape(-1, layer.w_quant.spec.group_size)
        v = x * (127.0 / x.abs().amax(1, keepdim=True))
        ulps = 2 * torch.finfo(v.dtype).eps * v.abs().clamp(min=1)
        near_ties.append(int(((v - v.floor() - 0.5).abs() <= ulps).sum()))

    hooks = [m.register_forward_pre_hook(count) for m in layers]
    with torch.no_grad():
        output = model(ids)
    for hook in hooks:
        hook.remove()
    return output, sum(near_ties)


def test_int8_block_inputs_make_the_fast_kernel_compute_what_was_trained(tmp_path):
    """Trained with the input rounding ONNX Runtime's MatMulNBits applies at accuracy
    level 4, the level-4 file agrees with the α = 1 model to float rounding, but where an
    input lies within two ulps of a rounding tie (kernel and PyTorch may round it either
    way: one int8 code, a fraction of an output step)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.verify import compare_logits, output_step

    model, ids = _trained_tiny_gpt2("ste", int8_block_inputs=True)
    layers = [m for m in model.modules() if isinstance(m, blendq.layers.BlendMixin)]
    assert len(layers) == 8 and all(m.w_quant.spec.int8_inputs for m in layers)
    assert all(m.float_weight.grad is not None for m in layers)
    expected, near_ties = _output_and_near_ties(model, ids, layers)
    converted = blendq.convert(model)
    with torch.no_grad():
        assert torch.equal(converted(ids), expected)
    path = export_onnx(converted, tmp_path / "int8in.onnx", ids)  # level 0 asked for
    nodes = onnx.load(str(path)).graph.node
    kernels = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(kernels) == 8 and "Round" not in {n.op_type for n in nodes}  # handed over
    assert {a.i for n in kernels for a in n.attribute if a.name == "accuracy_level"} == {4}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    agreement = compare_logits("ort", expected, got, output_step(expected))
    assert near_ties <= 2
    assert agreement.strict_top1 == 100.0
    assert agreement.max_steps <= (0.01 if near_ties == 0 else 0.5), near_ties


def test_int8_blocks_rounds_per_block_of_the_last_dimension():
    x = torch.tensor([[0.0] * 16 + [1.0, -2.0] + [0.5] * 14 + [0.3]])  # 33 inputs
    out = F.int8_blocks(x, 16)
    assert torch.equal(out[0, :16], torch.zeros(16))  # a block of zeros stays 0
    second = x[0, 16:32]
    expected = torch.round(second * (127 / 2.0)) * (2.0 / 127)
    torch.testing.assert_close(out[0, 16:32], expected, rtol=0, atol=1e-7)
    assert out[0, 32] == x[0, 32]  # a block of one: its own peak, exactly


def test_int8_block_inputs_are_written_out_where_no_kernel_takes_them(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.onnx import onnx_session, run_onnx

    torch.manual_seed(0)
    model = blendq.prepare(nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)),
                           blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=16,
                                              int8_block_inputs=True))
    x = torch.randn(3, 5, 40)  # 40 inputs: blocks of 16, 16 and 8
    blendq.set_alpha(model, 1.0)
    model.train()(x)
    converted = blendq.convert(model.eval())
    x[0, 0, 20] = float("nan")  # a block holding NaN is NaN, as in PyTorch (ONNX Runtime's
    x[0, 1, 39] = float("inf")  # ReduceMax skips NaN); inf: likewise
    with torch.no_grad():
        expected = converted(x)
    assert expected[0, :2].isnan().all() and expected[0, 2:].isfinite().all()
    path = export_onnx(converted, tmp_path / "std.onnx", x, accuracy_level=None)
    graph = onnx.load(str(path))
    assert {"Round", "ReduceMax"} <= {n.op_type for n in graph.graph.node}
    assert all(o.domain in ("", "ai.onnx") for o in graph.opset_import)
    torch.testing.assert_close(run_onnx(onnx_session(path), x), expected, rtol=0, atol=1e-4,
                               equal_nan=True)


def test_int8_blocks_divides_as_the_kernel_and_survives_tiny_peaks():
    # x · 127 / peak is exactly 43.5 here: a true division rounds it to 44 (half to even),
    # a multiplication by the rounded reciprocal of peak would give 43
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 3.44, 1.1782677
    codes = torch.round(F.int8_blocks(x, 16) / (x.abs().max() / 127))
    assert codes[0, 1] == 44  # what MatMulNBits computes at level 4 (onnxruntime 1.32)
    tiny = torch.zeros(1, 16)
    tiny[0, 0] = 1e-38  # 127 / peak overflows: the block becomes 0, not NaN
    assert torch.equal(F.int8_blocks(tiny, 16), torch.zeros(1, 16))


@pytest.mark.parametrize(("bits", "per_channel"), [(4, True), (8, True), (4, False)])
def test_weight_only_matmuls_are_written_at_the_level_the_file_means(bits, per_channel,
                                                                     tmp_path):
    """ONNX Runtime fuses a weight-only matmul's DequantizeLinear into MatMulNBits at its
    session default, level 4 (int8 activations): blendq writes the node itself at
    level 0, so a default session computes what was trained (found on a GPT-2)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.verify import compare_logits, output_step

    model, ids = _trained_tiny_gpt2("ste", group_size=None, w_bits=bits,
                                    per_channel=per_channel)
    with torch.no_grad():
        expected = model(ids)
    path = export_onnx(blendq.convert(model), tmp_path / "wo.onnx", ids)
    kernels = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert len(kernels) == 8
    assert {a.i for n in kernels for a in n.attribute if a.name == "bits"} == {min(bits, 8)}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    agreement = compare_logits("ort", expected, got, output_step(expected))
    assert agreement.strict_top1 == 100.0 and agreement.max_steps <= 0.01


def test_evaluation_reprojects_a_weight_refilled_in_place_after_training():
    """A wrapper may refill a weight's storage without bumping its version (FSDP2 gathers
    shards into the same buffer): evaluation after a training step projects anew."""
    import torch

    from blendq.quantizers import WeightQuantizer, WeightSpec

    w = torch.randn(8, 16)
    q = WeightQuantizer(WeightSpec(bits=4, per_channel=True, quant_every=4), w)
    q.train()
    q.quantized(w)  # a training step that projects (codes kept for quant_every steps)
    q.eval()
    first = q.quantized(w).clone()
    q.train()
    q._trained += 1  # a controller's step ...
    q.quantized(w)  # ... whose training forward reuses its codes: the scale stays
    version = w._version
    with torch.no_grad():
        w.mul_(3.0)  # the refill ...
    torch._C._autograd._unsafe_set_version_counter((w,), (version,))  # ... without a bump
    q.eval()
    codes, scale = q.project(w)  # the projection of the weight as it is now
    again = q.quantized(w)
    assert torch.equal(again, scale * codes) and not torch.allclose(again, first)


# --- int8_matmul: block weights trained for an integer matrix product -------------------


def test_int8_matmul_is_refused_where_it_cannot_hold_with_the_reason():
    for bad in (dict(group_size=None), dict(a_bits=8), dict(w_bits=8),
                dict(int8_block_inputs=True)):
        with pytest.raises(ValueError, match="int8_matmul"):
            blendq.QuantPolicy(**{"w_bits": 4, "a_bits": None, "group_size": 32, **bad},
                               int8_matmul=True)
    with pytest.raises(ValueError, match="learns its scale"):
        blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=32, method="lsq",
                           int8_matmul=True)
    with pytest.raises(ValueError, match="int8_matmul"):
        blendq.quantizers.WeightSpec(bits=4, int8_matmul=True)  # no group_size


@pytest.mark.parametrize("ceil", [False, True])
def test_snapped_block_scales_are_whole_multiples_of_one_unit_per_row(ceil):
    torch.manual_seed(0)
    scale = torch.rand(64, 12) * torch.logspace(-3, 2, 64)[:, None] + 1e-6
    scale[5] = 0.0  # a row of zero weights keeps its scales
    snapped = F.snap_block_scales(scale, 8, ceil=ceil)
    unit = scale.amax(1, keepdim=True) / 8
    k = snapped / unit.clamp(min=1e-30)
    live = torch.arange(64) != 5
    assert torch.equal(snapped[5], scale[5])
    torch.testing.assert_close(k[live], k[live].round(), rtol=0, atol=1e-4)
    assert k[live].round().min() >= 1 and k[live].round().max() == 8
    # the largest block keeps its scale, to the unit's rounding (20 bits in float32)
    torch.testing.assert_close(snapped.amax(1), scale.amax(1), rtol=2.0 ** -19, atol=0)
    if ceil:  # nothing that fitted clips
        assert (snapped[live] >= scale[live]).all()
    else:
        above = live[:, None] & (scale >= unit)  # (below one unit: the first multiple)
        assert ((snapped - scale).abs() <= unit * 0.5 * (1 + 1e-5))[above].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_snapped_block_scales_stay_whole_multiples_in_half_precision(dtype):
    torch.manual_seed(0)
    scale = (torch.rand(32, 6) + 0.05).to(dtype)
    snapped = F.snap_block_scales(scale, 8, dtype=dtype)
    assert snapped.dtype == dtype
    weight, unit = F.int8_weight_of_blocks(torch.randint(-8, 8, (32, 96)).float(), snapped,
                                           8, 16)
    k = snapped.float() / unit[:, None]
    assert torch.equal(k, k.round())  # exact: k · unit holds in the half type


@pytest.mark.parametrize("policy", [{"group_size": 32}, {"group_size": 32, "int8_matmul": True},
                                    {"a_bits": 8}])
def test_a_bfloat16_model_converts_as_trained_and_exports_in_float32(policy, tmp_path):
    """A model trained in bfloat16 converts to one that computes in bfloat16 what the
    α = 1 model computed (its dequantized weight in the model's dtype, following
    ``.float()``); export asks for float32 in one error, and ``.float()`` exports."""
    pytest.importorskip("onnxruntime")
    from blendq.export import ExportError, export_onnx
    from blendq.export.onnx import onnx_session, run_onnx

    torch.manual_seed(0)
    rules = {"w_bits": 4, "a_bits": None, "method": "ste", **policy}
    model = blendq.prepare(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)),
                           blendq.QuantPolicy(**rules)).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    model.train()(x)
    blendq.set_alpha(model, 1.0)
    with torch.no_grad():
        blended = model.eval()(x)
        converted = blendq.convert(model)
        assert torch.equal(converted(x), blended)
    with pytest.raises(ExportError, match=r"call \.float\(\) on the converted model"):
        export_onnx(converted, tmp_path / "half.onnx", x)
    full = converted.float()
    path = export_onnx(full, tmp_path / "full.onnx", x.float())
    with torch.no_grad():
        want = full(x.float())
    torch.testing.assert_close(run_onnx(onnx_session(path), x.float()), want, rtol=0,
                               atol=1e-5)


def test_an_int8_matmul_weight_is_its_blocks_codes_times_their_multiples():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (6, 40)).float()
    scale = F.snap_block_scales(torch.rand(6, 3) + 0.1, 8)  # blocks of 16, 16 and 8
    weight, unit = F.int8_weight_of_blocks(codes, scale, 8, 16)
    assert weight.dtype == torch.int8 and weight.abs().max() <= 64
    expected = F.expand_blocks(scale, (6, 40), 0, 16) * codes
    torch.testing.assert_close(unit[:, None] * weight.float(), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="whole multiples"):
        F.int8_weight_of_blocks(codes, torch.rand(6, 3) * 0.37 + 0.1, 8, 16)


def test_int8_matmul_trains_its_weights_onto_multiples_and_rounds_inputs_per_row():
    torch.manual_seed(0)
    model = blendq.prepare(nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)),
                           blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=16,
                                              int8_matmul=True, method="ste"))
    x = torch.randn(3, 5, 40)
    model.train()(x).sum().backward()
    assert model[0].float_weight.grad is not None
    for layer in (model[0], model[2]):
        q = layer.w_quant
        assert q.spec.int8_matmul
        k = q.scale / (q.scale.amax(1, keepdim=True) / 8)
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
        assert k.round().min() >= 1 and k.round().max() <= 8
    rows = [r for r in blendq.summary(model) if r.w_bits == 4]
    assert len(rows) == 2 and all("int8 matmul" in r.granularity for r in rows)
    # each row of an input is rounded alone: a row's output does not depend on the others
    model.eval()
    with torch.no_grad():
        whole, first = model(x), model(x[:1, :2])
    torch.testing.assert_close(first, whole[:1, :2], rtol=0, atol=1e-6)
    assert torch.equal(F.int8_rows(x), F.int8_blocks(x, 40))


@pytest.mark.parametrize("method", ["ste", "ab"])
def test_int8_matmul_exports_as_matmulinteger_and_computes_what_was_trained(method, tmp_path):
    """GPT-2 trained with ``int8_matmul``: the file writes every adapted matmul as
    ``MatMulInteger`` (standard ONNX, no 4-bit kernel), and ONNX Runtime's logits agree
    with the α = 1 model's, at any sequence length (the rounding is per token): within
    float rounding, or a fraction of an output step where an input that the runtime
    computes a few ulps apart (its fused normalisation and attention) sits at a tie of
    the int8 rounding and one code moves."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.verify import compare_logits, output_step

    model, ids = _trained_tiny_gpt2(method, int8_matmul=True)
    layers = [m for m in model.modules() if isinstance(m, blendq.layers.BlendMixin)]
    assert len(layers) == 8 and all(m.w_quant.spec.int8_matmul for m in layers)
    with torch.no_grad():
        expected = model(ids)
    converted = blendq.convert(model)
    with torch.no_grad():
        assert torch.equal(converted(ids), expected)
    # one file for any batch and sequence length (a prompt, then one token at a time)
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=32)},)
    path = export_onnx(converted, tmp_path / "int8mm.onnx", ids, dynamic_shapes=dims)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 8 and "MatMulNBits" not in ops
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) == 8
    assert max(abs(int(v)) for t in weights for v in onnx.numpy_helper.to_array(t).flat) <= 64
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch, length in ((4, ids.shape[1]), (4, 5), (1, 1)):
        got = torch.from_numpy(session.run(None, {name: ids[:batch, :length].numpy()})[0])
        want = expected[:batch, :length]
        agreement = compare_logits("ort", want, got, output_step(want))
        assert agreement.strict_top1 == 100.0
        assert agreement.max_steps <= 0.5 and agreement.mean_abs_diff <= 1e-4, agreement
    if method != "ste":
        return
    # stored as INT4 codes and int8 multiples, folded into the same int8 weights at load
    small = export_onnx(converted, tmp_path / "int8mm_int4.onnx", ids[:1, :1],
                        weights="int4", dynamic_shapes=dims)  # size-1 dims: traced doubled
    graph = onnx.load(str(small)).graph
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in graph.initializer) == 8
    assert small.stat().st_size < path.stat().st_size
    session = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    assert torch.equal(torch.from_numpy(session.run(None, {name: ids[:1, :1].numpy()})[0]), got)


def test_int8_matmul_files_pass_nan_rows_on_and_store_narrow_weights_as_int4(tmp_path):
    """A row holding NaN is NaN in the file as in PyTorch (ONNX Runtime's ReduceMax
    would skip it); 3-bit layers (multiples up to 16) store INT4 codes too; nothing
    dangles in the graph."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx

    torch.manual_seed(0)
    model = blendq.prepare(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)),
                           blendq.QuantPolicy(w_bits=3, a_bits=None, group_size=16,
                                              int8_matmul=True, method="ste"))
    x = torch.randn(4, 64)
    model.train()(x)
    converted = blendq.convert(model.eval())
    x[0, 5] = float("nan")
    with torch.no_grad():
        expected = converted(x)
    assert expected[0].isnan().all() and expected[1:].isfinite().all()
    path = export_onnx(converted, tmp_path / "w3.onnx", x, weights="int4")
    graph = onnx.load(str(path)).graph
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in graph.initializer) == 2
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    assert all(any(o in read for o in n.output) for n in graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got[0].isnan().all()
    torch.testing.assert_close(got[1:], expected[1:], rtol=1e-5, atol=1e-5)


def test_int8_matmul_llama_rounds_a_shared_input_once(tmp_path):
    """Llama's q/k/v and gate/up projections read one tensor each: one row rounding
    serves them (an ``Abs`` per distinct input), and a row that the block size does not
    divide (intermediate 176: blocks of 32, then 16) still computes what was trained."""
    transformers = pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from blendq.export import export_onnx
    from blendq.export.verify import compare_logits, output_step

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32)
    model = blendq.prepare(_Logits(transformers.LlamaForCausalLM(cfg)), blendq.QuantPolicy(
        w_bits=4, a_bits=None, group_size=32, method="ste", int8_matmul=True,
        skip=("m.lm_head",)))
    ids = torch.randint(0, 64, (2, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 64),
                                           ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ids = ids[:, :-1]
    with torch.no_grad():
        expected = model(ids)
    path = export_onnx(blendq.convert(model), tmp_path / "llama.onnx", ids, weights="int4")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulInteger") == 14 and ops.count("Abs") == 8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    agreement = compare_logits("ort", expected, got, output_step(expected))
    assert agreement.strict_top1 == 100.0 and agreement.max_steps <= 0.5, agreement
