"""Peak memory of LoRA-QAT (the quantizer on the merged weight W + s·B·A) against plain
LoRA fine-tuning of the same model, on the CPU or a GPU.

    python benchmarks/lora_memory.py [--width 512 --layers 4 --batch 8 --steps 3]
    python benchmarks/lora_memory.py --device cuda

Each variant runs in a fresh process: a Hugging Face ``LlamaForCausalLM`` from a config
(random weights), peft LoRA of rank 16 on every attention and MLP projection, a few
AdamW steps on random tokens. Measured: the process's peak resident memory above what
it held once the model was built and prepared (CPU, ``ru_maxrss``), or CUDA's peak
allocated memory above the model's, and both with the model (a prepared layer keeps its
codes beside the weight). Variants: plain LoRA; LoRA-QAT at W4 group 32 weight-only with STE
and with AB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings

VARIANTS = ("plain LoRA", "LoRA-QAT W4 g32 STE", "LoRA-QAT W4 g32 AB")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(variant: str, args) -> dict:
    import peft
    import torch
    import transformers

    import blendq

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=args.width,
                                   intermediate_size=8 * args.width // 3,
                                   num_hidden_layers=args.layers,
                                   num_attention_heads=max(2, args.width // 64),
                                   num_key_value_heads=max(1, args.width // 128),
                                   max_position_embeddings=args.tokens)
    model = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    if variant != "plain LoRA":
        method = "ab" if variant.endswith("AB") else "ste"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = blendq.prepare(model, blendq.QuantPolicy(
                w_bits=4, a_bits=None, group_size=32, method=method, skip=("*lm_head",)))
        if method == "ab":
            blendq.set_alpha(model, 0.5)  # mid-ramp: the blend is computed
    model = model.to(args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        ids = torch.randint(0, 256, (args.batch, args.tokens), generator=g).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "peak_above_model_mb": round(peak - base, 1),
            "model_mb": round(base, 1), "params": params, "device": args.device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    rows = []
    for variant in VARIANTS:
        flags = [a for a in sys.argv[1:]]
        out = subprocess.run([sys.executable, __file__, *flags, "--variant", variant],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain = rows[0]["peak_above_model_mb"]
    print(f"Llama width {args.width}, {args.layers} layers, batch {args.batch} x "
          f"{args.tokens} tokens, {args.device}: peak memory above the built model")
    total = rows[0]["model_mb"] + plain
    for r in rows:
        peak = r["model_mb"] + r["peak_above_model_mb"]
        print(f"{r['variant']:22s} training {r['peak_above_model_mb']:8.1f} MB "
              f"({r['peak_above_model_mb'] / plain:.2f}x plain LoRA); with the model "
              f"{peak:8.1f} MB ({peak / total:.2f}x)")


if __name__ == "__main__":
    main()
