"""Run by tests/test_engine.py under torchrun: one quantized epoch on digits, then each
rank saves its model state so the test can check that the ranks agree."""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import blendq
from blendq.engine import TrainConfig, train

out = Path(sys.argv[1])
cfg = TrainConfig(model="digits_cnn", data="digits", w_bits=4, a_bits=4, epochs=2,
                  batch_size=64, alpha_window=(0.0, 0.5), device="cpu")
result = train(cfg, out / "run", progress=False)
torch.save(result.model.state_dict(), out / f"rank{dist.get_rank()}.pt")
torch.save(len(result.history), out / f"epochs{dist.get_rank()}.pt")
# the activation scale follows both ranks' batches: one more step on different data per
# rank, and every rank's EMA moves by the mean of the two batch scales
model = result.model.train()
layer = model[0] if isinstance(model, torch.nn.Sequential) else next(
    m for m in model.modules() if getattr(m, "a_quant", None) is not None)
before = layer.a_quant.scale.clone()
torch.manual_seed(100 + dist.get_rank())
x = torch.randn(16, 1, 8, 8) * (1 + 3 * dist.get_rank())  # rank 1: 4x larger inputs
local = layer.a_quant._batch_scale(x, layer.a_quant.is_signed)  # before: same warm start
with torch.no_grad():
    model(x)
blendq.transform.settle(model)  # the batch's statistic may wait for the next step
torch.save({"before": before, "after": layer.a_quant.scale.clone(), "local": local},
           out / f"ema{dist.get_rank()}.pt")
# every rank done with its collectives before any tears the group down: gloo aborts a
# rank still finishing the last all_reduce when its peer destroys the group first (seen in
# about one run in four once the last forward ended with one more activation quantizer)
dist.barrier()
# ... and the barrier itself can return on one rank while its peer still finishes it
# (a SIGABRT, "terminate called without an active exception", once in a full suite run):
# a moment before tearing down
time.sleep(0.5)
dist.destroy_process_group()
