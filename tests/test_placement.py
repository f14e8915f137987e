"""Quantization sites apart from weight layers: found in the user's own forward, trained,
converted and exported so that ONNX Runtime runs every convolution and add in int8."""

import copy
import warnings

import pytest
import torch
from torch import nn

import blendq
from blendq.converted import QuantSite
from blendq.export import export_onnx, fused_ops, onnx_session, run_onnx
from blendq.export.verify import compare_logits, output_step
from blendq.layers import BlendSite
from blendq.placement import sites


class Block(nn.Module):
    """Written as users write it: ``out += identity`` inside forward, a strided 1x1
    downsample, and a concatenation branch."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout // 2, 3, 1, 1, bias=False)
        self.conv3 = nn.Conv2d(cout, cout // 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = torch.cat([self.conv2(out), self.conv3(out)], 1)
        out = self.bn2(out)
        out += identity
        return self.relu(out)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _trained(policy, steps=3):
    torch.manual_seed(0)
    model = blendq.prepare(Net(), policy)
    x = torch.randn(16, 3, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        blendq.set_alpha(model, step / (steps - 1))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    blendq.set_alpha(model.eval(), 1.0)
    return model, x


def test_sites_sit_on_add_cat_and_pool_inputs_of_the_users_forward():
    model, _ = _trained(blendq.QuantPolicy(w_bits=8, a_bits=8, per_channel=True))
    names = [n for n, _ in sites(model)]
    # each block: the add's two inputs (or the shared input), the cat's two inputs
    assert "blocks.0.quant_sites.bn2" in names and "blocks.1.quant_sites.down" in names
    assert "blocks.0.quant_sites.conv2" in names and "blocks.0.quant_sites.conv3" in names
    assert "quant_sites.blocks" in names  # the average pool's input, in the root forward
    assert isinstance(model.blocks[0], Block)  # the module keeps its class and keys
    block = model.blocks[0]  # x feeds conv1 and the add: one site, conv1 shares its scale
    assert block.conv1.input_from_site and block.conv1.a_quant is block.quant_sites.x.a_quant


def test_alpha_zero_is_the_float_model_bit_for_bit():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 3, 16, 16)
    prepared = blendq.prepare(copy.deepcopy(net), blendq.QuantPolicy(w_bits=4, a_bits=8))
    with torch.no_grad():  # a training forward each (batch statistics), then evaluation
        assert torch.equal(prepared.train()(x), net.train()(x))
        assert torch.equal(prepared.eval()(x), net.eval()(x))


def test_sites_follow_alpha_and_convert_reproduces_alpha_one():
    model, x = _trained(blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True))
    assert all(float(s.alpha) == 1.0 for _, s in sites(model))
    with torch.no_grad():
        ref = model(x)
        converted = blendq.convert(model)
        assert torch.equal(converted(x), ref)
    assert all(isinstance(s, QuantSite) for _, s in sites(converted))
    assert len(sites(converted)) == len(sites(model))


@pytest.mark.parametrize("a_bits", [8, 4])
def test_onnx_runtime_runs_every_conv_and_add_in_int8(tmp_path, a_bits):
    # at 4 bits the grid's clamp (a float Clip before each QuantizeLinear in the
    # exporter's graph) moves onto the uint8 codes, else ORT ran those convolutions in
    # float on dequantized values (FusedConv)
    pytest.importorskip("onnxruntime")
    model, x = _trained(blendq.QuantPolicy(w_bits=8, a_bits=a_bits, per_channel=True))
    converted = blendq.convert(model)
    path = export_onnx(converted, tmp_path / "m.onnx", x)
    session = onnx_session(path, optimized_path=tmp_path / "opt.onnx")
    ops = fused_ops(tmp_path / "opt.onnx")
    convs = sum(isinstance(m, nn.Conv2d) for m in Net().modules())
    assert ops.get("QLinearConv") == convs and ops.get("QLinearAdd") == 3
    # (the concatenations feed a batch norm that no convolution precedes: it stays float)
    assert "Conv" not in ops and "FusedConv" not in ops
    ref = converted(x).detach()
    out = run_onnx(session, x)
    # within one output step, but for a rounding tie, which the order of a float sum
    # decides (thread count, CPU): it may move a single image a few steps
    step = output_step(ref)
    per_image = (out - ref).abs().amax(1) / step
    assert int((per_image > 1).sum()) <= 1 and float(per_image.max()) <= 4
    assert compare_logits("ort", ref, out, step).top1_agreement == 100.0


def test_layer_placement_keeps_residual_branches_float(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _trained(blendq.QuantPolicy(w_bits=8, a_bits=8, per_channel=True,
                                           placement="layers"))
    assert sites(model) == []
    path = export_onnx(blendq.convert(model), tmp_path / "m.onnx", x)
    onnx_session(path, optimized_path=tmp_path / "opt.onnx")
    assert fused_ops(tmp_path / "opt.onnx").get("QLinearAdd", 0) == 0


def test_a_forward_that_cannot_be_captured_is_named_and_keeps_its_forward():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot capture it
                return x + self.conv(x)
            return self.conv(x)

    with pytest.warns(UserWarning, match=r"could not be captured.*<root> \(Dynamic"):
        model = blendq.prepare(Dynamic(), blendq.QuantPolicy())
    assert sites(model) == []
    assert type(model).forward is Dynamic.forward


def test_a_forward_reading_self_training_is_not_rewritten():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y + x if self.training else y + 2 * x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = blendq.prepare(Drop(), blendq.QuantPolicy())
    assert any("self.training" in str(w.message) for w in caught)
    assert sites(model) == []


def test_bad_placement_is_refused():
    with pytest.raises(ValueError, match="placement must be one of"):
        blendq.QuantPolicy(placement="everywhere")
    with pytest.raises(ValueError, match="site_bits"):
        blendq.QuantPolicy(site_bits=9)


def test_sited_models_pickle_and_copy(tmp_path):
    model, x = _trained(blendq.QuantPolicy(w_bits=4, a_bits=8))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(copy.deepcopy(model)(x), model(x))
    assert isinstance(loaded.blocks[0].quant_sites.x, BlendSite)


def test_an_attention_mask_add_is_not_a_site_the_residual_add_is():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, mask):
            scores = self.q(x) @ self.k(x).transpose(-1, -2) + mask  # -inf where masked
            return x + self.o(scores.softmax(-1) @ x)

    model = blendq.prepare(Attention(), blendq.QuantPolicy())
    assert sorted(n for n, _ in sites(model)) == ["quant_sites.o", "quant_sites.x"]
    mask = torch.zeros(2, 4, 4)
    mask[:, :, -1] = float("-inf")
    model.train()(torch.randn(2, 4, 8), mask)
    assert torch.isfinite(model.eval()(torch.randn(2, 4, 8), mask)).all()


def test_forwards_that_capture_would_freeze_are_left_alone_and_modes_kept():
    class Drop(nn.Module):  # self.training passed as an argument
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + nn.functional.dropout(self.fc(x), 0.5, self.training)

    class KeywordMask(nn.Module):  # a keyword-only optional argument branched on
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, *, mask=None):
            y = self.fc(x)
            return x + (y if mask is None else y * mask)

    for cls in (Drop, KeywordMask):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            model = blendq.prepare(cls(), blendq.QuantPolicy())
        assert sites(model) == [] and type(model).forward is cls.forward
    net = Net().train()
    net.blocks[0].bn1.eval()  # a frozen batch norm stays frozen through prepare
    model = blendq.prepare(net, blendq.QuantPolicy())
    assert not model.blocks[0].bn1.training and model.blocks[0].bn2.training


def test_a_site_named_like_a_module_dict_method_is_placed():
    class Values(nn.Module):
        def __init__(self):
            super().__init__()
            self.values = nn.Linear(4, 4)

        def forward(self, x):
            return self.values(x) + x

    model = blendq.prepare(Values(), blendq.QuantPolicy())
    assert "quant_sites.values_" in [n for n, _ in sites(model)]
    model(torch.randn(2, 4))
