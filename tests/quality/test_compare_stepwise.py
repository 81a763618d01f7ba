"""scripts/compare_stepwise.py on a tiny setting: every model measured, the paired differences written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import compare_stepwise  # noqa: E402


def test_compare_stepwise_tiny(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = compare_stepwise.main(["--model", "digits-dit", "--sparsities", "0.3", "--methods", "mosaic", "stepwise",
                                  "stepwise-copies", "--num-samples", "4", "--steps", "6", "--samples-per-stage", "4",
                                  "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    configs = report["configs"]
    assert set(configs) == {"0.3/mosaic", "0.3/stepwise", "0.3/stepwise-copies"}
    assert configs["0.3/stepwise"]["num_stages"] == 6
    assert configs["0.3/stepwise"]["mean_sparsity"] == pytest.approx(0.3, abs=1e-6)
    assert configs["0.3/stepwise"]["stage_sparsities"] == configs["0.3/stepwise-copies"]["stage_sparsities"]
    assert configs["0.3/stepwise"]["memory_ratio"] < configs["0.3/stepwise-copies"]["memory_ratio"]
    assert set(report["differences"]) == {"0.3/stepwise - mosaic", "0.3/stepwise - stepwise-copies",
                                          "0.3/stepwise-copies - mosaic"}
    d = report["differences"]["0.3/stepwise - mosaic"]["psnr_to_dense"]
    assert d["value"] == pytest.approx(configs["0.3/stepwise"]["psnr_to_dense"] - configs["0.3/mosaic"]["psnr_to_dense"],
                                       abs=1e-9)
    assert "stepwise" in capsys.readouterr().out
