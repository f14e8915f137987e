"""FSDP2: a prepared model trains under ``fully_shard`` (2 CPU ranks, gloo): α,
activation scales and parameters agree across ranks, the weight refresh runs on sharded
parameters, torch.distributed.checkpoint saves and resumes it, and the gathered model
converts to what was trained."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("method", ["ab", "lsq"])
def test_fully_shard_trains_checkpoints_and_converts(method, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(Path(__file__).parent / "fsdp_worker.py"), str(tmp_path), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["alpha"] == b["alpha"] == 1.0
    assert all(torch.equal(x, y) for x, y in zip(a["scales"], b["scales"], strict=True))
    assert a["full"].keys() == b["full"].keys()
    assert all(torch.equal(a["full"][k], b["full"][k]) for k in a["full"])
    for r in (a, b):
        assert torch.equal(r["resumed"], r["trained"])  # the checkpoint resumes exactly
        assert torch.allclose(r["deployed"], r["trained"], atol=1e-6)  # gathered, converted
    assert torch.equal(a["trained"], b["trained"])
