"""Run by tests/test_engine.py under torchrun: one quantized epoch on digits, then each
rank saves its model state so the test can check that the ranks agree."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from blendq.engine import TrainConfig, train

out = Path(sys.argv[1])
cfg = TrainConfig(model="digits_cnn", data="digits", w_bits=4, a_bits=4, epochs=2,
                  batch_size=64, alpha_window=(0.0, 0.5), device="cpu")
result = train(cfg, out / "run", progress=False)
torch.save(result.model.state_dict(), out / f"rank{dist.get_rank()}.pt")
torch.save(len(result.history), out / f"epochs{dist.get_rank()}.pt")
dist.destroy_process_group()
