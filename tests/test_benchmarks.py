"""The benchmark scripts run (tiny shapes); their figures are read by people, not asserted."""

import json
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
def test_gpu_step_script_runs_in_smoke_mode_on_cpu(tmp_path):
    out = _run("gpu_step.py", "--smoke", "--device", "cpu", "--json",
               str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {r["table"].split(",")[0] for r in rows} >= {"ResNet-50 v1", "MobileNet v1",
                                                        "BinaryNet W1A1", "PPQ"}
    for row in ("plain (bf16)", "AB W4A8 per-channel, quant_every=1", "STE W1A1",
                "3 warm iterations (training refresh)"):
        assert row in out
    for row in ("MobileNet v1", "ATen ops"):
        assert row in out


def test_ab_study_script_runs_resumes_and_reports(tmp_path):
    args = ("--smoke", "--data", "digits", "--seeds", "0", "1", "--settings", "W4A4",
            "--only", "STE", "LSQ", "float start", "--out", str(tmp_path))
    out = _run("ab_study.py", *args)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    # per seed: the float run, STE, LSQ, the hybrid "AB, then STE", STE/AB float start,
    # STE SGD, STE twice as long
    assert len(rows) == 2 * 8
    assert {r["variant"] for r in rows} >= {"fp32", "STE", "LSQ", "AB, float start"}
    assert all(0 <= r["acc"] <= 100 and r["alpha"] in (0.0, 1.0) for r in rows)
    assert "| LSQ |" in out and "W4A4 − STE" in out
    again = _run("ab_study.py", *args)  # finished runs are not trained again
    assert "0 float runs, then 0 study runs" in again
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_bnn_gpu_script_trains_its_runs_side_by_side_in_smoke_mode(tmp_path):
    out = _run("bnn_gpu.py", "--smoke", "--device", "cpu", "--data", "digits",
               "--runs", "STE", "AB, then STE at α = 1", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["variant"] for r in summary["runs"]] == ["STE", "AB, then STE at α = 1"]
    assert all(len(r["curve"]) == 1 for r in summary["runs"]) and "wall" in out
    config = json.loads((tmp_path / "ste" / "config.json").read_text())
    assert config["clip_latent"] and config["method"] == "ste" and config["w_bits"] == 1


def test_deploy_speed_script_runs_in_smoke_mode(tmp_path):
    pytest.importorskip("onnxruntime")
    _run("deploy_speed.py", "--smoke", "--models", "resnet50_v1", "--json",
         str(tmp_path / "deploy.json"))
    rows = json.loads((tmp_path / "deploy.json").read_text())["rows"]
    by_file = {r["file"]: r for r in rows if r["runtime"] == "ORT"}
    assert set(by_file) == {"fp32", "quantize_static", "blendq W8A8", "blendq W4A8"}
    for label in ("blendq W8A8", "blendq W4A8"):  # every convolution and add in int8
        kernels = by_file[label]["ort_kernels"]
        assert kernels.get("QLinearConv") == 53 and kernels.get("QLinearAdd") == 16
        assert "Conv" not in kernels and "FusedConv" not in kernels
    assert all(r["ms"] > 0 for r in rows)


def test_lm_int4_script_trains_and_deploys_in_smoke_mode(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    out = _run("lm_int4.py", "train", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    result = json.loads((tmp_path / "lm_int4.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["PTQ", "AB", "STE + KD",
                                                      "LoRA-QAT (STE)"]
    assert all(r["alpha_end"] == 1.0 and r["val_ppl"] > 1 for r in result["rows"])
    assert "validation perplexity" in out and "recovery %" in out
    again = _run("lm_int4.py", "train", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    assert "0 runs to do (4 done)" in again and "float: " in again  # resumed, nothing rerun
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4
    _run("lm_int4.py", "deploy", "--smoke", "--out", str(tmp_path))
    rows = {r["file"]: r for r in
            json.loads((tmp_path / "lm_int4_deploy.json").read_text())["rows"]}
    assert rows["W4 g32 level 0"]["top1_agree_pct"] == 100.0
    assert rows["W4 g32 level 4, int8 in"]["max_output_steps"] < 0.01
    pytest.importorskip("openvino")
    _run("lm_int4.py", "anchor", "--smoke", "--openvino", "--out", str(tmp_path))
    anchor = {r["file"]: r for r in
              json.loads((tmp_path / "lm_anchor.json").read_text())["rows"]}
    assert anchor["ORT quantize_dynamic int8"]["speedup_vs_anchor_128"] == 1.0
    assert anchor["blendq W4 g32 level 0"]["max_output_steps"] < 0.01
    assert anchor["blendq W4 g32 in OpenVINO, f32 exact"]["max_output_steps"] < 0.01
    assert anchor["blendq W4 g32 int8 matmul"]["max_output_steps"] < 1.0
    # trained to round its inputs as the level-4 kernel does: the file is its alpha = 1
    assert anchor["blendq W4 g32 int8 block inputs, lm_head too"]["max_output_steps"] < 1.0
    assert anchor["blendq W4 g32 level 0"]["reference_one_ulp_steps"] < 0.01
    assert all(r["ms_1"] > 0 and r["ms_128"] > 0 for r in anchor.values())


def test_paper_tables_script_runs_verifies_resumes_and_reports(tmp_path):
    from fake_datasets import make_cifar10

    data = make_cifar10(tmp_path / "data", per_batch=64)
    args = ("--smoke", "--out", str(tmp_path / "out"), "--data-root", str(data),
            "--nets", "MobileNet v1 0.25", "--bits", "4-4", "--seeds", "1",
            "--columns", "min/max QAT per channel", "AB per channel", "PTQ per channel")
    out = _run("paper_tables.py", *args)
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 1 + 3  # the float model once, then three columns
    assert {r["column"] for r in rows} == {"fp32", "min/max QAT per channel",
                                           "AB per channel", "PTQ per channel"}
    table = [r for r in rows if r["column"] != "fp32"]
    assert all(r["verified"] and 0 <= r["acc"] <= 100 for r in table)
    ab = json.loads((tmp_path / "out" / "mobilenet-v1-0-25" / "4-4" / "ab-per-channel" / "s1"
                     / "config.json").read_text())
    assert ab["first_layer"] == ab["depthwise"] == ab["last_layer"] == [8, 8]
    assert ab["init_from"].endswith("fp32") and ab["seed"] == 1
    minmax = json.loads((tmp_path / "out" / "mobilenet-v1-0-25" / "4-4" /
                         "min-max-qat-per-channel" / "s1" / "config.json").read_text())
    assert minmax["scale"] == "minmax" and minmax["method"] == "ste"
    assert "| AB − min/max, per channel |" in out and "| 4-4 | 3 of 3 (" in out
    # each row names its CPU (the machines differ in maker and speed), and the report too
    assert table[0]["machine"] and f"machine(s) {table[0]['machine']};" in out
    again = _run("paper_tables.py", *args)  # finished runs are not run again
    assert "0 float runs, then 0 table runs" in again
    # verified again with this checkout: one line each in reverified.jsonl, rows untouched
    before = (tmp_path / "out" / "rows.jsonl").read_text()
    out = _run("paper_tables.py", *args, "--reverify", "--columns", "AB per channel",
               "--agree-images", "16")
    assert "verifying 1 runs again" in out and "| 4-4 | 3 of 3 (" in out
    assert (tmp_path / "out" / "rows.jsonl").read_text() == before
    (line,) = (tmp_path / "out" / "reverified.jsonl").read_text().splitlines()
    again = json.loads(line)
    assert again["column"] == "AB per channel" and again["verified"]
    # compared with the α = 1 model on 16 images; the deployed accuracy still on all 32
    trained = next(r for r in table if r["column"] == "AB per channel")
    assert (again["agree_images"], trained["agree_images"]) == (16, 32)
    assert again["acc"] == trained["acc"]
    # where ORT and the α = 1 model part: each optimisation level, its kernels
    out = _run("ort_levels.py", str(tmp_path / "out" / "mobilenet-v1-0-25" / "4-4" /
                                    "ab-per-channel" / "s1"), "--images", "32")
    levels = [line.split()[0] for line in out.splitlines()[2:]]
    assert levels == ["disable", "basic", "extended", "all"] and "QLinearConv" in out


def test_lm_int4_script_trains_a_llama_in_smoke_mode(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    _run("lm_int4.py", "train", "--smoke", "--arch", "llama", "--device", "cpu", "--variants",
         "PTQ", "LSQ + KD", "LoRA-QAT (STE)", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "lm_int4.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["PTQ", "LSQ + KD", "LoRA-QAT (STE)"]
    assert all(r["alpha_end"] == 1.0 and r["val_ppl"] > 1 for r in rows)


def test_paper_tables_schedule_starts_a_network_once_its_float_model_exists(monkeypatch):
    """Both float models train side by side; the network whose float model is ready
    first runs its table while the other's still trains, and no run starts before its
    own float model has finished."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_tables

    events, lock = [], threading.Lock()

    def run_job(job):
        with lock:
            events.append(("start", job["net"], job["column"], job["threads"]))
        time.sleep(0.3 if job["net"] == "slow" and job["column"] == "fp32" else 0.02)
        with lock:
            events.append(("end", job["net"], job["column"], job["threads"]))
        return {"net": job["net"], "column": job["column"]}

    monkeypatch.setattr(paper_tables, "run_job", run_job)
    floats = [{"net": net, "column": "fp32"} for net in ("slow", "fast")]
    runs = [{"net": net, "column": f"c{i}", "threads": 1}
            for net in ("slow", "fast") for i in range(3)]
    with ThreadPoolExecutor(2) as pool:
        rows = list(paper_tables.schedule(pool, 2, 1, floats, runs))
    assert len(rows) == 8
    order = [(kind, net, column) for kind, net, column, _ in events]
    assert [e[3] for e in events if e[2] == "fp32"] == [1, 1, 1, 1]  # side by side
    for net in ("slow", "fast"):  # every run after its float model
        float_end = order.index(("end", net, "fp32"))
        assert all(order.index(("start", net, f"c{i}")) > float_end for i in range(3))
    # the fast network's whole table ran while the slow float model trained
    assert order.index(("end", "fast", "c2")) < order.index(("end", "slow", "fp32"))


def test_ort_kernels_script_times_each_kernel_in_smoke_mode(tmp_path):
    pytest.importorskip("onnxruntime")
    out = _run("ort_kernels.py", "--smoke", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "ort_kernels.json").read_text())["rows"]
    assert {(r["kernel"], r["rows"]) for r in rows} == {
        (k, m) for m in (1, 4) for k in ("MatMulNBits g32 level 0", "MatMulNBits g32 level 4",
                                         "MatMulInteger (uint8 x int8)",
                                         "DynamicQuantizeMatMul")}
    assert all(r["ms_per_matmul"] > 0 for r in rows) and "x MatMulInteger" in out
