"""The README's offline example runs as written (the hub example is checked for its names only)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import mosaicdiff

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_a_hub_example_and_an_offline_example():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    assert 'from_pretrained("facebook/DiT-XL-2-256")' in blocks[0]
    assert "load_digits_dit()" in blocks[1]
    for block in blocks:
        ast.parse(block)  # each is valid Python on its own


def test_the_hub_example_names_what_the_package_exports():
    code = _python_blocks()[0]
    for name in re.findall(r"(?<!from )mosaicdiff\.(\w+)", code):
        assert hasattr(mosaicdiff, name), name
    for attr in re.findall(r"\.(save_pretrained|enable_cuda_graphs|from_pretrained)\(", code):
        assert hasattr(mosaicdiff.MosaicDiT, attr), attr


def test_the_offline_example_runs_as_written():
    scope: dict = {}
    exec(compile(_python_blocks()[1], str(README), "exec"), scope)  # noqa: S102 - our own README
    images = scope["images"]
    assert isinstance(scope["mosaic"], mosaicdiff.MosaicDiT)
    assert images.shape[0] == 16 and images.shape[1:] == scope["x0"].shape[1:]
    assert torch.isfinite(images).all()
