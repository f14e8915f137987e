"""Runs that never lose work: resume keeps the recipe and works on any device, no
silent overwrite, crash leftovers cleaned, bad images named, every input checked."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_datasets import make_image_folder

import blendq
from blendq.cli import default_out, main
from blendq.engine import CheckpointError, TrainConfig, load_checkpoint, train
from blendq.engine import trainer as trainer_module

SMALL = ["--model", "digits_cnn", "--data", "digits", "--set", 'model_args={"width": 4}',
         "--quiet"]


def _train(tmp_path, *extra):
    return main(["train", *SMALL, "--w-bits", "2", "--a-bits", "4", "--epochs", "1",
                 "--out", str(tmp_path / "run"), *extra])


def test_resume_takes_the_recipe_from_the_run(tmp_path, capsys):
    assert _train(tmp_path) == 0
    run = tmp_path / "run"
    before = (run / "config.json").read_text()
    assert main(["train", "--out", str(run), "--resume", "--w-bits", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "contradict" in err and "--w-bits 8" in err and "(run: 2)" in err
    assert (run / "config.json").read_text() == before  # refused: nothing touched
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["w_bits"], cfg["a_bits"], cfg["epochs"]) == (2, 4, 2)
    history = load_checkpoint(run / "checkpoint.pt")["history"]
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["alpha"] == 1.0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "1", "--quiet"]) == 2
    assert "fewer than the run's 2" in capsys.readouterr().err


def test_an_existing_run_is_never_overwritten_silently(tmp_path, capsys):
    assert _train(tmp_path) == 0
    run = tmp_path / "run"
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["train", *SMALL, "--w-bits", "8", "--epochs", "1", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps
    assert _train(tmp_path, "--overwrite") == 0
    w2 = TrainConfig(model="digits_cnn", data="digits", w_bits=2, a_bits=4)
    assert default_out(w2) != default_out(w2.replace(w_bits=8))
    assert default_out(w2) != default_out(w2.replace(method="ste"))
    assert str(default_out(w2.replace(quantize=False))).endswith("-fp32")


def test_resume_loads_on_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    """A checkpoint mapped to the training device put the CPU generator state on the GPU
    (``RNG state must be a torch.ByteTensor``): it is now loaded on the CPU and the RNG
    states are restored as CPU byte tensors, CUDA ones included when saved."""
    cfg = TrainConfig(model="digits_cnn", data="digits", epochs=2, device="cpu",
                      model_args={"width": 4})
    train(cfg.replace(epochs=1), tmp_path / "r", progress=False)
    seen = []
    real = trainer_module.load_checkpoint

    def spy(path, map_location="cpu"):
        seen.append(map_location)
        return real(path, map_location=map_location)

    monkeypatch.setattr(trainer_module, "load_checkpoint", spy)
    train(cfg, tmp_path / "r", resume=True, progress=False)
    assert seen == ["cpu"]
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    state["rng"] = state["rng"].to(torch.int16)  # as if mapped and cast elsewhere
    trainer_module._restore_rng(state)  # restored as a CPU byte tensor, no TypeError


def test_crash_leftovers_are_cleaned_and_metrics_rebuilt(tmp_path, capsys):
    cfg = TrainConfig(model="digits_cnn", data="digits", epochs=2, device="cpu",
                      model_args={"width": 4})
    run = tmp_path / "r"
    train(cfg.replace(epochs=1), run, progress=False)
    stale = run / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    (run / "metrics.jsonl").write_text("")  # a crash between the checkpoint and metrics
    assert main(["plot", str(run)]) == 2
    assert "no finished epoch" in capsys.readouterr().err
    train(cfg, run, resume=True, progress=False)
    assert not stale.exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.slow
def test_killed_at_random_moments_resumes_exactly(tmp_path):
    """kill -9 at random moments, then resume: same weights as an uninterrupted run, no
    temporary files left, metrics equal to the checkpoint's history."""
    cfg = TrainConfig(model="digits_cnn", data="digits", epochs=4, device="cpu", seed=1,
                      model_args={"width": 4}, w_bits=2, a_bits=4, quant_every=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes: bit-exact needs the same sums
    try:
        _kill_and_resume(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(cfg: TrainConfig, tmp_path: Path) -> None:
    full = train(cfg, tmp_path / "full", progress=False)
    run = tmp_path / "killed"
    code = ("import sys, blendq.engine as e; cfg = e.TrainConfig.from_dict("
            f"{cfg.to_dict()!r}); e.train(cfg, {str(run)!r}, resume=True, progress=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (run / "checkpoint.pt").exists():  # the checkpoint that is there always loads
            load_checkpoint(run / "checkpoint.pt")
    done = train(cfg, run, resume=True, progress=False)
    assert not list(run.glob("*.tmp"))
    a, b = full.model.state_dict(), done.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = load_checkpoint(run / "checkpoint.pt")["history"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [r["epoch"] for r in history]


@pytest.mark.parametrize("argv, message", [
    (["--set", "lr={oops"], "is not valid JSON"),
    (["--train-subset", "0"], "train_subset must be a positive integer"),
    (["--test-subset", "-300"], "test_subset must be a positive integer"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--set", "lr=\"fast\""], "lr must be a finite number"),
])
def test_bad_training_input_is_one_clear_message(tmp_path, capsys, argv, message):
    assert main(["train", *SMALL, "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists()


def test_toml_syntax_error_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("w_bits = [4,\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert str(recipe) in capsys.readouterr().err


def test_ppq_on_degenerate_input():
    with pytest.raises(ValueError, match="non-empty tensor"):
        blendq.ppq(torch.zeros(0), 4)
    codes, scale = blendq.ppq(torch.tensor([1e38, -1e38, 1.0]), 4)
    assert torch.isfinite(scale).all() and codes.tolist() == [7.0, -7.0, 0.0]


def test_malicious_checkpoint_is_refused_as_unsafe(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "blendq-checkpoint-v1", "x": Boom()}, path)
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_a_bad_image_is_named_or_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    bad = root / "train" / "class0" / "img1.jpg"
    bad.write_bytes(b"")  # a 0-byte file
    cfg = TrainConfig(model="digits_cnn", data=str(root), image_size=16, epochs=1,
                      batch_size=4, device="cpu", model_args={"width": 4}, quantize=False)
    with pytest.raises(blendq.data.DataError, match=str(bad)):
        train(cfg, tmp_path / "run", progress=False)
    result = train(cfg.replace(skip_bad_images=True), tmp_path / "run2", progress=False)
    assert result.history[-1]["skipped_images"] == 1


def test_evaluation_failure_keeps_the_finished_epoch(tmp_path, monkeypatch):
    cfg = TrainConfig(model="digits_cnn", data="digits", epochs=1, device="cpu",
                      model_args={"width": 4})

    def broken(*args, **kwargs):
        raise OSError("a bad image in val/")

    monkeypatch.setattr(trainer_module, "_evaluate_views", broken)
    with pytest.raises(OSError):
        train(cfg, tmp_path / "r", progress=False)
    state = load_checkpoint(Path(tmp_path / "r" / "checkpoint.pt"))
    assert state["epoch"] == 1 and state["history"][0]["train_loss"] > 0


def test_missing_onnx_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    from blendq.export import ExportError
    from blendq.export.onnx import to_onnx

    real = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] == "onnx":
            raise ImportError("No module named 'onnx'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ExportError, match=r"pip install 'blendq\[export\]'"):
        to_onnx(None, torch.zeros(1))


def test_a_full_disk_is_named_and_the_previous_checkpoint_stays_intact(tmp_path, monkeypatch):
    import shutil

    import torch as _torch

    from blendq.engine import checkpoint as ck

    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint({"epoch": 1, "w": _torch.ones(3)}, path)
    real_save = _torch.save

    def full_disk(obj, f):  # what torch.save's writer raises when the disk fills up
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                           "14144 vs 14040")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError) as info:
        ck.save_checkpoint({"epoch": 2}, path)
    message = str(info.value)
    assert "disk holding it is full" in message and str(path) in message
    assert "previous checkpoint" in message and "is intact" in message
    assert ck.load_checkpoint(path)["epoch"] == 1  # and it is
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))  # no partial file left

    def no_space(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", no_space)
    with pytest.raises(ck.CheckpointError, match="no earlier checkpoint exists"):
        ck.save_checkpoint({"epoch": 1}, tmp_path / "new.pt")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 10**9))

    def other(obj, f):
        raise RuntimeError("something else")

    monkeypatch.setattr(ck.torch, "save", other)
    with pytest.raises(ck.CheckpointError, match="RuntimeError: something else") as info:
        ck.save_checkpoint({"epoch": 2}, path)
    assert "disk holding it is full" not in str(info.value)
    monkeypatch.setattr(ck.torch, "save", real_save)


def test_a_damaged_onnx_file_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    from blendq.export import onnx_session
    from blendq.export.capture import ExportError

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07\x12\xff\xff\xff not a model")
    with pytest.raises(ExportError, match=r"model\.onnx is not a readable ONNX model"):
        onnx_session(bad)
    with pytest.raises(ExportError, match="does not exist"):
        onnx_session(tmp_path / "missing.onnx")
