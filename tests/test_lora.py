"""LoRA-aware QAT: the quantizer acts on the merged weight W + s·B·A, so merge -> convert
-> export computes what was trained."""

import copy
import warnings

import pytest
import torch
from torch import nn

import blendq

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _lora(model: nn.Module, **kw) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             lora_dropout=kw.pop("lora_dropout", 0.0), **kw)
    model = peft.get_peft_model(model, config)
    for m in model.modules():  # adapters that are not zero at the start
        if hasattr(m, "lora_B") and isinstance(m.lora_B, nn.ModuleDict):
            for b in m.lora_B.values():
                nn.init.normal_(b.weight, std=0.05)
    return model


def _train(model, steps=6):
    ctl = blendq.AlphaController(model, blendq.cubic(0, steps - 1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ctl.step(step)
        ids = torch.randint(0, 64, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_quantizer_sees_the_merged_weight_and_deploys_what_was_trained(tmp_path):
    model = _lora(_llama())
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    policy = blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=32, method="ab")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's forwards do not capture with torch.fx
        model = blendq.prepare(model, policy)
    rows = blendq.summary(model)
    merged = [r for r in rows if r.fate.startswith("quantized: the merged weight")]
    assert len(merged) == 3 * 2  # q_proj, v_proj, down_proj in each of two layers
    assert not any("lora_" in r.name for r in rows if r.fate.startswith("quantized"))
    assert all(r.fate.startswith("float: LoRA adapter, trained through") for r in rows
               if "lora_" in r.name)
    _train(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())  # frozen base
    assert all(not torch.equal(after[n], p) for n, p in adapters.items())  # adapters learn
    layer = next(m for m in model.modules() if isinstance(m, blendq.layers.BlendMixin)
                 and "weight_delta" in m.__dict__)
    wrapper = layer.__dict__["weight_delta"].wrapper
    with torch.no_grad():  # what is quantized: W + s·B·A
        merged_w = layer.float_weight + wrapper.get_delta_weight("default")
    assert torch.equal(layer.latent_weight(), merged_w)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        # merge, then convert: what peft's merge_and_unload would deploy, quantized once
        merged_model = blendq.merge_lora(copy.deepcopy(model)).get_base_model()
        assert not any(blendq.layers.is_lora(m) for m in merged_model.modules())
        assert torch.equal(merged_model(input_ids=ids).logits, trained)
        converted = blendq.convert(merged_model)
        assert torch.equal(converted(input_ids=ids).logits, trained)
        # convert without merging first unwraps the adapters the same way
        assert torch.equal(blendq.convert(copy.deepcopy(model))(input_ids=ids).logits, trained)
    pytest.importorskip("onnxruntime")
    from blendq.export import export_onnx, onnx_session, run_onnx

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids).logits

    path = export_onnx(Logits(converted), tmp_path / "llama_lora.onnx", ids)
    ort = run_onnx(onnx_session(path), ids)
    step = trained.abs().max() / 127
    assert float((ort - trained).abs().max()) <= float(step)  # within one output step
    assert torch.equal(ort.argmax(-1), trained.argmax(-1))


def test_dropout_is_named_dora_refused_and_adapters_on_float_layers_stay_peft_s():
    with pytest.warns(UserWarning, match="lora_dropout is not applied"):
        blendq.prepare(_lora(_llama(), lora_dropout=0.1),
                       blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=32))
    with pytest.raises(ValueError, match="variant adapters"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blendq.prepare(_lora(_llama(), use_dora=True),
                       blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = blendq.prepare(_lora(_llama()), blendq.QuantPolicy(
            w_bits=4, a_bits=None, group_size=32, skip=("*down_proj*",)))
    rows = blendq.summary(model)
    float_adapters = [r for r in rows if "down_proj.lora_" in r.name]
    assert float_adapters and all(r.fate == "float: LoRA adapter of a layer the policy "
                                  "leaves float" for r in float_adapters)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)  # peft's own forward on the float layers


def test_peft_merge_pickle_telemetry_and_evaluation_see_the_trained_adapters(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = blendq.prepare(_lora(_llama()), blendq.QuantPolicy(
            w_bits=4, a_bits=None, group_size=32, method="ste"))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    _train(model, steps=2)
    model.eval()
    with torch.no_grad():  # evaluation after training sees the adapters as trained now
        trained = model(input_ids=ids).logits
    assert not torch.equal(trained, before)
    # telemetry projects what is deployed: the merged weight
    row, codes = blendq.transform.telemetry(model)
    layer = next(m for m in model.modules() if "weight_delta" in m.__dict__)
    name = next(n for n, m in model.named_modules() if m is layer)
    merged_codes, _ = layer.w_quant.eval_projection(layer.latent_weight())
    assert torch.equal(codes[name], merged_codes.to(codes[name].dtype))
    # gradients reach the adapters in eval mode too (no cached merged tensor there)
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.zero_grad()
    # pickled whole, and peft's own merge_and_unload deploys what was trained
    torch.save(model, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, trained)
        unloaded = copy.deepcopy(model).merge_and_unload()
        assert torch.equal(unloaded(input_ids=ids).logits, trained)


def test_lora_on_a_quantized_embedding_is_refused():
    cfg = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    model = peft.get_peft_model(_llama(), cfg)
    with pytest.raises(ValueError, match="embedding table"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=None, group_size=32,
                                                 embedding=8))
