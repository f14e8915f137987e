"""Min/max scales (the paper's TF baseline) and post-training quantization (calibrate)."""

import copy

import pytest
import torch
from conftest import converted_and_exported, small_cnn
from torch import nn

import blendq
from blendq import functional as F
from blendq.quantizers import WeightGroup
from blendq.transform import _act_quantizers, blend_layers


def _trained_float(seed: int = 0) -> nn.Module:
    """``small_cnn`` with batch-norm statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = small_cnn()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def test_minmax_maps_the_largest_magnitude_onto_the_top_code():
    x = torch.tensor([[-3.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.2, -0.1, 0.7]])
    codes, scale = F.minmax(x, 4, axis=0)
    assert torch.allclose(scale.flatten(), torch.tensor([3 / 7, 1.0, 0.7 / 7]))
    assert codes[0, 0] == -7 and codes[2, 2] == 7 and codes.abs().max() == 7  # nothing clips
    codes, scale = F.minmax(torch.tensor([-5.0, 0.0, 2.55]), 8, signed=False)
    assert torch.isclose(scale, torch.tensor(0.01)).all() and codes.tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="scale must be one of"):
        blendq.QuantPolicy(scale="mse")


def test_minmax_policy_takes_weight_and_activation_ranges_from_their_extremes():
    model = blendq.prepare(_trained_float().train(), blendq.QuantPolicy(
        w_bits=4, a_bits=8, per_channel=True, method="ste", scale="minmax"))
    x = torch.randn(8, 3, 8, 8)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
             for n, m in blend_layers(model)]
    model(x)
    for h in hooks:
        h.remove()
    first = dict(blend_layers(model))["0"]
    # the first layer's weight (batch norm folded in) per channel onto ±7
    w = first.w_quant.codes * first.w_quant.scale
    assert first.w_quant.codes.abs().amax((1, 2, 3)).eq(7).all()
    assert torch.allclose(first.w_quant.scale.flatten(),
                          w.abs().amax((1, 2, 3)) / 7)
    # an activation's first EMA value is the batch's range onto the grid's top code
    last = dict(blend_layers(model))["10"]
    peak = seen["10"].clamp_min(0).amax() if not last.a_quant.is_signed else seen["10"].abs().amax()
    qmax = 255 if not last.a_quant.is_signed else 127
    assert torch.isclose(last.a_quant.scale, peak / qmax)
    assert all(WeightGroup.key(m.w_quant) is None for _, m in blend_layers(model))


@pytest.mark.parametrize("scale", ["ppq", "minmax"])
@pytest.mark.parametrize("method", ["ab", "ste", "lsq"])
def test_calibrated_model_converts_exports_and_computes_what_it_calibrated(scale, method,
                                                                          tmp_path):
    float_model = _trained_float()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref_float = float_model(x)
    model = blendq.prepare(copy.deepcopy(float_model), blendq.QuantPolicy(
        w_bits=8, a_bits=8, per_channel=True, method=method,
        act_method="lsq" if method == "lsq" else "ste", scale=scale))
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bn]
    batches = [(torch.randn(8, 3, 8, 8), torch.zeros(8)) for _ in range(3)]
    assert blendq.calibrate(model, batches) == 3
    assert not model.training and blendq.transform.get_alpha(model) == 1.0
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bn, stats, strict=True))
    ref, ort = converted_and_exported(model, x, tmp_path / "ptq.onnx")
    step = ref.abs().max() / 127
    assert (ref - ort).abs().max() <= step  # the deployed model computes the calibrated one
    assert (ref - ref_float).abs().max() < 0.1 * ref_float.abs().max()  # 8 bits: close


def test_activation_scales_are_the_batches_mean_ppq_or_largest_range():
    batches = [torch.randn(8, 3, 8, 8) * s for s in (0.5, 1.0, 2.0)]
    scales = {}
    for scale in ("ppq", "minmax"):
        model = blendq.prepare(_trained_float(), blendq.QuantPolicy(
            w_bits=8, a_bits=8, method="ste", placement="layers", scale=scale))
        first = _act_quantizers(model)[0]  # the first layer's input: the batch itself
        blendq.calibrate(model, batches)
        grid_top = 127
        if scale == "minmax":
            expected = max(float(b.abs().max()) for b in batches) / grid_top
        else:
            expected = sum(float(F.ppq(F.strided_sample(b, first.spec.sample), 8,
                                       max_iter=first.spec.max_iter, fixed=True,
                                       full=True)[1]) for b in batches) / len(batches)
        assert float(first.scale) == pytest.approx(expected, rel=1e-5)
        scales[scale] = float(first.scale)
    assert scales["minmax"] > scales["ppq"]  # PPQ clips the tails min/max keeps


@pytest.mark.parametrize("method", ["ab", "lsq"])
def test_calibrate_refuses_what_it_cannot_calibrate(method):
    model = blendq.prepare(_trained_float().train(), blendq.QuantPolicy(
        w_bits=4, a_bits=8, method=method, act_method="lsq" if method == "lsq" else "ste"))
    with pytest.raises(ValueError, match="at least one batch"):
        blendq.calibrate(model, [])
    model(torch.randn(2, 3, 8, 8))  # training state a failed calibration must keep
    state = copy.deepcopy(model.state_dict())
    good, bad = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)
    with pytest.raises(ValueError, match=r"batch 2 \(\(2, 5, 8, 8\)\) does not fit"):
        blendq.calibrate(model, [good, bad])
    assert model.training  # modes, α and scales put back after a failed calibration
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # LSQ's steps too
    with pytest.raises(ValueError, match="call blendq.prepare"):
        blendq.calibrate(small_cnn(), [torch.randn(2, 3, 8, 8)])
    # keyword batches and a custom forward
    blendq.calibrate(model, [{"input": torch.randn(2, 3, 8, 8)}])
    calls = []
    blendq.calibrate(model, [torch.randn(2, 3, 8, 8)],
                     forward=lambda m, b: calls.append(m(b)))
    assert len(calls) == 1
