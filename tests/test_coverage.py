"""Every weight layer users' architectures hold is quantized, keeps its own computation,
converts exactly and exports; the summary names the fate of every weight-holding module."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import blendq
from blendq.export import IntegerEngine, capture, export_onnx, onnx_session, run_onnx


class SameConv(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'same' padding applied before the convolution."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = TF.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return TF.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight standardised per output channel in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return TF.conv2d(x, w, self.bias, self.stride, self.padding)


class CastLinear(nn.Linear):
    """timm's Linear: casts the weight to the input's dtype in forward."""

    def forward(self, x):
        return TF.linear(x, self.weight.to(x.dtype), self.bias)


class Zoo(nn.Module):
    """One of each: Conv1d, Conv3d, ConvTranspose1d/2d, subclasses with their own
    forward, nn.MultiheadAttention, an embedding, a batch norm and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 3 * 4 * 4)
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.same = SameConv(12, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.t2 = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.std = StdConv(4, 4, 3, padding=1)
        self.head = CastLinear(4, 5)

    def forward(self, tokens):
        x = self.emb(tokens)  # (B, T, 8)
        x = self.t1(self.c1(x.transpose(1, 2))).transpose(1, 2)  # (B, 2T, 8)
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + a).mean(1)  # (B, 8)
        v = self.up(x).reshape(-1, 1, 3, 4, 4)  # (B, 1, 3, 4, 4)
        v = self.c3(v).reshape(-1, 12, 4, 4)  # (B, 12, 4, 4)
        y = torch.relu(self.bn(self.same(v)))  # (B, 8, 2, 2)
        y = self.std(torch.relu(self.t2(y)))  # (B, 4, 4, 4)
        return self.head(y.mean((2, 3)))


WEIGHT_LAYERS = ["emb", "c1", "t1", "attn", "attn.out_proj", "up", "c3", "same", "t2", "std",
                 "head"]


def _tokens(n=16, seed=0):
    return torch.randint(0, 20, (n, 6), generator=torch.Generator().manual_seed(seed))


def _prepared(w_bits=4, a_bits=8, per_channel=True, embedding=4):
    torch.manual_seed(0)
    float_model = Zoo()
    model = blendq.prepare(copy.deepcopy(float_model), blendq.QuantPolicy(
        w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, embedding=embedding))
    return float_model, model


def test_every_weight_layer_is_quantized_and_listed():
    _, model = _prepared()
    rows = {r.name: r for r in blendq.summary(model)}
    assert [n for n, r in rows.items() if r.fate == "quantized"] == WEIGHT_LAYERS
    assert rows["norm"].fate.startswith("float: normalisation")
    assert rows["bn"].fate.startswith("float: normalisation")
    assert rows["emb"].a_bits is None and rows["attn.out_proj"].a_bits is None
    assert rows["attn"].a_bits == 8 and rows["head"].a_bits == 8
    _, floats = _prepared(embedding=None)
    assert {r.name: r.fate for r in blendq.summary(floats)}["emb"] == "float (policy)"


def test_unsupported_weight_layers_are_listed_with_the_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
            self.scale = nn.Parameter(torch.ones(8))
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x * self.scale)

    rows = {r.name: r.fate for r in blendq.summary(blendq.prepare(Odd(), blendq.QuantPolicy()))}
    assert rows["cross"] == "float: separate q/k/v projection weights (kdim or vdim != " \
                            "embed_dim) (holds q_proj_weight, k_proj_weight, v_proj_weight, " \
                            "in_proj_bias)"
    assert rows[""].startswith("float: not a Linear") and "scale" in rows[""]
    assert rows["fc"] == "quantized" and rows["cross.out_proj"] == "quantized"


def test_alpha_zero_is_the_float_model_bit_for_bit():
    float_model, model = _prepared()
    x = _tokens()
    with torch.no_grad():
        blendq.set_alpha(model, 0.0)
        # in training (batch statistics, activation scales calibrated) and in evaluation
        assert torch.equal(model.train()(x), float_model.train()(x))
        assert torch.equal(model.eval()(x), float_model.eval()(x))


def test_subclass_computation_is_kept_at_alpha_one():
    """At alpha = 1 each layer runs its own forward on the quantized weight."""
    _, model = _prepared(a_bits=None)
    blendq.set_alpha(model.eval(), 1.0)
    std = model.std
    x = torch.randn(2, 4, 4, 4)
    w = std.blended_weight()
    w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    with torch.no_grad():
        assert torch.equal(std(x), TF.conv2d(x, w, std.bias, 1, 1))
        same = model.same
        assert same(torch.randn(2, 12, 5, 5)).shape == (2, 8, 3, 3)  # 'same' padding kept


@pytest.mark.parametrize("per_channel", [False, True])
def test_convert_is_alpha_one_and_exports(tmp_path, per_channel):
    _, model = _prepared(per_channel=per_channel)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for step, alpha in enumerate((0.5, 1.0, 1.0)):
        blendq.set_alpha(model, alpha)
        loss = model(_tokens(16, step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = _tokens(64, 9)
    with blendq.quantized(model) as alpha_one:
        ref = alpha_one(x)
    converted = blendq.convert(model)
    with torch.no_grad():
        assert torch.equal(converted(x), ref)
    step = float(ref.abs().max()) / 127
    engine = IntegerEngine(capture(converted, x))
    assert float((engine(x) - ref).abs().max()) <= step
    assert engine.integer_layers >= 5  # c1, t1, up, c3, same, t2, head: integer cores
    out = run_onnx(onnx_session(export_onnx(converted, tmp_path / "z.onnx", x)), x)
    assert float((out - ref).abs().max()) <= step
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_hugging_face_conv1d_is_quantized_along_its_output_axis():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(6, 4)  # weight (in=4, out=6)
    model = blendq.prepare(nn.Sequential(conv), blendq.QuantPolicy(w_bits=4, a_bits=None,
                                                                   per_channel=True))
    assert model[0].w_quant.scale.shape == (1, 6)
    blendq.set_alpha(model.eval(), 1.0)
    x = torch.randn(3, 4)
    codes, scale = model[0].w_quant.eval_projection(model[0].float_weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (scale * codes) + conv.bias)


def test_prepared_state_dict_is_at_most_one_tenth_larger():
    float_model, model = _prepared()
    model.train()(_tokens())

    def size(m):
        return sum(t.numel() * t.element_size() for t in m.state_dict().values())

    assert size(model) <= 1.1 * size(float_model)
    assert set(float_model.state_dict()) <= set(model.state_dict())  # the float keys kept


def test_prepared_and_converted_models_pickle(tmp_path):
    """torch.save of a whole model: the generated layer classes pickle by their float
    class and kind (a subclass's class is made again on load)."""
    _, model = _prepared()
    x = _tokens()
    model.train()(x)
    blendq.set_alpha(model.eval(), 1.0)
    for m in (model, blendq.convert(model)):
        torch.save(m, tmp_path / "m.pt")
        again = torch.load(tmp_path / "m.pt", weights_only=False)
        with torch.no_grad():
            assert torch.equal(again(x), m(x))
        assert type(again.same).__name__ == type(m.same).__name__
