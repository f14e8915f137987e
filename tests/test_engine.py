"""Trainer: resume equality, checkpoints, DDP with gloo, models and recipes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blendq
from blendq.engine import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, train
from blendq.engine.trainer import CHECKPOINT

QUICK = TrainConfig(model="digits_cnn", data="digits", w_bits=4, a_bits=4, epochs=3,
                    batch_size=128, alpha_window=(0.0, 0.6), quant_every=3, device="cpu",
                    model_args={"width": 8}, seed=3)


def _strip_times(history):
    return [{k: v for k, v in row.items() if not k.endswith("time_s")} for row in history]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    full = train(QUICK, tmp_path / "full", progress=False)
    steps_per_epoch = full.history[0]["step"]
    part = train(QUICK, tmp_path / "part", progress=False,
                 max_steps=steps_per_epoch + 2)  # killed inside epoch 2
    assert len(part.history) == 1
    resumed = train(QUICK, tmp_path / "part", resume=True, progress=False)
    assert _strip_times(resumed.history) == _strip_times(full.history)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / "part" / "converted.pt").exists()


def test_corrupt_checkpoint_is_a_clear_error_and_old_one_survives(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="OSError: disk full; the previous checkpoint"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous good checkpoint
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temp file left
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a blendq checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_load_executes_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"format": "blendq-checkpoint-v1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_run_directory_contents(tmp_path):
    train(QUICK.replace(epochs=1), tmp_path, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "env.json", "metrics.jsonl", "metrics.csv", CHECKPOINT} <= names
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    for key in ("test_acc", "fp_test_acc", "q_test_acc", "alpha", "train_loss"):
        assert key in header


def test_float_phase_then_quantization(tmp_path):
    fp = train(QUICK.replace(quantize=False, epochs=4, lr=1e-2), tmp_path / "fp", progress=False)
    q = train(QUICK.replace(epochs=1, init_from=str(tmp_path / "fp")), tmp_path / "q",
              progress=False)
    assert q.history[0]["fp_test_acc"] > 20.0 and fp.history[-1]["test_acc"] > 20.0
    with pytest.raises(ValueError, match="holds a quantized model"):
        train(QUICK.replace(init_from=str(tmp_path / "q")), tmp_path / "x", progress=False)


@pytest.mark.slow
def test_ddp_two_processes_gloo_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, alpha, EMA scales, codes
    assert any(k.endswith("a_quant.scale") for k in a)
    assert float(a["0.alpha"]) == 1.0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    e0, e1 = (torch.load(tmp_path / f"ema{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(e0["after"], e1["after"])  # the ranks agree by reduction
    m = 0.99
    mean = (e0["local"] + e1["local"]) / 2
    torch.testing.assert_close(e0["after"], m * e0["before"] + (1 - m) * mean)


def test_config_validation():
    with pytest.raises(ValueError, match="w_bits must be an integer in 1..8, got 9"):
        TrainConfig(w_bits=9)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="unknown config keys \\['wbits'\\]"):
        TrainConfig.from_dict({"wbits": 4})
    assert TrainConfig(a_bits="none").a_bits is None
    assert TrainConfig(alpha_window=(0.1, 0.5)).window_steps(1000) == (100, 500)
    # a window to the end of the run reaches α = 1 exactly at its last step
    assert TrainConfig().window_steps(1000) == (0, 999)
    assert TrainConfig().alpha(1000)(999) == 1.0 > TrainConfig().alpha(1000)(998)
    assert TrainConfig(alpha_window=(1.0, 1.0)).window_steps(10) == (9, 9)
    assert TrainConfig(alpha_window=(100, 500)).window_steps(1000) == (100, 500)
    ste = TrainConfig(method="ste", alpha_window=(0.2, 0.5)).alpha(100)
    assert ste(20) == 0.0 and ste(21) == 1.0


def test_model_shapes():
    from blendq.models import build_model

    for name, c, s in (("digits_cnn", 1, 8), ("fmnist_cnn", 1, 28), ("binarynet", 3, 32),
                       ("mobilenet_v1", 3, 32), ("mobilenet_v1", 3, 128),
                       ("resnet50_v1", 3, 32), ("resnet50_v2", 3, 64)):
        kwargs = {"width": 0.25} if name in ("mobilenet_v1", "binarynet", "resnet50_v1",
                                             "resnet50_v2") else {}
        model = build_model(name, in_channels=c, num_classes=7, image_size=s, **kwargs).eval()
        assert model(torch.randn(2, c, s, s)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


def test_full_size_models_have_the_papers_layers():
    from blendq.models import build_model

    mb = build_model("mobilenet_v1", num_classes=1000, image_size=224)
    assert 4.2e6 < sum(p.numel() for p in mb.parameters()) < 4.3e6  # MobileNet v1 1.0: 4.2 M
    r50 = build_model("resnet50_v1", num_classes=1000, image_size=224)
    assert 25.5e6 < sum(p.numel() for p in r50.parameters()) < 25.6e6  # ResNet-50: 25.6 M
    plans = blendq.QuantPolicy(w_bits=4, first_layer=8, depthwise=8, last_layer=8).resolve(mb)
    assert sum(p.w_spec.bits == 8 for p in plans) == 1 + 13 + 1
    assert plans[0].name == "0" and plans[-1].name == str(len(mb) - 1)


def test_bf16_autocast_on_cpu(tmp_path):
    run = train(QUICK.replace(epochs=1, amp="bf16", channels_last="on"), tmp_path,
                progress=False)
    assert run.history[0]["q_test_acc"] >= 0.0
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
