"""How the size of the activation statistic's sample moves the trained scales.

    python benchmarks/act_sample.py [--train-steps 400] [--steps 300] [--seed 0]

A W4A4 per-channel fmnist_cnn (Fashion-MNIST) is trained ``--train-steps`` steps of
QAT from scratch (Adam, STE activations, the library's defaults otherwise). From that
state, with the weights and batch norms fixed, every sample size (``ActSpec.sample``:
the whole batch, 262,144, 65,536, 16,384 elements) runs the activation EMA over the
same ``--steps`` training batches as training does (a controller, so the statistics
settle together once a step). Prints, per activation quantizer, the EMA scale relative
to the whole-batch one's and the quantization error of held-out activations (the test
set's inputs to that quantizer, taken from the whole-batch model) relative to the
whole-batch scale's, and each model's test top-1 as deployed (α = 1).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform

import torch
from _harness import commit

import blendq
from blendq.data.sources import load_fashion_mnist
from blendq.models import build_model
from blendq.quantizers import ActQuantizer

SIZES = (None, 262144, 65536, 16384)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i:i + batch]
        yield images[idx], labels[idx]


def _train(data, steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("fmnist_cnn", in_channels=1, image_size=28)
    model = blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=4, per_channel=True))
    controller = blendq.AlphaController(model, blendq.linear(0, steps // 2))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    batches = _batches(data.train_images, data.train_labels, 128, seed)
    for step in range(steps):
        x, y = next(batches)
        controller.step(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    blendq.set_alpha(model, 1.0)
    return model


@torch.no_grad()
def _run_ema(start: torch.nn.Module, size: int | None, data, steps: int, seed: int):
    model = copy.deepcopy(start)
    for q in blendq.transform._act_quantizers(model):
        q.spec = dataclasses.replace(q.spec, sample=size)
    controller = blendq.AlphaController(model, blendq.constant(1.0))
    model.train()
    blendq.transform.freeze_batch_norms(model)
    batches = _batches(data.train_images, data.train_labels, 128, seed + 1)
    for step in range(steps):
        controller.step(step)
        model(next(batches)[0])
    model.eval()
    return model


@torch.no_grad()
def _inputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every activation quantizer's inputs over ``images`` (eval mode), in module order."""
    quantizers = blendq.transform._act_quantizers(model)
    seen: dict[int, list[torch.Tensor]] = {id(q): [] for q in quantizers}
    hooks = [q.register_forward_pre_hook(lambda m, a: seen[id(m)].append(a[0].clone()))
             for q in quantizers]
    for i in range(0, len(images), 500):
        model(images[i:i + 500])
    for h in hooks:
        h.remove()
    return [torch.cat([t.reshape(-1) for t in seen[id(q)]]) for q in quantizers]


def _error(x: torch.Tensor, q: ActQuantizer) -> float:
    scale = q.scale
    codes = blendq.functional.quantize(x, scale, q.spec.bits, q.is_signed, full=True)
    return float((x - codes * scale).double().square().mean())


@torch.no_grad()
def _accuracy(model: torch.nn.Module, data) -> float:
    correct = 0
    for i in range(0, len(data.test_images), 1000):
        out = model(data.test_images[i:i + 1000])
        correct += int((out.argmax(1) == data.test_labels[i:i + 1000]).sum())
    return 100.0 * correct / len(data.test_images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = load_fashion_mnist()
    start = _train(data, args.train_steps, args.seed)
    models = {size: _run_ema(start, size, data, args.steps, args.seed) for size in SIZES}
    inputs = _inputs(models[None], data.test_images)
    quantizers = {s: blendq.transform._act_quantizers(m) for s, m in models.items()}
    print(f"fmnist_cnn W4A4 per-channel, seed {args.seed}, {args.train_steps} QAT steps, "
          f"then {args.steps} EMA steps per sample size; CPU {platform.machine()}, "
          f"torch {torch.__version__}, commit {commit()}")
    print("| quantizer (input elements) | sample | scale / whole-batch scale | "
          "error / whole-batch error |")
    print("|---|---|---|---|")
    for i, x in enumerate(inputs):
        ref = quantizers[None][i]
        base = _error(x, ref)
        for size in SIZES[1:]:
            q = quantizers[size][i]
            print(f"| {i} ({x.numel() // len(data.test_images):,} per image) | {size:,} | "
                  f"{float(q.scale / ref.scale):.4f} | {_error(x, q) / base:.4f} |")
    print("\n| sample | test top-1 (α = 1) |\n|---|---|")
    for size, model in models.items():
        print(f"| {'whole batch' if size is None else f'{size:,}'} | "
              f"{_accuracy(model, data):.2f} |")


if __name__ == "__main__":
    main()
