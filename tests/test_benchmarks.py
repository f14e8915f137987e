"""The benchmark scripts run (tiny shapes); their figures are read by people, not asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_gpu_step_script_runs_in_smoke_mode_on_cpu():
    out = _run("gpu_step.py", "--smoke", "--device", "cpu")
    for row in ("plain (bf16)", "AB W4A8 per-channel, quant_every=1", "STE W1A1",
                "3 warm iterations (training refresh)"):
        assert row in out
