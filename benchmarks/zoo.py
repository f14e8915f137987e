"""Architectures nobody here wrote, end to end: prepare -> train to alpha = 1 -> convert ->
export -> ONNX Runtime and the integer engine against the alpha = 1 model.

Hugging Face ``transformers`` classes are built from small configs with random weights
(no downloads); timm models are added where ``import timm`` works. For each model:
W4A8 per-channel AB, a few SGD steps on random inputs with alpha rising to 1, then
64 inputs through the alpha = 1 model, the converted model, the integer engine and
ONNX Runtime (int8 kernels). ``tests/test_zoo.py`` runs the same function.

    python benchmarks/zoo.py [--only NAME ...] [--json rows.json] [--speed]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import blendq
from blendq.export import (
    IntegerEngine,
    capture,
    first_tensor,
    fused_ops,
    onnx_session,
    run_onnx,
    to_onnx,
)
from blendq.export.verify import compare_logits, output_step

IMAGE = (3, 32, 32)
TOKENS = 16
VOCAB = 100


class Logits(nn.Module):
    """A Hugging Face model returning its logits tensor (what a user deploys)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


def _hf(name: str) -> tuple[nn.Module, str]:
    import transformers as tf

    small = {"num_labels": 10}
    if name == "resnet":
        cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                              layer_type="basic", **small)
        return Logits(tf.ResNetForImageClassification(cfg), "pixel_values"), "image"
    if name == "mobilenet_v2":
        cfg = tf.MobileNetV2Config(depth_multiplier=0.25, image_size=32, **small)
        return Logits(tf.MobileNetV2ForImageClassification(cfg), "pixel_values"), "image"
    if name == "efficientnet":
        cfg = tf.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.2,
                                    image_size=32, hidden_dim=320, **small)
        return Logits(tf.EfficientNetForImageClassification(cfg), "pixel_values"), "image"
    if name == "convnext":
        cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], **small)
        return Logits(tf.ConvNextForImageClassification(cfg), "pixel_values"), "image"
    if name == "regnet":
        cfg = tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                              groups_width=8, **small)
        return Logits(tf.RegNetForImageClassification(cfg), "pixel_values"), "image"
    if name == "vit":
        cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, **small)
        return Logits(tf.ViTForImageClassification(cfg), "pixel_values"), "image"
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64, **small)
        return Logits(tf.BertForSequenceClassification(cfg), "input_ids"), "tokens"
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            pad_token_id=0, **small)
        return Logits(tf.GPT2ForSequenceClassification(cfg), "input_ids"), "tokens"
    if name == "llama":  # RMSNorm, rotary positions, SwiGLU, grouped-query attention
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, pad_token_id=0, **small)
        return Logits(tf.LlamaForSequenceClassification(cfg), "input_ids"), "tokens"
    raise KeyError(name)


def _timm(name: str) -> tuple[nn.Module, str]:
    import timm

    size = {"img_size": 64} if name.startswith(("deit", "vit")) else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **size), "image"


# the int8 kernels counted in the graph ONNX Runtime runs (besides its float convolutions)
INT8_KERNELS = ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool",
                "QGemm", "MatMulInteger", "QLinearMatMul", "ConvInteger")
HF = ["resnet", "mobilenet_v2", "efficientnet", "convnext", "regnet", "vit", "bert", "gpt2",
      "llama"]
TIMM = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "densenet121", "regnetx_002",
        "convnext_atto", "deit_tiny_patch16_224"]


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # not installed, or does not import beside this torch
        return False
    return True


def build(name: str) -> tuple[nn.Module, str]:
    return _timm(name.removeprefix("timm/")) if name.startswith("timm/") else _hf(name)


def inputs(kind: str, n: int, seed: int, size: int = IMAGE[1]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        return torch.randint(1, VOCAB, (n, TOKENS), generator=g)
    return torch.randn(n, IMAGE[0], size, size, generator=g)


def weight_layers(model: nn.Module) -> tuple[int, int]:
    """``(quantized, weight-holding)`` module counts from ``blendq.summary``."""
    rows = [r for r in blendq.summary(model) if r.params]  # modules holding weights
    return sum(r.fate == "quantized" for r in rows), len(rows)


def run_model(name: str, seed: int = 0, steps: int = 4, n_eval: int = 64,
              speed: bool = False) -> dict:
    """The whole path for one architecture; returns its table row."""
    torch.manual_seed(seed)
    model, kind = build(name)
    size = 64 if name.startswith("timm/") else IMAGE[1]
    float_model = copy.deepcopy(model).eval() if speed else None
    policy = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True)
    model = blendq.prepare(model, policy)
    controller = blendq.AlphaController(model, blendq.linear(0, steps - 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        controller.step(step)
        x = inputs(kind, 8, seed + 100 + step, size)
        labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(first_tensor(model(x)).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert blendq.transform.get_alpha(model) == 1.0
    _recalibrate(model, kind, seed, size)
    x = inputs(kind, n_eval, seed + 1, size)
    quantized, total = weight_layers(model)
    with blendq.quantized(model) as alpha_one:
        ref = first_tensor(alpha_one(x)).float()
        moved = first_tensor(alpha_one(_nudge(x))).float()
    converted = blendq.convert(model)
    with torch.no_grad():
        same = torch.equal(first_tensor(converted(x)).float(), ref)
    t0 = time.perf_counter()
    program = capture(converted, x[:2])
    engine = IntegerEngine(program)
    ints = engine(x)
    with tempfile.TemporaryDirectory() as tmp:
        path, opt = Path(tmp) / "model.onnx", Path(tmp) / "model.opt.onnx"
        import onnx

        onnx.save(to_onnx(program, x[:2]), str(path))
        export_s = time.perf_counter() - t0
        session = onnx_session(path, optimized_path=opt)
        ort = run_onnx(session, x)
        ops = fused_ops(opt)
        speedup = _speed(float_model, x, path, tmp) if speed else None
    step = output_step(ref)
    o = compare_logits("ort", ref, ort, step)
    e = compare_logits("engine", ref, ints, step)
    floor = compare_logits("nudged", ref, moved, step).max_steps
    int8 = {k: v for k, v in ops.items() if k in INT8_KERNELS}
    float_convs = ops.get("Conv", 0) + ops.get("FusedConv", 0)
    return {"model": name, "quantized": quantized, "weight_modules": total,
            "convert_equals_alpha_one": same, "ort_top1": o.top1_agreement,
            "ort_max_steps": o.max_steps, "engine_top1": e.top1_agreement,
            "engine_max_steps": e.max_steps, "rounding_floor_steps": floor,
            "integer_layers": engine.integer_layers,
            "int8_kernels": int8, "float_convs": float_convs,
            "export_s": round(export_s, 2), "ort_speedup": speedup}


def _nudge(x: torch.Tensor) -> torch.Tensor:
    """``x`` moved by one part in a million (tokens unchanged): how far the alpha = 1
    model's own output moves under float32-sized noise is the floor below which no
    runtime can agree with it (any rounding tie inside can flip)."""
    return x * (1 + 1e-6) if x.is_floating_point() else x


@torch.no_grad()
def _recalibrate(model: nn.Module, kind: str, seed: int, size: int, batches: int = 4) -> None:
    """Batch-norm running statistics as the cumulative average over a few batches at
    alpha = 1, as after real training: with random weights and a handful of steps, the
    default statistics (mean 0, variance 1) leave the eval-mode network chaotic, where
    any rounding tie anywhere changes the logits (not what a trained model does)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(batches):
        model(inputs(kind, 16, seed + 200 + i, size))
    model.eval()


def _speed(float_model: nn.Module, x: torch.Tensor, path: Path, tmp: str,
           rounds: int = 20) -> float:
    """ORT time of the float model's ONNX (torch.onnx of the model before prepare) over
    the int8 graph's, on the same 64 inputs: best of ``rounds`` single runs each."""
    import onnx

    fp32 = Path(tmp) / "fp32.onnx"
    program = torch.export.export(float_model, (x[:2],), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    onnx.save(torch.onnx.export(program, (x[:2],), dynamo=True, verbose=False).model_proto,
              str(fp32))
    best = []
    for p in (path, fp32):
        session = onnx_session(p)
        run_onnx(session, x)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            run_onnx(session, x)
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    return best[1] / best[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (timm ones as timm/NAME)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--speed", action="store_true", help="time ORT int8 against fp32 ONNX")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.only or HF + ([f"timm/{n}" for n in TIMM] if timm_available() else [])
    rows = []
    print(f"{'model':28s} quant/total  conv==a1  ORT top1  ORT max  eng max  floor  "
          "int8 kernels"
          f"{'  ORT x fp32' if args.speed else ''}")
    for name in names:
        try:
            row = run_model(name, args.seed, speed=args.speed)
        except Exception as err:  # one broken architecture does not hide the others
            row = {"model": name, "error": f"{type(err).__name__}: {err}"}
            print(f"{name:28s} ERROR {row['error'][:200]}")
            rows.append(row)
            continue
        rows.append(row)
        kernels = ", ".join(f"{k} {v}" for k, v in row["int8_kernels"].items()) or "-"
        kernels += f"; float conv {row['float_convs']}"
        speed = f"  {row['ort_speedup']:.2f}" if args.speed else ""
        print(f"{name:28s} {row['quantized']:>4}/{row['weight_modules']:<6} "
              f"{str(row['convert_equals_alpha_one']):8s} {row['ort_top1']:7.2f}% "
              f"{row['ort_max_steps']:8.3f} {row['engine_max_steps']:8.3f} "
              f"{row['rounding_floor_steps']:6.3f}  {kernels}{speed}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
