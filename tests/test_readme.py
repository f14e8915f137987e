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
