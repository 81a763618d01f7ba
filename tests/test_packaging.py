"""setup.py decisions that need no compiler: version source, MOSAIC_BUILD_EXT handling.

Each test runs ``python setup.py --version`` in a subprocess (it plans the extension build, then
prints the version, and compiles nothing). The real `pip install` paths are checked by hand /
in CI (see the report of the build helper): they take minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("setuptools")

ROOT = Path(__file__).resolve().parents[1]


def run_setup(**env_overrides: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "MOSAIC_BUILD_EXT")}
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def build_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mosaicdiff:")]


def test_version_is_single_sourced_and_skip_says_so_in_one_line():
    namespace: dict = {}
    exec((ROOT / "python" / "mosaicdiff" / "_version.py").read_text(), namespace)
    result = run_setup(MOSAIC_BUILD_EXT="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == namespace["__version__"], result.stdout
    lines = build_lines(result.stderr)
    assert len(lines) == 1 and "without the compiled extension" in lines[0], result.stderr


def test_auto_without_nvcc_installs_pure_python_in_one_line():
    result = run_setup(MOSAIC_BUILD_EXT="auto", CUDA_HOME="/nonexistent/cuda")
    assert result.returncode == 0, result.stderr
    lines = build_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "installing without the compiled extension mosaic_kernels._C" in lines[0], lines


def test_forced_build_without_nvcc_is_an_error():
    result = run_setup(MOSAIC_BUILD_EXT="1", CUDA_HOME="/nonexistent/cuda")
    assert result.returncode != 0, result.stdout
    assert "MOSAIC_BUILD_EXT=1 but mosaic_kernels._C cannot be built" in result.stderr, result.stderr


def test_invalid_build_mode_is_an_error():
    result = run_setup(MOSAIC_BUILD_EXT="sometimes")
    assert result.returncode != 0
    assert "MOSAIC_BUILD_EXT must be auto, 1 or 0, got 'sometimes'" in result.stderr, result.stderr
