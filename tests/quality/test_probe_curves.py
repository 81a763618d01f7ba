"""scripts/probe_curves.py: the stepwise probe at several sparsities, per window."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import probe_curves  # noqa: E402


def test_the_probe_error_grows_with_sparsity_in_every_window(tmp_path):
    out = tmp_path / "curves.json"
    assert probe_curves.main(["--models", "digits-dit", "--sparsities", "0.2", "0.6", "--num-stages", "2",
                              "--out", str(out)]) == 0
    curve = json.loads(out.read_text())["digits-dit"]
    assert set(curve) == {"0.2", "0.6"} and all(len(v) == 2 for v in curve.values())
    assert all(hi > lo > 0 for lo, hi in zip(curve["0.2"], curve["0.6"])), curve


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        probe_curves.main(["--sparsities", "1.5", "--out", str(tmp_path / "x.json")])
