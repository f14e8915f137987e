"""The command line: one clear error line and a non-zero exit for bad input."""

import json
import subprocess
import sys

import pytest

from blendq.cli import main


@pytest.mark.parametrize("argv, message", [
    (["train", "--w-bits", "0"], "w_bits must be an integer in 1..8, got 0"),
    (["train", "--w-bits", "9"], "w_bits must be an integer in 1..8, got 9"),
    (["train", "--a-bits", "x"], "bits must be an integer in 1..8 or 'none'"),
    (["train", "--model", "vgg"], "unknown model 'vgg'; known models:"),
    (["train", "--data", "/no/such/dir"], "unknown dataset '/no/such/dir'"),
    (["train", "--data", "fashion-mnist", "--data-root", "/no/such"], "Fashion-MNIST not found"),
    (["train", "--fp32", "--w-bits", "4"], "--fp32 trains without quantization"),
    (["train", "--resume", "--out", "/tmp/blendq-no-run"], "--resume: no checkpoint.pt"),
    (["train", "--method", "sgd"], "invalid choice: 'sgd'"),
    (["train", "--group-size", "24"], "group_size must be a power of two >= 16"),
    (["train", "--config", "nope"], "config 'nope' not found"),
    (["train", "--set", "wbits=4"], "unknown config keys ['wbits']"),
    (["eval", "/no/such/run"], "checkpoint /no/such/run does not exist"),
    (["plot", "/no/such/run"], "metrics.jsonl not found"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blendq: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_no_traceback_from_the_installed_command():
    proc = subprocess.run([sys.executable, "-m", "blendq", "train", "--w-bits", "9"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "blendq: error: w_bits must be an integer in 1..8, got 9"


def test_train_eval_plot_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "digits_cnn", "--data", "digits", "--w-bits", "4", "--a-bits",
            "8", "--per-channel", "--epochs", "2", "--alpha-window", "0", "0.5", "--quant-every",
            "2", "--seed", "1", "--out", str(run), "--quiet", "--set", "model_args={\"width\": 8}",
            "--ab-after", "ste"]
    assert main(argv) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["per_channel"] and cfg["quant_every"] == 2 and cfg["model_args"] == {"width": 8}
    assert cfg["ab_after"] == "ste"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["eval", str(run), "--quiet"]) == 0
    assert "q_test_acc" in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").stat().st_size > 1000
    assert main(["train", "--config", str(run / "config.json").replace(".json", ".toml")]) == 2


def test_toy_command(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path / "toy.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split()[1:4] == ["1.0000", out[-2].split()[2], "6"]
    assert (tmp_path / "toy.png").exists()


def test_recipes_listing(capsys):
    assert main(["recipes"]) == 0
    assert "binarynet_cifar10" in capsys.readouterr().out


def test_export_and_verify_commands(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--w-bits", "4",
                 "--a-bits", "8", "--epochs", "2", "--alpha-window", "0", "0.5", "--out",
                 str(run), "--quiet", "--set", "model_args={\"width\": 8}"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.pt2")]) == 0
    assert "smaller" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "integer engine" in out and "ONNX Runtime, int8 kernels" in out
    assert main(["export", str(run), "--format", "onnx", "--weights", "int4", "--out",
                 str(tmp_path / "m4.onnx")]) == 0
    assert (tmp_path / "m4.onnx").stat().st_size < (tmp_path / "m.onnx").stat().st_size
    try:
        import openvino  # noqa: F401
    except ImportError:
        assert main(["verify", str(run), "--runtime", "openvino"]) == 2
        assert "pip install 'blendq[openvino]'" in capsys.readouterr().err
    else:
        assert main(["verify", str(run), "--runtime", "all", "--test-subset", "200"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if "top-1" in line]
        openvino_row = next(r for r in rows if r.startswith("OpenVINO"))
        assert any(r.startswith("ONNX Runtime") for r in rows)
        assert float(openvino_row.split("top-1 agree")[1].split("%")[0]) >= 99.0
    fp = tmp_path / "fp"
    assert main(["train", "--fp32", "--model", "digits_cnn", "--epochs", "1", "--out", str(fp),
                 "--quiet", "--set", "model_args={\"width\": 8}"]) == 0
    assert main(["export", str(fp)]) == 2
    assert "float (fp32) run" in capsys.readouterr().err


def test_block_quantized_weight_only_run_exports_and_verifies(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--w-bits", "4",
                 "--a-bits", "none", "--group-size", "16", "--method", "ste", "--epochs", "1",
                 "--out", str(run), "--quiet", "--set", "model_args={\"width\": 8}"]) == 0
    assert json.loads((run / "config.json").read_text())["group_size"] == 16
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "g.onnx")]) == 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "g.onnx")).graph.node}
    assert "MatMulNBits" in ops  # the Linear head; the convolutions: blocked dequantize
    assert main(["verify", str(run), "--test-subset", "100"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "top-1 agree" in line]
    assert rows and all("top-1 agree 100.000%" in line for line in rows)


def test_compare_command_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "digits_cnn", "--data", "digits", "--w-bits", "2",
                 "--a-bits", "4", "--epochs", "1", "--float-epochs", "1", "--seeds", "0",
                 "--set", "model_args={\"width\": 4}", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "STE" in text and "AB" in text
    assert (out / "compare.png").stat().st_size > 0 and (out / "ab_curves.png").exists()


def test_calibrate_command_quantizes_a_float_run_that_exports_and_verifies(tmp_path, capsys):
    fp = tmp_path / "fp"
    assert main(["train", "--fp32", "--model", "digits_cnn", "--epochs", "2", "--out", str(fp),
                 "--quiet", "--set", "model_args={\"width\": 8}"]) == 0
    ptq = tmp_path / "ptq"
    args = ["calibrate", "--model", "digits_cnn", "--w-bits", "8", "--a-bits", "8",
            "--per-channel", "--method", "ste", "--scale", "minmax", "--init-from", str(fp),
            "--batches", "4", "--out", str(ptq), "--quiet",
            "--set", "model_args={\"width\": 8}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "calibrated on 512 images" in out and "q_test_acc=" in out
    config = json.loads((ptq / "config.json").read_text())
    assert config["scale"] == "minmax" and config["init_from"] == str(fp)
    assert (ptq / "converted.pt").exists()
    assert main(["verify", str(ptq), "--test-subset", "200"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "top-1 agree" in line]
    assert rows and all("top-1 agree 100.000%" in line for line in rows)
    assert main(args) == 2  # a second calibration into the same run directory
    assert "already holds a run" in capsys.readouterr().err
    assert main(["calibrate", "--model", "digits_cnn", "--out", str(tmp_path / "x")]) == 2
    assert "needs the trained float model" in capsys.readouterr().err
