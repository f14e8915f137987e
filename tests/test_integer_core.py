"""The α = 1 evaluation forward runs on the integer codes, as an int8 runtime does."""

import copy

import torch
from torch import nn

import blendq
from blendq.export import IntegerEngine, capture
from blendq.export.verify import output_step


def _calibrated(model: nn.Module, x: torch.Tensor, policy: blendq.QuantPolicy) -> nn.Module:
    model = blendq.prepare(model, policy)
    model.train()
    with torch.no_grad():
        model(x)
    blendq.set_alpha(model.eval(), 1.0)
    return model


def _reference(layer, xq: torch.Tensor) -> torch.Tensor:
    """``(γ_w·γ_a)·(q_w ⋆ q_a) + b`` in float64 (every integer sum exact) on the
    quantized input ``xq``."""
    a = layer.a_quant
    codes, w_scale = layer.w_quant.eval_projection(layer.latent_weight())
    sx = a.current_scale().double()
    x_codes = torch.round(xq.double() / sx)
    if isinstance(layer, nn.Linear):
        acc, view = nn.functional.linear(x_codes, codes.double()), (1, -1)
    else:
        acc = nn.functional.conv2d(x_codes, codes.double(), None, layer.stride, layer.padding)
        view = (1, -1, 1, 1)
    out = acc * (sx * w_scale.double().reshape(view))
    return out + layer.bias.detach().double().reshape(view)


def test_a_wide_layer_is_computed_on_its_codes():
    torch.manual_seed(0)
    x = torch.rand(4, 256, 6, 6) * 3
    model = _calibrated(nn.Sequential(nn.Conv2d(256, 32, 3, padding=1)), x,
                        blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True))
    layer = model[0]
    with torch.no_grad():
        xq = layer.blended_input(x)
        exact = model(x)
        float_path = nn.Conv2d.forward(layer, xq)  # the float sums the layer used to compute
    ref = _reference(layer, xq)
    # the integer sum is exact; three float32 roundings: the two scales' product, the
    # rescaled sum (at most |ref| + |b|) and the sum with the bias
    bias = layer.bias.detach().double().abs().reshape(1, -1, 1, 1)
    assert ((exact.double() - ref).abs() <= 2 ** -21 * (ref.abs() + bias)).all()
    # what the codes avoid: float32 sums of 2,304 dequantized products
    float_error = (float_path.double() - ref).abs().mean()
    assert float_error > 3 * (exact.double() - ref).abs().mean()


def test_sums_past_float32_integers_are_exact():
    torch.manual_seed(0)
    x = torch.rand(3, 8192) * 10  # 8-bit unsigned inputs (up to 255) times 8-bit weights
    model = nn.Sequential(nn.Linear(8192, 8))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.0)  # all positive: the sums grow past 2^24
    model = _calibrated(model, x, blendq.QuantPolicy(w_bits=8, a_bits=8, first_layer=8))
    layer = model[0]
    with torch.no_grad():
        out = model(x)
        xq = layer.blended_input(x)
        codes, w_scale = layer.w_quant.eval_projection(layer.latent_weight())
        sx = layer.a_quant.current_scale()
        x_codes = torch.round(xq / sx)
    exact = nn.functional.linear(x_codes.double(), codes.double())  # integers below 2^53
    assert float(exact.max()) > 2 ** 24
    assert not torch.equal(nn.functional.linear(x_codes, codes).double(), exact)  # float32
    expected = exact.float() * (sx * w_scale.reshape(1, -1)) + layer.bias.detach()
    assert torch.equal(out, expected)


def test_unbatched_inputs_and_other_convolutions():
    torch.manual_seed(0)
    for conv, shape in ((nn.Conv1d(8, 6, 3, padding=1, dilation=1), (5, 8, 12)),
                        (nn.Conv2d(8, 6, 3, padding="same", dilation=2, groups=2), (5, 8, 9, 9)),
                        (nn.Conv3d(4, 6, 3, stride=2), (5, 4, 7, 7, 7))):
        x = torch.rand(*shape)
        model = _calibrated(nn.Sequential(conv), x,
                            blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True))
        layer = model[0]
        with torch.no_grad():
            batched = model(x)
            assert layer.integer_forward(layer.blended_input(x)) is not None
            torch.testing.assert_close(batched.double(), _conv_reference(layer, x),
                                       rtol=2 ** -20, atol=1e-6)
            assert torch.equal(model(x[1]), batched[1])  # (C, ...) without the batch


def _conv_reference(layer, x: torch.Tensor) -> torch.Tensor:
    xq = layer.blended_input(x)
    codes, w_scale = layer.w_quant.eval_projection(layer.latent_weight())
    sx = layer.a_quant.current_scale().double()
    acc = type(layer)._kind.base._conv_forward(layer, torch.round(xq.double() / sx),
                                               codes.double(), None)
    view = (1, -1) + (1,) * (acc.dim() - 2)
    return acc * (sx * w_scale.double().reshape(view)) + layer.bias.double().reshape(view)


class _StandardisedConv(nn.Conv2d):
    """A convolution that standardises its weight in ``_conv_forward``."""

    def _conv_forward(self, input, weight, bias):
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / (
            weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(input, weight, bias)


def test_a_weight_transformed_in_conv_forward_and_autocast_keep_the_float_computation():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 8, 8)
    model = _calibrated(nn.Sequential(_StandardisedConv(4, 8, 3)), x,
                        blendq.QuantPolicy(w_bits=4, a_bits=8))
    layer = model[0]
    with torch.no_grad():
        assert layer.integer_forward(layer.blended_input(x)) is None
        assert torch.equal(model(x), _StandardisedConv.forward(layer, layer.blended_input(x)))
    model = _calibrated(nn.Sequential(nn.Conv2d(4, 8, 3)), x,
                        blendq.QuantPolicy(w_bits=4, a_bits=8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # autocast's computation, as in training


def test_training_and_alpha_below_one_keep_the_float_computation():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 8, 3)), x,
                        blendq.QuantPolicy(w_bits=4, a_bits=4))
    layer = model[0]
    for training, alpha in ((True, 1.0), (False, 0.5)):
        blendq.set_alpha(model, alpha)
        model.train(training)
        with torch.no_grad():
            assert layer.integer_forward(layer.blended_input(x)) is None
    with torch.no_grad():  # evaluation at α = 0.5: the float computation
        assert torch.equal(model(x), nn.Conv2d.forward(layer, layer.blended_input(x)))
    blendq.set_alpha(model.eval(), 1.0)
    assert layer.integer_forward(layer.blended_input(x)) is not None


def test_evaluation_with_gradients_keeps_the_float_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 8, 3)), x,
                        blendq.QuantPolicy(w_bits=4, a_bits=8, act_method="ste"))
    with torch.no_grad():
        value = model(x)
    x1 = x.clone().requires_grad_()
    out = model(x1)
    assert torch.equal(out.detach(), value)
    out.square().sum().backward()
    layer = model[0]
    x2 = x.clone().requires_grad_()
    nn.Conv2d.forward(layer, layer.blended_input(x2)).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert layer.float_weight.grad is not None


def test_converted_model_and_engine_compute_what_the_alpha_one_model_computes():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    layers = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    for _ in range(5):  # a deep chain on a 4-bit grid: where float sums drift apart
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    model = _calibrated(nn.Sequential(*layers), x,
                        blendq.QuantPolicy(w_bits=4, a_bits=4, per_channel=True))
    with torch.no_grad():
        ref = model(x)
        converted = blendq.convert(copy.deepcopy(model))
        assert torch.equal(converted(x), ref)
        engine = IntegerEngine(capture(converted, x))(x)
    steps = (engine - ref.double()).abs().max() / output_step(ref)
    assert steps < 1e-3, steps  # the same codes in every layer
