"""What a GPU step needs, checked on the CPU: no operation that waits for the device
inside a training step, and a NaN weight still named (checked later, on the host)."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import blendq
from blendq.models import build_model

# ATen operations that copy a value to the host (a device synchronisation on a GPU), and
# lift_fresh: a tensor made from host data, which on a GPU is a copy that waits for it
SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item", "tolist",
           "allclose", "unique", "masked_select", "lift_fresh"}


def syncs_on_cuda(name: str, args, kwargs) -> bool:
    """Whether this call waits for the device on CUDA: a value copied to the host, or a
    size or check read back (repeat_interleave without ``output_size``, segment_reduce's
    length checks unless ``unsafe``). Their C++ kernels read it below this mode."""
    kwargs = kwargs or {}
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and \
            (len(args) < 2 or isinstance(args[1], torch.Tensor)):
        return kwargs.get("output_size") is None
    if name == "segment_reduce":
        return not kwargs.get("unsafe", False)
    return name in SYNCING


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if syncs_on_cuda(name, args, kwargs):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,bits", [("ab", 4), ("ste", 4), ("ab", 1)])
def test_training_steps_do_not_synchronise(method, bits, monkeypatch):
    # the CPU's straight-through fast path reads its bounds on the host (free there);
    # a GPU takes the device path, so that is the one checked. 1 bit: a BinaryNet-style
    # W1A1 network, whose sign ranges are host numbers (made into tensors on the GPU,
    # they synchronised 16 times a step on an H200)
    monkeypatch.setattr(blendq.functional, "_EXECUTION", blendq.Execution(cpu_native=False))
    torch.manual_seed(0)
    if bits == 1:
        model = blendq.prepare(build_model("binarynet", image_size=32, width=0.125),
                               blendq.QuantPolicy(w_bits=1, a_bits=1, first_layer=(1, None),
                                                  method=method))
    else:
        model = blendq.prepare(build_model("resnet50_v1", image_size=32, width=0.0625),
                               blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True,
                                                  method=method))
    controller = blendq.AlphaController(model, blendq.linear(0, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def step(i):
        controller.step(i)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(3):  # the first steps decide grids and search scales, the first
        step(i)  # grouped refresh and the first settle build their lengths: they may wait
    with CountSyncs() as counter:
        for i in range(3, 6):
            step(i)
    assert counter.seen == []


def test_nan_weight_in_training_is_named_at_the_check(images=None):
    torch.manual_seed(0)
    model = blendq.prepare(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                               torch.nn.Linear(144, 2)),
                           blendq.QuantPolicy(a_bits=8))
    x = torch.randn(2, 3, 8, 8)
    model.train()(x)
    blendq.transform.check_weights(model)  # finite: passes
    with torch.no_grad():
        model[2].float_weight[0, 0] = float("nan")
    model(x)  # no host synchronisation inside the step: it goes on
    with pytest.raises(ValueError, match=r"layer\(s\) 2"):
        blendq.transform.check_weights(model)
    blendq.transform.check_weights(model)  # the flag was cleared with the report


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_in_a_grouped_refresh_is_named(bad):
    """A group whose sums run on rows flags a layer by its rows' sums: NaN and ±inf
    reach the sum of their row; large finite weights (a float16 row of 64 at 1,500
    sums past float16's range) are not flagged."""
    torch.manual_seed(0)
    half = blendq.prepare(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                              torch.nn.Linear(64, 8)).half(),
                          blendq.QuantPolicy(w_bits=4, a_bits=None, per_channel=True))
    controller = blendq.AlphaController(half, blendq.constant(0.5))
    half.train()
    for step in range(2):
        controller.step(step)
        half(torch.randn(2, 64, dtype=torch.float16))
    assert controller.groups[0].row == 64
    with torch.no_grad():
        half[0].float_weight.fill_(1500.0)
    controller.step(2)
    blendq.transform.check_weights(half)  # finite: passes
    model = blendq.prepare(torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 8)), blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True))
    controller = blendq.AlphaController(model, blendq.constant(0.5))
    x = torch.randn(4, 16)
    model.train()
    for step in range(2):
        controller.step(step)
        model(x)
    assert controller.groups[0].row == 16 and len(controller.groups[0].quantizers) == 3
    blendq.transform.check_weights(model)
    with torch.no_grad():
        model[2].float_weight[5, 7] = bad
    controller.step(2)
    with pytest.raises(ValueError, match=r"layer\(s\) 2\b"):
        blendq.transform.check_weights(model)


@pytest.mark.parametrize("method", ["ab", "ste"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_forward_compiles_whole(method, alpha, channels_last):
    """``torch.compile(model, fullgraph=True)`` traces a prepared model in training
    without graph breaks (after the first batch, which decides the activation grids),
    also channels-last under bf16 autocast, as GPU training runs (an ``out=`` buffer in
    another memory format broke the graph at every layer there: found on an H200)."""
    import torch._dynamo
    from conftest import small_cnn

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(
        w_bits=4, a_bits=8, per_channel=True, method=method))
    # its forward hook is traced too, and its step keeps the batch norms' bias rounding
    controller = blendq.AlphaController(model, blendq.constant(alpha))
    x = torch.randn(4, 3, 8, 8)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=channels_last)
    if channels_last:
        model, x = (t.to(memory_format=torch.channels_last) for t in (model, x))
    with autocast:
        model.train()(x)
    controller.step(1)  # the batch norms' rounding is due: a traced forward leaves it be
    assert controller.bias_rounding.norms and controller.bias_rounding._due
    with autocast:
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


class CountOps(TorchDispatchMode):
    """Counts the operations that compute (a kernel launch on a GPU); views and detach
    only change metadata."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False) and func.__name__.split(".")[0] != "detach":
            self.count += 1
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _deep_mlp(depth: int, per_channel: bool):
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(16, 16), torch.nn.ReLU())]
    model = blendq.prepare(torch.nn.Sequential(*layers), blendq.QuantPolicy(
        w_bits=4, a_bits=8, per_channel=per_channel))
    controller = blendq.AlphaController(model, blendq.linear(0, 8))
    x = torch.randn(4, 16)
    model.train()
    for step in range(2):  # first projections (scale search) happen here
        controller.step(step)
        model(x).sum().backward()
    return model, controller


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_refresh_op_count_does_not_grow_with_depth(per_channel):
    counts = {}
    for depth in (10, 40):
        model, controller = _deep_mlp(depth, per_channel)
        controller.act_stats.settle()  # the last batch's activation statistics (below)
        with CountOps() as ops:
            controller.step(2)  # alpha for every layer, then one grouped weight refresh
        counts[depth] = ops.count
    assert counts[40] - counts[10] <= 4, counts
    assert counts[40] < 60  # a fixed number of whole-buffer operations


@pytest.mark.parametrize("cpu_path", [False, True])
def test_activation_statistics_op_count_does_not_grow_with_depth(cpu_path, monkeypatch):
    """A training forward keeps one sample copy per activation quantizer (on the CPU's
    straight-through path as on the device path); the settle as the forward returns
    takes all of them in a fixed number of operations."""
    monkeypatch.setattr(blendq.functional, "_EXECUTION", blendq.Execution(cpu_native=cpu_path))
    samples, sample = [], blendq.functional.strided_sample

    def counted(x, n):
        samples.append(n)
        return sample(x, n)

    monkeypatch.setattr(blendq.functional, "strided_sample", counted)
    forward, settle = {}, {}
    for depth in (10, 40):
        model, controller = _deep_mlp(depth, per_channel=True)
        controller.step(2)
        model._forward_hooks.clear()  # keep the samples past the forward, to count them
        x = torch.randn(4, 16)
        samples.clear()
        with CountOps() as ops:
            model(x)
        forward[depth] = len(samples)
        assert all(a._pending is not None for a in blendq.transform._act_quantizers(model))
        with CountOps() as ops:
            controller.act_stats.settle()
        settle[depth] = ops.count
        assert "_local_scalar_dense" not in ops.names and "item" not in ops.names
    assert forward == {10: 10, 40: 40}
    assert settle[40] == settle[10] < 130, settle  # two grids (signed input, unsigned rest)


def test_grouped_refresh_equals_per_layer_projection():
    model, controller = _deep_mlp(6, per_channel=True)
    assert len(controller.groups) == 1 and len(controller.groups[0].quantizers) == 6
    controller.step(2)
    for m in model.modules():
        if isinstance(m, blendq.layers.BlendMixin):
            q = m.w_quant
            codes, scale = blendq.functional.ppq(
                m.float_weight.detach(), 4, axis=0, max_iter=q.spec.max_iter,
                scale=q.scale.clone(), fixed=True)  # the group wrote q.scale in place
            grouped = q.scale * q.codes
            torch.testing.assert_close(grouped, scale * codes, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("mid", [8, 6])
def test_grouped_refresh_covers_axis_1_layouts_and_blocks(group_size, mid):
    """Output channels on axis 1 (transposed convolutions; Hugging Face Conv1D) and block
    scales refresh in the one PPQ too, and land where each layer's own projection from
    the same warm start would. ``mid=6``: the second layer's runs of weights (54 per
    channel; blocks of 16 and 6) do not divide into rows of 8, so it projects apart
    from the group, whose sums run on rows."""
    F = blendq.functional
    torch.manual_seed(0)
    model = blendq.prepare(torch.nn.Sequential(
        torch.nn.ConvTranspose2d(8, mid, 3), torch.nn.ConvTranspose2d(mid, 5, 3),
        torch.nn.Flatten(), torch.nn.Linear(5 * 8 * 8, 40)),
        blendq.QuantPolicy(w_bits=4, a_bits=None, per_channel=True, group_size=group_size))
    controller = blendq.AlphaController(model, blendq.linear(0, 4))
    x = torch.randn(2, 8, 4, 4)
    model.train()
    for step in range(2):
        controller.step(step)
        model(x).sum().backward()
    layers = [m for m in model.modules() if isinstance(m, blendq.layers.BlendMixin)]
    if mid == 6:
        layers = [layers[0], layers[2]]
    assert len(controller.groups) == 1 and \
        controller.groups[0].quantizers == [m.w_quant for m in layers]
    assert controller.groups[0].row == 8  # 72 weights a channel (blocks of 16 and 8)
    warm = [m.w_quant.scale.clone() for m in layers]
    controller.step(2)
    for m, start in zip(layers, warm, strict=True):
        q, w = m.w_quant, m.float_weight.detach()
        if group_size is None:
            codes, scale = F.ppq(w, 4, axis=q.axis, max_iter=q.spec.max_iter, scale=start,
                                 fixed=True)
        else:
            codes, scale = F.ppq(F.to_blocks(w, q.axis, group_size), 4, axis=0,
                                 max_iter=q.spec.max_iter, scale=start.reshape(-1, 1),
                                 fixed=True)
            codes = F.from_blocks(codes, tuple(w.shape), q.axis, group_size)
            scale = scale.reshape(start.shape)
        assert q.grouped and q.codes.shape == w.shape
        torch.testing.assert_close(q.per_element(q.scale, tuple(w.shape)) * q.codes,
                                   q.per_element(scale, tuple(w.shape)) * codes,
                                   rtol=1e-5, atol=1e-6)


def _fake_quant_both(x, alpha, bits, signed, method):
    """``fake_quantize`` eagerly and through the fused operator: values, grads, counts."""
    scale = torch.tensor(0.37)
    out = []
    for fused in (False, True):
        xx = x.clone().requires_grad_()
        value, clipped = blendq.functional.fake_quantize(
            xx, scale, torch.tensor(alpha), bits, signed, method, fused=fused)
        if fused:  # the quantizer's form: counted in place, with the batch's size
            counters = (torch.zeros((), dtype=torch.float64), torch.zeros(()))
            blendq.functional.fused_fake_quantize(x, scale, torch.tensor(alpha), bits,
                                                  signed, method, counters=counters)
            assert torch.equal(counters[0], clipped) and counters[1] == x.numel()
        value.backward(torch.linspace(-1, 1, value.numel()).reshape(value.shape))
        out.append((value.detach(), xx.grad, clipped))
    return out


@pytest.mark.parametrize(("bits", "signed", "method"), [(4, False, "ste"), (3, True, "ab")])
def test_fused_activation_quantization_equals_the_eager_math(bits, signed, method):
    # the fused operator (one operation each way) against the eager path, and the
    # compiled kernel (what CUDA runs) against the same math run eagerly: the codes, the
    # straight-through mask and the clip count exactly, the value exactly at α = 1 (what
    # is deployed) and within one rounding of the blend below it
    torch.manual_seed(0)
    qmin, qmax = blendq.functional.grid(bits, signed)
    x = torch.randn(3, 5, 7, 4) * 2
    x.view(-1)[:4] = torch.tensor([qmax + 0.5, qmin - 0.5, 2.5, qmax + 0.5001]) * 0.37
    for alpha in (1.0, 0.6):
        (v0, g0, c0), (v1, g1, c1) = _fake_quant_both(x, alpha, bits, signed, method)
        assert torch.equal(v0, v1) and torch.equal(g0, g1) and torch.equal(c0, c1) and c0 > 0
        args = (x, torch.tensor(0.37), torch.tensor(alpha), qmin, qmax, method == "ste")
        (v0, m0, c0), (v1, m1, c1) = (blendq.functional._fake_quant_math(*args),
                                      blendq.functional._fused_math()(*args))
        assert torch.equal(c0, c1) and (m0 is None or torch.equal(m0, m1))
        if alpha == 1.0:
            assert torch.equal(v0, v1)
        else:
            torch.testing.assert_close(v1, v0, rtol=2.4e-7, atol=0)


def test_fused_activation_quantization_saves_one_byte_per_element_at_most():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    for method in ("ste", "ab"):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            blendq.functional.fake_quantize(x, torch.tensor(0.1), torch.tensor(0.5), 4, True,
                                            method, fused=False)
        per_element = sum(t.numel() * t.element_size() for t in saved) / x.numel()
        assert per_element <= (1.0 if method == "ste" else 0.01)
        assert all(not t.is_floating_point() or t.numel() == 1 for t in saved)


@pytest.mark.parametrize(("method", "alpha"), [("ste", 1.0), ("ab", 0.5), ("ab", 1.0)])
def test_fused_path_trains_a_model_as_the_eager_path_does(method, alpha, monkeypatch):
    # the layer-level switch: the same model and batch, eager path against the fused
    # operators (activations and weights; their math run eagerly here: the kernel itself
    # is compared above), bit for bit: loss, every gradient, the clip counters
    def step(fused):
        monkeypatch.setattr(blendq.functional, "_EXECUTION", blendq.Execution(
            fused=fused, cpu_native=False))
        torch.manual_seed(0)
        model = blendq.prepare(build_model("fmnist_cnn", in_channels=1, width=8),
                               blendq.QuantPolicy(w_bits=4, a_bits=4, method=method))
        blendq.set_alpha(model, alpha)
        model.train()
        paths = {m.w_quant.fuses(m.float_weight) for m in model.modules()
                 if isinstance(m, blendq.layers.BlendMixin)}
        assert paths == {fused}  # every weight on the path asked for
        for q in blendq.transform._act_quantizers(model):  # the kernel counts all inputs
            q.spec = dataclasses.replace(q.spec, sample=None)
        x = torch.randn(8, 1, 28, 28)
        loss = model(x).square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        quant = [m for m in model.modules() if isinstance(m, blendq.quantizers.ActQuantizer)]
        return loss.detach(), grads, [(q.clipped.clone(), q.seen.clone()) for q in quant]

    loss0, grads0, counts0 = step(False)
    loss1, grads1, counts1 = step(True)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(counts0, counts1, strict=True))


@pytest.mark.parametrize("method", ["ab", "ste"])
def test_compiled_training_step_does_not_recompile_over_an_alpha_ramp_and_refreshes(method):
    """The compiled training step (forward and backward) over α rising every step and
    weight refreshes every ``quant_every`` steps: after warm-up (the first, eager, batch
    decides the activation grids; then one graph per refresh state) no recompile and no
    graph break, which is what CUDA graphs (``mode="reduce-overhead"``) need. Checked
    with dynamo's own counters and ``error_on_recompile`` (backend ``aot_eager``: the
    guards are dynamo's, whatever the backend)."""
    import torch._dynamo
    from conftest import small_cnn
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(
        w_bits=4, a_bits=8, per_channel=True, method=method, quant_every=3))
    steps = 12
    controller = blendq.AlphaController(model, blendq.cubic(0, steps - 1))
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    alphas, graphs = [], None
    for step in range(steps):
        alphas.append(controller.step(step))
        if step == 6:  # warmed up: every refresh state seen twice; from here none compiles
            graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=step >= 6):
            loss = torch.nn.functional.cross_entropy((model if step == 0 else compiled)(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warm-up
    assert not counters["graph_break"], dict(counters["graph_break"])
    if method == "ab":
        assert alphas[1] < alphas[5] < alphas[-1] == 1.0  # α rose through the compiled steps


class _AllOps(TorchDispatchMode):
    """Every operation dispatched, views included (what ``benchmarks/gpu_step.py``
    counts on a CPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _step_ops(depth: int, method: str | None) -> int:
    """Operations in one whole training step (controller, forward, backward, optimizer)
    of a ``depth``-layer MLP with biases, quantized W4A8 per channel by ``method``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(depth)
                                  for m in (torch.nn.Linear(16, 16), torch.nn.ReLU())])
    controller = None
    if method is not None:
        model = blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True,
                                                         method=method))
        controller = blendq.AlphaController(model, blendq.linear(0, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 16)

    def step(i):
        if controller is not None:
            controller.step(i)
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    for i in range(3):  # grids decided, scales searched, the group and settle bound
        step(i)
    with _AllOps() as ops:
        step(3)
    return ops.count


@pytest.mark.parametrize(("method", "per_layer"), [("ab", 6), ("ste", 4)])
def test_step_op_count_grows_by_a_small_constant_per_quantized_layer(method, per_layer,
                                                                    monkeypatch):
    """The GPU code path (the fused operators, forced on the CPU): each added quantized
    layer adds the plain layer's operations and ``per_layer`` more: the activation's
    one each way, the weight's and the rounded bias's one forward (and, for AB, one
    backward each: ``(1 - α)·grad``); refreshes and statistics stay whole-buffer."""
    monkeypatch.setattr(blendq.functional, "_EXECUTION", blendq.Execution(fused=True))
    plain = _step_ops(20, None) - _step_ops(10, None)
    quantized = _step_ops(20, method) - _step_ops(10, method)
    assert quantized - plain == 10 * per_layer, (quantized, plain)


@pytest.mark.parametrize(("net", "policy"), [
    ("binarynet", dict(w_bits=1, a_bits=1, first_layer=(1, None), method="ab")),
    ("binarynet", dict(w_bits=1, a_bits=1, first_layer=(1, None), method="ste")),
    ("fmnist_cnn", dict(w_bits=4, a_bits=4, per_channel=True, method="ste", scale="minmax")),
])
def test_fused_layers_projected_alone_train_as_the_eager_path(net, policy, monkeypatch):
    """Sign activations (the EMA of the batch's mean magnitude, the value, the mask) and
    weights projected alone (sign, min/max ranges) on the fused path: several training
    steps under a controller equal the eager path's bit for bit (losses, parameters,
    every buffer)."""
    def run(fused):
        monkeypatch.setattr(blendq.functional, "_EXECUTION", blendq.Execution(
            fused=fused, cpu_native=False))
        torch.manual_seed(0)
        kwargs = dict(image_size=32, width=0.125) if net == "binarynet" else \
            dict(in_channels=1, width=8)
        model = blendq.prepare(build_model(net, **kwargs), blendq.QuantPolicy(**policy))
        controller = blendq.AlphaController(model, blendq.linear(0, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        side, channels = (32, 3) if net == "binarynet" else (28, 1)
        losses = []
        for step in range(4):
            controller.step(step)
            x = torch.randn(8, channels, side, side, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if fused:
            paths = {a.path("cpu", training=True) for a in
                     blendq.transform._act_quantizers(model)}
            assert ("fused-sign" if net == "binarynet" else "fused") in paths
        return losses, model.state_dict()

    (loss0, state0), (loss1, state1) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(loss0, loss1, strict=True))
    assert state0.keys() == state1.keys()
    assert all(torch.equal(state0[k], state1[k]) for k in state0), \
        [k for k in state0 if not torch.equal(state0[k], state1[k])]
