"""Every registered quantization method goes through prepare -> train -> convert ->
export; a method is one object, chosen once by name."""


import pytest
import torch
from conftest import converted_and_exported, small_cnn
from torch import nn

import blendq
from blendq import methods
from blendq.export.verify import compare_logits, output_step


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_trains_converts_and_exports(tmp_path, name):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(w_bits=4, a_bits=8,
                                                           method=name, act_method=name))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    ctl = blendq.AlphaController(model, blendq.linear(0, 3))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    model.train()
    for step in range(5):
        ctl.step(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert blendq.transform.get_alpha(model) == 1.0
    ref, out = converted_and_exported(model, x, tmp_path / "m.onnx")
    assert compare_logits(name, ref, out, output_step(ref)).top1_agreement == 100.0


def test_unknown_method_is_refused_in_one_place():
    with pytest.raises(ValueError, match=r"method must be one of \('ab', 'ste', 'lsq'"):
        blendq.QuantPolicy(method="sgd")
    with pytest.raises(ValueError, match="act_method must be one of"):
        blendq.QuantPolicy(act_method="nope")
    with pytest.raises(ValueError, match="method must be one of"):
        methods.get("nope")


def test_a_new_method_is_one_class_and_its_registration():
    class Halfway(methods.StraightThrough):
        """Straight-through, but the backward signal halved (a toy method)."""

        name = "halfway"

        def mix(self, x, xq, alpha, lo=None, hi=None):
            value = super().mix(x, xq, alpha, lo, hi)
            return value.detach() + 0.5 * (value - value.detach())

    methods.register(Halfway())
    try:
        model = blendq.prepare(small_cnn(), blendq.QuantPolicy(method="halfway"))
        layer = model[0]
        assert layer.w_quant.method.name == "halfway" and float(layer.alpha) == 1.0
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        assert layer.float_weight.grad is not None
    finally:
        methods.METHODS.pop("halfway")


def test_ab_after_ste_changes_the_method_mode_not_the_spec():
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(method="ab"))
    ctl = blendq.AlphaController(model, blendq.linear(0, 1), after="ste")
    ctl.step(1)
    layer = model[0]
    assert layer.w_quant.spec.method == "ab"  # the spec is as prepared
    assert layer.w_quant.method.name == "ab" and layer.w_quant.method.gradient == "ste"
    assert blendq.summary(model)[0].method.startswith("ab")


class _HalfStraight(methods.StraightThrough):
    """A registered method with its own mix: half the straight-through gradient."""

    name = "half_ste_test"

    def mix(self, x, xq, alpha, lo=None, hi=None):
        value = super().mix(x, xq, alpha, lo, hi)
        return value.detach() + 0.5 * (value - value.detach())


def test_a_method_overriding_mix_runs_its_own_on_the_cpu(monkeypatch):
    """The CPU's straight-through fast path stands in only for Method.mix itself: a
    registered method with its own mix (here half the straight-through gradient) gets
    its own gradient there too."""
    from blendq import methods
    from blendq.quantizers import ActQuantizer, ActSpec, ActStatistics

    HalfStraight = _HalfStraight
    monkeypatch.setitem(methods.METHODS, HalfStraight.name, HalfStraight())
    grads = {}
    for name in ("ste", HalfStraight.name):
        a = ActQuantizer(ActSpec(bits=8, method=name)).train()
        ActStatistics([a])
        x = torch.rand(4, 8, 6, 6)
        a(x, torch.tensor(1.0))  # starts the EMA (quantized where its batch is)
        x = x.clone().requires_grad_()
        a(x, torch.tensor(1.0)).sum().backward()  # deferred: the CPU's path
        grads[name] = x.grad
    assert torch.equal(grads["ste"], torch.ones_like(grads["ste"]))
    assert torch.equal(grads[HalfStraight.name], torch.full_like(grads["ste"], 0.5))


@pytest.mark.parametrize("fused", ["auto", False, True])
def test_every_path_gives_a_method_its_own_value_and_gradient(fused, monkeypatch):
    """Method × path: the eager path, the CPU's straight-through node and the fused
    kernel (its math run eagerly, forced on the CPU) give each method the value and the
    gradient of its own ``mix``; the kernel is never taken for a method that defines its
    own ``mix`` (asked for, it is refused with the reason)."""
    from blendq import functional as F
    from blendq import methods
    from blendq.quantizers import ActQuantizer, ActSpec, ActStatistics

    HalfStraight = _HalfStraight
    monkeypatch.setitem(methods.METHODS, HalfStraight.name, HalfStraight())
    monkeypatch.setattr(F, "_EXECUTION", F.Execution(fused=fused))
    monkeypatch.setattr(F, "_fused_math", lambda: F._fake_quant_math)
    assert methods.get("ste").kernel == "ste" and methods.get("ab").kernel == "ab"
    assert HalfStraight().kernel is None and methods.get("lsq").kernel == "ste"
    expected = {"ste": 1.0, "ab": 0.75, HalfStraight.name: 0.5}  # at α = 0.25 for AB
    for name, slope in expected.items():
        alpha = torch.tensor(0.25 if name == "ab" else 1.0)
        for deferred in (False, True):
            a = ActQuantizer(ActSpec(bits=8, method=name, sample=None if not deferred
                                     else 16384), name="act").train()
            if deferred:
                ActStatistics([a])
            x = torch.rand(4, 8, 6, 6) * 2
            if fused is True and name == HalfStraight.name:
                with pytest.raises(ValueError, match="defines its own mix"):
                    a(x, alpha)
                continue
            a(x, alpha)  # the first batch starts the EMA
            x = x.clone().requires_grad_()
            value = a(x, alpha)
            value.sum().backward()
            scale = a.scale if not deferred else value.new_tensor(float(a.scale))
            assert torch.equal(x.grad, torch.full_like(x, slope)), (name, deferred)
            codes = torch.clamp(torch.round(x.detach() / value.new_tensor(float(scale))),
                                0, 255)
            expect = torch.lerp(x.detach(), codes * float(scale), alpha)
            assert torch.allclose(value, expect, atol=1e-6), (name, deferred)


def test_the_execution_policy_chooses_each_quantizers_path_in_one_place():
    """One policy object (no module switches): set for a block, put back after, bad
    values refused; the summary says which path each activation quantizer takes."""
    import blendq
    from blendq import functional as F
    from blendq.quantizers import ActQuantizer, ActSpec

    with pytest.raises(ValueError, match="fused must be 'auto', True or False"):
        blendq.Execution(fused="always")
    with pytest.raises(ValueError, match="cpu_native must be True or False"):
        blendq.Execution(cpu_native=1)
    with pytest.raises(ValueError, match="fused must be 'auto', True or False"):
        blendq.Execution(fused=1)
    ste, lsq = ActQuantizer(ActSpec(bits=4, method="ste")), ActQuantizer(ActSpec(method="lsq"))
    sign = ActQuantizer(ActSpec(bits=1, signed=True))
    assert F.execution() == blendq.Execution()
    assert ste.path("cpu") == "cpu-native" and ste.path("cuda") == "fused"
    assert ste.path("cpu", deferred=False) == "eager" and ste.path("cpu", torch.half) == "eager"
    assert lsq.path("cuda") == "lsq" and sign.path("cuda") == "fused-sign"
    assert sign.path("cuda", training=False) == sign.path("cpu") == "sign"
    with blendq.execution_policy(fused=True, cpu_native=False) as policy:
        assert policy == F.execution() == blendq.Execution(fused=True, cpu_native=False)
        assert ste.path("cpu") == "fused"
        with blendq.execution_policy(fused=False):
            assert ste.path("cuda") == "eager" and F.execution().cpu_native is False
    assert F.execution() == blendq.Execution()
    previous = blendq.set_execution(cpu_native=False)
    try:
        assert ste.path("cpu") == "eager"
    finally:
        blendq.set_execution(previous)
    model = blendq.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                           blendq.QuantPolicy(w_bits=4, a_bits=8, act_method="ste"))
    rows = {r.name: r for r in blendq.summary(model)}
    assert rows["0"].path == rows["2"].path == "eager"  # statistics where quantized
    assert "act path" in blendq.format_summary(model).splitlines()[0]
    blendq.AlphaController(model, blendq.constant(1.0))  # statistics deferred to a settle
    rows = {r.name: r for r in blendq.summary(model)}
    assert rows["0"].path == rows["2"].path == "cpu-native"
    with blendq.execution_policy(cpu_native=False):
        assert {r.path for r in blendq.summary(model) if r.name in ("0", "2")} == {"eager"}
