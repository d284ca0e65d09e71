"""The examples of docs/api.md run as written (each ```python block, in order, one namespace)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_api_page_examples_run(tmp_path: Path, monkeypatch):
    demo = tmp_path / "recipes" / "demo"  # the demo's outputs (../../out) land inside tmp_path
    shutil.copytree(ROOT / "recipes" / "demo", demo, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.chdir(demo)
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 6
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/api.md block {number}", "exec"), namespace)  # noqa: S102
    assert (demo / "out" / "api-mix" / "adapter_model.safetensors").is_file()
    assert namespace["result"].written == ("mix8",)


def test_readme_api_example_runs(tmp_path: Path, monkeypatch):
    demo = tmp_path / "recipes" / "demo"
    shutil.copytree(ROOT / "recipes" / "demo", demo, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    [block] = python_blocks(ROOT / "README.md")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102
    assert (tmp_path / "out" / "mix8-api" / "adapter_config.json").is_file()
