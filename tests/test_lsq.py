"""LSQ (learned step size, Esser et al. 2020): the scale is trained with LSQ's scaled
gradient; LSQ-trained models convert exactly and export."""


import pytest
import torch
from conftest import converted_and_exported, small_cnn

import blendq


def test_lsq_function_value_and_gradients():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 5.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    out = blendq.functional.lsq(x, step, bits=3, grad_scale=0.1)  # grid [-3, 3]
    assert out.tolist() == [-1.5, -0.5, 0.0, 0.5, 1.5]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # straight through inside
    # d/ds: qmin, round(v)-v inside (v = x/s), qmax; times grad_scale
    v = torch.tensor([-0.52, 0.2, 1.48])
    expected = 0.1 * (-3 + float((v.round() - v).sum()) + 3)
    assert step.grad.item() == pytest.approx(expected, abs=1e-6)


def _lsq_chain(x, step, qmin, qmax, grad_scale, alpha):
    """LSQ as separate autograd operations: the definition the one node must equal."""
    s = step.clone()
    s.register_hook(lambda g: g * grad_scale)
    c = torch.clamp(x / s, qmin, qmax)
    value = (c + (torch.round(c) - c).detach()) * s
    return value if alpha is None else torch.lerp(x, value, alpha)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [None, 1.0, 0.3])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_node_equals_the_chain_of_operations(native, dtype, alpha, per_channel):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, 4, generator=g, dtype=dtype) * 3).requires_grad_()
    step = (torch.rand(6, 1, 1, generator=g, dtype=dtype) + 0.3 if per_channel
            else torch.tensor(0.7, dtype=dtype)).requires_grad_()
    with torch.no_grad():  # values exactly on the grid's ends and on rounding midpoints
        x[0, 0, :2] = step.flatten()[0] * torch.tensor([-7.0, 7.0], dtype=dtype)
        x[1, 0, :2] = step.flatten()[-1 if per_channel else 0] * torch.tensor([0.5, 2.5])
    a = None if alpha is None else torch.tensor(alpha)
    upstream = torch.randn(6, 5, 4, generator=g, dtype=dtype)
    with blendq.functional.execution_policy(cpu_native=native):
        out = blendq.functional.lsq(x, step, bits=4, grad_scale=0.25, alpha=a)
    (out * upstream).sum().backward()
    got = x.grad.clone(), step.grad.clone()
    x.grad = step.grad = None
    ref = _lsq_chain(x, step, -7, 7, 0.25, None if a is None else a.to(dtype))
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref.detach())  # the value bit for bit
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got[0], x.grad, **tol)  # the chain multiplies by s, divides
    torch.testing.assert_close(got[1], step.grad, **tol)


def test_lsq_node_masks_in_the_dtype_it_divides_in_and_refuses_a_second_derivative():
    # float32 inputs, a float64 step: x / s is float64 and lies just past the grid's end
    below = torch.nextafter(torch.tensor(-7.0), torch.tensor(-8.0))
    x = below.repeat(3).requires_grad_()
    step = torch.full((3,), 1.00000003, dtype=torch.float64, requires_grad=True)
    blendq.functional.lsq(x, step, bits=4).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0]  # clamped: no straight-through gradient
    assert step.grad.tolist() == [-7.0, -7.0, -7.0]  # d/ds = qmin outside
    x = torch.randn(8, requires_grad=True)
    gx, = torch.autograd.grad(blendq.functional.lsq(x, torch.tensor(0.3), bits=4).square()
                              .sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("w_bits, a_bits", [(4, 8), (2, 4), (1, 8)])
def test_lsq_trains_its_steps_converts_exactly_and_exports(tmp_path, w_bits, a_bits):
    torch.manual_seed(0)
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(
        w_bits=w_bits, a_bits=a_bits, per_channel=True, method="lsq", act_method="lsq"))
    steps = [p for n, p in model.named_parameters() if n.endswith("step")]
    # a weight step and an activation step per layer, and the average pool's input site's
    assert len(steps) == 9
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    blendq.set_alpha(model, 1.0)
    model.train()
    model(x)  # the steps start at the PPQ scales
    start = [p.detach().clone() for p in steps]
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in steps)
    assert any(not torch.equal(a, b) for a, b in zip(start, steps, strict=True))  # learned
    ref, out = converted_and_exported(model, x, tmp_path / "l.onnx")
    assert float((out - ref).abs().max()) <= float(ref.abs().max()) / 127 + 1e-6


def test_lsq_run_from_the_command_line(tmp_path):
    from blendq.cli import main

    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--method", "lsq",
                 "--act-method", "lsq", "--w-bits", "4", "--a-bits", "4", "--epochs", "1",
                 "--set", 'model_args={"width": 4}', "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    assert (tmp_path / "r" / "converted.pt").exists()


def test_telemetry_in_metrics_and_plot(tmp_path):
    import json

    from blendq.cli import main
    from blendq.engine import TrainConfig, train

    cfg = TrainConfig(model="digits_cnn", data="digits", w_bits=2, a_bits=4, epochs=2,
                      device="cpu", model_args={"width": 4})
    train(cfg, tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text()
            .splitlines()]
    assert 0 < rows[0]["w_rel_dist"] < 1 and 0 <= rows[0]["act_clipped"] < 1
    assert "codes_changed" not in rows[0] and 0 <= rows[1]["codes_changed"] <= 1
    assert main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_lsq_convert_right_after_an_optimizer_step():
    torch.manual_seed(0)
    model = blendq.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                               torch.nn.Linear(8, 4)),
                           blendq.QuantPolicy(w_bits=4, a_bits=4, method="lsq",
                                              act_method="lsq"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    blendq.set_alpha(model, 1.0)
    x = torch.randn(16, 8)
    for _ in range(3):
        model.train()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # the steps move after the last forward
    with blendq.quantized(model) as alpha_one:
        ref = alpha_one(x)
    with torch.no_grad():
        assert torch.equal(blendq.convert(model)(x), ref)


def test_an_activation_step_saved_as_a_scalar_loads():
    """The activation step holds one element (FSDP2 shards no 0-d Parameter); checkpoints
    written when it was a scalar still load."""
    from blendq.quantizers import ActQuantizer, ActSpec

    q = ActQuantizer(ActSpec(bits=4, method="lsq")).train()
    q(torch.rand(4, 8), torch.tensor(1.0))
    state = q.state_dict()
    assert state["step"].shape == (1,)
    old = {**state, "step": state["step"].reshape(())}
    fresh = ActQuantizer(ActSpec(bits=4, method="lsq"))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.step, state["step"]) and fresh.current_scale().dim() == 0


def test_a_run_saved_with_scalar_activation_steps_resumes(tmp_path):
    """An engine checkpoint from before the activation step held one element (model and
    optimizer state 0-d) resumes and trains on."""
    from blendq.engine import TrainConfig, load_checkpoint, save_checkpoint, train

    cfg = TrainConfig(model="digits_cnn", model_args={"width": 8}, data="digits", epochs=2,
                      batch_size=256, w_bits=4, a_bits=4, method="lsq", act_method="lsq",
                      eval_views=False)
    out = tmp_path / "run"
    train(cfg, out, progress=False, max_steps=6)  # epoch 1 (6 steps) saved
    path = out / "checkpoint.pt"
    state = load_checkpoint(path)
    steps = [k for k in state["model"] if k.endswith("a_quant.step")]
    assert steps
    state["model"] = {k: v.reshape(()) if k in steps else v for k, v in state["model"].items()}
    for s in state["optimizer"]["state"].values():
        for key, value in list(s.items()):
            if key != "step" and torch.is_tensor(value) and value.shape == (1,):
                s[key] = value.reshape(())
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    result = train(cfg, out, resume=True, progress=False)
    assert len(result.history) == 2 and result.history[-1]["epoch"] == 2
