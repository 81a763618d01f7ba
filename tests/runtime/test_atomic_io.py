"""mosaicdiff.core.atomic_io: the project's one crash-safe writer."""

from __future__ import annotations

import json
import os
import stat

import pytest

from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic, write_text_atomic


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert _listing(target.parent) == ["report.json"]


def test_a_failing_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["x.txt"]


def test_unserializable_json_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, [1])
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == [1]
    assert _listing(tmp_path) == ["x.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.txt").stat().st_mode) == 0o666 & ~umask


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "y", "a"):
            pass


def test_json_safe_gives_plain_json_values(tmp_path):
    import math
    from pathlib import Path

    import numpy as np
    import torch

    from mosaicdiff.core.atomic_io import json_safe

    value = {"t": torch.tensor([1.5, 2.0]), "n": np.float32(0.25), "i": np.int64(3), "nan": math.nan,
             "inf": [1.0, -math.inf], "p": Path("/a/b"), "dtype": torch.float16, 4: (1, "x", None, True)}
    out = json_safe(value)
    assert out == {"t": [1.5, 2.0], "n": 0.25, "i": 3, "nan": None, "inf": [1.0, None], "p": "/a/b",
                   "dtype": "torch.float16", "4": [1, "x", None, True]}
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN/inf tokens
