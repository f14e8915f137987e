"""prepare / set_alpha / views / convert: exact where it should be exact."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from conftest import small_cnn
from torch import nn

import blendq
from blendq.converted import QuantMixin
from blendq.layers import BlendConv1d, BlendConv2d, BlendLinear, FoldedBatchNorm2d


def _calibrate(model, x, steps=3):
    model.train()
    for _ in range(steps):
        model(x)
    model.eval()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("a_bits", [None, 8, 4, 1])
def test_alpha_zero_is_float_model_bit_for_bit(cnn, images, per_channel, a_bits):
    reference = copy.deepcopy(cnn).eval()
    model = blendq.prepare(
        cnn, blendq.QuantPolicy(w_bits=4, a_bits=a_bits, per_channel=per_channel, act_method="ab")
    )
    _calibrate(model, images)
    reference.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in reference.state_dict()}
    )
    blendq.set_alpha(model, 0.0)
    torch.testing.assert_close(model(images), reference(images), atol=0, rtol=0)


@pytest.mark.parametrize("w_bits", [1, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_alpha_one_is_model_with_dequantized_weights(cnn, images, w_bits, per_channel):
    reference = copy.deepcopy(cnn).eval()
    model = blendq.prepare(
        cnn, blendq.QuantPolicy(w_bits=w_bits, a_bits=None, per_channel=per_channel)
    ).eval()
    blendq.set_alpha(model, 1.0)
    out = model(images)
    for (_name, layer), ref in zip(
        blendq.transform.blend_layers(model),
        [m for m in reference.modules() if type(m) in (nn.Conv2d, nn.Linear)],
        strict=True,
    ):
        codes, scale = layer.w_quant.eval_projection(layer.float_weight)
        ref.weight.data = scale * codes
    torch.testing.assert_close(out, reference(images), atol=0, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.9])
@pytest.mark.parametrize("w_bits", [1, 4])
def test_weight_gradient_is_one_minus_alpha_times_blended_gradient(alpha, w_bits):
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    model = blendq.prepare(nn.Sequential(layer), blendq.QuantPolicy(w_bits=w_bits, a_bits=None))
    blendq.set_alpha(model, alpha)
    x = torch.randn(5, 6)
    model(x).square().sum().backward()
    # gradient with respect to the blended weight w' itself
    w_blend = model[0].blended_weight().detach().requires_grad_(True)
    torch.nn.functional.linear(x, w_blend, layer.bias).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, (1 - alpha) * w_blend.grad)


def test_prepare_reuses_parameters_and_keeps_optimizer(cnn):
    params = list(cnn.parameters())
    opt = torch.optim.SGD(cnn.parameters(), lr=0.1)
    model = blendq.prepare(cnn, blendq.QuantPolicy())
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert isinstance(model[0], BlendConv2d) and isinstance(model[-1], BlendLinear)
    before = model[0].weight.detach().clone()
    model.train()
    blendq.set_alpha(model, 0.5)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].float_weight)


def test_blended_layers_keep_torch_signature():
    conv = BlendConv2d(3, 4, 3, stride=2, padding=1, groups=1, bias=False)
    assert conv.stride == (2, 2) and conv.bias is None
    assert BlendConv1d(2, 2, 3, groups=2).groups == 2
    assert BlendLinear(3, 4, bias=True).weight.shape == (4, 3)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 8), (4, 4), (1, 1), (2, None)])
def test_convert_reproduces_alpha_one_exactly(cnn, images, per_channel, w_bits, a_bits):
    model = blendq.prepare(
        cnn, blendq.QuantPolicy(w_bits=w_bits, a_bits=a_bits, per_channel=per_channel)
    )
    _calibrate(model, images)
    blendq.set_alpha(model, 1.0)
    expected = model(images)
    converted = blendq.convert(model)
    torch.testing.assert_close(converted(images), expected, atol=0, rtol=0)
    state = converted.state_dict()
    codes = [v for k, v in state.items() if k.endswith("weight_codes")]
    layers = [m for m in converted.modules() if isinstance(m, QuantMixin)]
    # codes of 4 bits or fewer are packed (two per byte; eight per byte for signs)
    packed = torch.uint8 if w_bits <= 4 else torch.int8
    assert len(codes) == 4 and all(c.dtype == packed for c in codes)
    per_byte = {1: 8, 2: 2, 4: 2, 8: 1}[w_bits]
    assert [c.numel() for c in codes] == [
        -(-m.weight_codes.numel() // per_byte) for m in layers]
    again = copy.deepcopy(converted)
    again.load_state_dict(state)
    assert all(torch.equal(a.weight_codes, b.weight_codes) for a, b in zip(
        layers, [m for m in again.modules() if isinstance(m, QuantMixin)], strict=True))
    assert not any(
        k.endswith(".weight") and v.dtype.is_floating_point and v.dim() > 1
        for k, v in state.items()
    )
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith("_scale"))
    assert sum(isinstance(m, QuantMixin) for m in converted.modules()) == 4


def test_convert_refuses_alpha_below_one(cnn, images):
    model = blendq.prepare(cnn, blendq.QuantPolicy(a_bits=None))
    blendq.set_alpha(model, 0.99)
    with pytest.raises(ValueError, match=r"alpha=0.99; convert needs alpha = 1"):
        blendq.convert(model)
    with pytest.raises(ValueError, match="no blended layers"):
        blendq.convert(small_cnn())


def test_convert_refuses_uncalibrated_activations(cnn):
    model = blendq.prepare(cnn, blendq.QuantPolicy(a_bits=8))
    blendq.set_alpha(model, 1.0)
    with pytest.raises(ValueError, match="never calibrated"):
        blendq.convert(model)


def test_views_do_not_disturb_training_state(cnn, images):
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=8, quant_every=5))
    model.train()
    blendq.set_alpha(model, 0.3)
    model(images)
    state = copy.deepcopy(model.state_dict())
    with blendq.full_precision(model) as m:
        assert not m.training and blendq.transform.get_alpha(m) == 0.0
        m(images)
    with blendq.quantized(model):
        model(images * 3)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_alpha_controller_sets_alpha_and_marks_codes_stale(cnn):
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=None, quant_every=3))
    ctl = blendq.AlphaController(model, blendq.cubic(0, 10))
    model.train()
    x = torch.randn(2, 3, 8, 8)
    ctl.step(0)
    model(x)
    codes0 = model[0].w_quant.codes.clone()
    with torch.no_grad():
        model[0].float_weight.mul_(-1)
    ctl.step(1)
    model(x)
    assert torch.equal(model[0].w_quant.codes, codes0)  # step 1: cached codes reused
    ctl.step(3)
    model(x)
    assert not torch.equal(model[0].w_quant.codes, codes0)  # step 3: refreshed
    assert ctl.step(10) == 1.0 and float(model[0].alpha) == 1.0


@pytest.mark.parametrize("after", ["freeze", "ste"])
def test_ab_weights_after_alpha_one_freeze_or_train_straight_through(cnn, images, after):
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=None))
    ctl = blendq.AlphaController(model, blendq.cubic(0, 4), after=after)
    model.train()
    for step in (2, 4):  # α < 1: AB gradient (1 - α) > 0 in both; α = 1: only the hybrid
        ctl.step(step)
        model.zero_grad()
        model(images).square().mean().backward()
        grad = model[0].float_weight.grad
        assert (grad.abs().sum() > 0) == (step < 4 or after == "ste")
    assert model[0].w_quant.spec.method == "ab"  # specs are immutable after prepare; the
    assert model[0].w_quant.method.gradient == ("ste" if after == "ste" else "ab")  # mode
    with pytest.raises(ValueError, match="after must be one of"):
        blendq.AlphaController(model, blendq.cubic(0, 4), after="thaw")


def test_nan_weight_error_names_the_layer(cnn, images):
    model = blendq.prepare(cnn, blendq.QuantPolicy(a_bits=None))
    with torch.no_grad():
        model[3].float_weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 3: weight"):
        model(images)


def test_summary_lists_layers(cnn):
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=8, first_layer=8, skip=("10",)))
    rows = {r.name: r for r in blendq.summary(model)}
    # every module holding weights, and the site quantizing the average pool's input
    assert list(rows) == ["0", "1", "3", "4", "6", "8.quant_site", "10"]
    assert rows["8.quant_site"].a_bits == 8 and rows["8.quant_site"].fate.endswith("site)")
    assert rows["0"].w_bits == 8 and rows["3"].w_bits == 4
    assert rows["10"].method == "float" and rows["10"].fate == "float (policy)"
    assert rows["1"].fate.startswith("float: normalisation")
    text = blendq.format_summary(model)
    assert "w_bits" in text and "BlendConv2d" in text and "fate" in text


def test_prepare_twice_is_an_error(cnn):
    model = blendq.prepare(cnn, blendq.QuantPolicy())
    with pytest.raises(ValueError, match="already prepared"):
        blendq.prepare(model, blendq.QuantPolicy())


def test_state_dict_round_trip_keeps_alpha_ema_and_codes(cnn, images):
    policy = blendq.QuantPolicy(w_bits=4, a_bits=8, quant_every=4)
    model = blendq.prepare(cnn, policy)
    _calibrate(model, images)
    blendq.set_alpha(model, 0.7)
    fresh = blendq.prepare(small_cnn(), policy)
    fresh.load_state_dict(model.state_dict())
    assert float(fresh[0].alpha) == pytest.approx(0.7)
    assert torch.equal(fresh[0].a_quant.scale, model[0].a_quant.scale)
    assert torch.equal(fresh[0].w_quant.codes, model[0].w_quant.codes)
    assert fresh[0].a_quant.is_signed == model[0].a_quant.is_signed
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(images), model(images), atol=0, rtol=0)


def test_to_float_undoes_from_float(cnn, images):
    reference = copy.deepcopy(cnn).eval()
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=None)).eval()
    plain = model[0].to_float()
    assert type(plain) is nn.Conv2d and plain.weight is model[0].float_weight
    torch.testing.assert_close(plain(images), reference[0](images), atol=0, rtol=0)


def test_controller_applies_its_first_alpha_even_when_zero(cnn):
    model = blendq.prepare(cnn, blendq.QuantPolicy(a_bits=None))
    blendq.set_alpha(model, 0.5)
    ctl = blendq.AlphaController(model, blendq.cubic(10, 20))
    assert ctl.step(3) == 0.0 and blendq.transform.get_alpha(model) == 0.0


def test_batch_norm_after_a_quantized_layer_is_linked_to_it(cnn, images):
    keys = set(cnn.state_dict())
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=8))
    assert isinstance(model[1], FoldedBatchNorm2d) and model[1].producer is model[0]
    assert isinstance(model[4], FoldedBatchNorm2d) and model[4].producer is model[3]
    assert [m.bias_folded for _, m in blendq.transform.blend_layers(model)] == \
        [True, True, False, False]
    assert "producer" not in dict(model[1].named_children())  # a link, not a submodule
    assert keys <= set(model.state_dict())
    _calibrate(model, images)
    blendq.set_alpha(model, 1.0)
    converted = blendq.convert(model)
    assert converted[1].producer is converted[0] and converted[4].producer is converted[3]
    # in evaluation at alpha = 1 the folded bias k*b + t is a whole number of units |k|*u
    outputs = {}
    converted[1].register_forward_hook(lambda m, i, o: outputs.update(bn=o))
    converted(images)
    k, t = blendq.layers.bn_affine(converted[1])
    unit = (k * converted[0].accumulator_unit()).abs()
    conv = converted[0]
    acc = TF.conv2d(conv.quantized_input(images).double() / conv.act_scale.double(),
                    conv.weight_codes.double(), None, 1, 1)  # integer accumulator
    bias = (outputs["bn"].double() - acc * (k * conv.accumulator_unit()).view(1, -1, 1, 1))
    units = bias / unit.view(1, -1, 1, 1)
    assert torch.allclose(units, units.round(), atol=1e-3)
    assert not torch.allclose(units[0, :, 0, 0], (k * conv.bias.double() + t) / unit)


class _ShapeMath(nn.Module):
    """A forward torch.fx cannot trace (Python arithmetic on the input's shape, like
    TensorFlow 'same' padding) but torch.export can; ``residual``: the conv's output
    also feeds an add, so the batch norm is not its only consumer."""

    def __init__(self, residual: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.residual = residual

    def forward(self, x):
        pad = max(0, 4 - x.shape[-1] % 4) % 4
        y = self.conv(nn.functional.pad(x, [0, pad, 0, pad]))
        z = torch.relu(self.bn(y) + (y if self.residual else 0))
        return self.fc(z.mean((2, 3)))


@pytest.mark.parametrize("residual", [False, True])
def test_untraceable_module_links_candidates_that_export_checks(tmp_path, residual):
    from blendq.export import capture, export_onnx, onnx_session, run_onnx

    torch.manual_seed(0)
    model = blendq.prepare(_ShapeMath(residual), blendq.QuantPolicy(w_bits=4, a_bits=8))
    assert type(model.bn) is blendq.layers.FoldedBatchNorm2d and not model.bn.link_proven
    x = torch.randn(32, 3, 7, 7)
    model.train()(x)
    for m in model.modules():  # batch norm statistics and affine far from the defaults
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.normal_()
    blendq.set_alpha(model.eval(), 1.0)
    converted = blendq.convert(model)
    program = capture(converted, x)
    batch_norms = sum("batch_norm" in str(n.target) for n in program.graph.nodes)
    assert batch_norms == (1 if residual else 0)  # folded only where the graph proves it
    ref = converted(x).detach()
    out = run_onnx(onnx_session(export_onnx(converted, tmp_path / "s.onnx", x)), x)
    assert float((out - ref).abs().max()) <= float(ref.abs().max()) / 127


def test_activation_scale_from_a_strided_sample_or_the_whole_batch():
    from blendq.functional import ppq, strided_sample
    from blendq.quantizers import ActQuantizer, ActSpec

    x = torch.randn(16, 8, 20, 20).relu()
    alpha = torch.tensor(0.5)
    for sample in (None, 1000):
        aq = ActQuantizer(ActSpec(bits=4, sample=sample)).train()
        xg = x.clone().requires_grad_()
        out = aq(xg, alpha)
        part = x if sample is None else strided_sample(x, sample)
        _, expected = ppq(part, 4, signed=False, max_iter=3, fixed=True)
        assert torch.equal(aq.scale, expected.reshape(()))
        # the straight-through value: lerp toward the quantized input, written in place
        scale = aq.scale
        xq = scale * torch.clamp(torch.round(x / scale), 0, 15)
        assert torch.equal(out, torch.lerp(x, xq, alpha))
        out.sum().backward()
        inside = (x >= -0.5 * scale) & (x <= 15.5 * scale)
        assert torch.equal(xg.grad, inside.float())
    with pytest.raises(ValueError, match="sample"):
        ActSpec(sample=0)


def test_deferred_activation_statistics_are_the_immediate_ones_one_step_later():
    """Under a controller (an ActStatistics) a batch is quantized with the EMA as it
    stands and its statistic enters at the next settle: the EMA sequence is the immediate
    update's (same samples, same warm starts), each batch quantized one EMA older."""
    from blendq.functional import grid, quantize, strided_sample
    from blendq.quantizers import ActQuantizer, ActSpec, ActStatistics

    torch.manual_seed(0)
    spec = ActSpec(bits=4, sample=1000)
    inline, deferred = ActQuantizer(spec).train(), ActQuantizer(spec).train()
    ActStatistics([deferred])
    alpha = torch.tensor(1.0)
    qmax = grid(4, False, full=True)[1]
    for i in range(5):
        x = torch.randn(16, 8, 10, 10).relu() * (1 + i)
        used = deferred.scale.clone()
        out = deferred(x, alpha)
        inline(x, alpha)
        if i == 0:  # the first batch starts the EMA where it is quantized
            assert deferred._pending is None and torch.equal(deferred.scale, inline.scale)
            continue
        assert torch.equal(deferred.scale, used)  # not yet
        assert torch.equal(out, quantize(x, used, 4, False, full=True) * used)
        clipped = float(deferred.clipped)
        deferred.settle()
        torch.testing.assert_close(deferred.scale, inline.scale, rtol=2e-6, atol=0)
        codes = quantize(strided_sample(x, 1000), used, 4, False, full=True)
        assert float(deferred.clipped) - clipped == float((codes >= qmax).sum())
    x = torch.rand(16, 8, 10, 10)
    deferred(x, alpha)
    state = deferred.state_dict()  # a checkpoint holds the settled scale
    assert deferred._pending is None and torch.equal(state["scale"], deferred.scale)
    deferred(x, alpha)
    deferred.eval()  # so does evaluation
    assert deferred._pending is None
    deferred.train()(x, alpha)
    deferred.load_state_dict(state)  # a loaded state replaces what was not settled
    assert deferred._pending is None and torch.equal(deferred.scale, state["scale"])
    deferred(x, alpha)
    deferred.double()  # a move or cast settles first (the samples would stay behind)
    assert deferred._pending is None and deferred.scale.dtype == torch.float64


def test_controller_settles_statistics_as_the_forward_returns(cnn, images):
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=8))
    controller = blendq.AlphaController(model, blendq.constant(1.0))
    quantizers = blendq.transform._act_quantizers(model)
    layer = next(m for m in model.modules() if isinstance(m, blendq.layers.BlendMixin))
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model.train()
    for step in range(3):
        controller.step(step)
        before = [a.scale.clone() for a in quantizers]
        model(images)
        assert all(a._pending is None for a in quantizers)  # settled on the way out
        if step > 0:
            assert all(not torch.equal(a.scale, b)
                       for a, b in zip(quantizers, before, strict=True))
    hook.remove()
    layer(seen[-1])  # a forward of a part of the model: kept until the state is read
    assert layer.a_quant._pending is not None
    scale = layer.a_quant.scale.clone()
    converted = blendq.convert(model)  # settles first
    assert layer.a_quant._pending is None and not torch.equal(layer.a_quant.scale, scale)
    with blendq.transform.eval_mode(model):
        torch.testing.assert_close(converted(images), model(images))
    controller2 = blendq.AlphaController(model, blendq.constant(1.0))  # replaces the first
    assert len(model._forward_hooks) == 1 and controller2.act_stats.model is model
    copied = copy.deepcopy(model)  # hooks and statistics copied with the model
    assert next(iter(copied._forward_hooks.values())).__self__.model is copied
    blendq.AlphaController(model, blendq.constant(1.0), defer_statistics=False)
    assert not model._forward_hooks and all(a._stats is None for a in quantizers)


@pytest.mark.parametrize("per_channel", [False, True])
def test_batch_norm_rounding_computed_together_is_each_ones_own(cnn, images, per_channel,
                                                                 monkeypatch):
    """The controller's group computes every folded batch norm's bias rounding at once,
    at the first batch norm's forward after its step; each value equals the batch
    norm's own bit for bit, also after a write no version counter sees (as DDP's
    broadcast of the running statistics) between the step and the forward; a second
    forward in the step (its running statistics updated in place) computes its own."""
    model = blendq.prepare(cnn, blendq.QuantPolicy(w_bits=4, a_bits=8, quant_every=8,
                                                   per_channel=per_channel))
    controller = blendq.AlphaController(model, blendq.constant(0.7))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = [m for m in model.modules() if isinstance(m, FoldedBatchNorm2d)]
    assert len(norms) == 2 and any(n.producer.bias is not None for n in norms) and \
        any(n.producer.bias is None for n in norms)
    own, grouped = [], []  # batch norms that computed their own; that used the group's
    alone = FoldedBatchNorm2d.own_rounding_delta

    def counted(bn):
        own.append(bn)
        return alone(bn)

    def checked(bn, dtype=None):
        group = bn.__dict__["_rounding_group"].value(bn)
        if group is not None:
            grouped.append(bn)
            assert torch.equal(group, alone(bn))  # the value, as the batch norm's own
            if dtype is not None:  # and in the forward's dtype, converted with all
                cast = bn.__dict__["_rounding_group"].value(bn, dtype)
                assert cast.dtype == dtype and torch.equal(cast, group.to(dtype))
        delta = bn.own_rounding_delta() if group is None else group
        return delta if dtype is None else delta.to(dtype)

    monkeypatch.setattr(FoldedBatchNorm2d, "own_rounding_delta", counted)
    monkeypatch.setattr(FoldedBatchNorm2d, "rounding_delta", checked)
    model.train()
    for step in range(4):
        controller.step(step)
        if step == 3:  # written past the version counters, as DDP's broadcast writes
            for bn in norms:
                bn.running_var.data.mul_(1.5)
        quantizers = blendq.transform._act_quantizers(model)
        for a in quantizers if step == 2 else ():  # activation scales kept as they are
            a.eval()
        own.clear(), grouped.clear()
        model(images).sum().backward()
        # the first step's activation scales start in its forward, and so do the codes:
        # those of the first layer before the group computes, the second's after
        assert (own, grouped) == (norms[1:], norms[:1]) if step == 0 else \
            (own, grouped) == ([], norms), step
        if step == 2:  # a second micro-batch in the step: only the running statistics
            own.clear(), grouped.clear()  # changed (in place) and the batch count
            model(images).sum().backward()
            assert (own, grouped) == (norms, []), step
            for a in quantizers:
                a.train()
        opt.step()
        opt.zero_grad()
