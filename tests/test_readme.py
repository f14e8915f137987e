"""The README's Python quickstart runs as written."""

import pathlib
import re


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes model.onnx
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["int_model"] is not None
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_readme_bring_your_own_loop_snippets_run(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)  # the Trainer writes runs/hf
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Bring your own loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3  # plain loop, Hugging Face Trainer, Lightning
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert namespace["int_model"] is not None


def test_readme_post_training_snippet_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("**Post-training quantization, and the paper's baseline.**", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    import torch

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(namespace["int_model"](x), namespace["ptq"](x))
