"""scripts/stage_sensitivity.py: equal-step windows that tile the trajectory, and a reduced run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import stage_sensitivity  # noqa: E402


@pytest.mark.parametrize("timesteps, n, end", [(list(range(980, -1, -20)), 10, 1000),
                                               ([1000.0, 966.7, 700.5, 400.2, 100.0, 1.0], 4, 1001),
                                               (list(range(999, -1, -111)), 3, 1000)])
def test_windows_hold_equal_step_counts_and_tile_the_range(timesteps, n, end):
    windows = stage_sensitivity.step_windows(torch.tensor(timesteps), n, end)
    assert windows[0][2] == end and windows[-1][1] == 0
    assert all(a[1] == b[2] for a, b in zip(windows, windows[1:])), windows  # contiguous, high t first
    counts = [sum(t0 <= t < t1 for t in timesteps) for _, t0, t1 in windows]
    assert sum(counts) == len(timesteps) and max(counts) - min(counts) <= 1, counts
    with pytest.raises(ValueError, match="--windows"):
        stage_sensitivity.step_windows(torch.tensor(timesteps), len(timesteps) + 1, end)


def test_a_reduced_run_prunes_one_window_at_a_time(tmp_path):
    out = tmp_path / "sens.json"
    assert stage_sensitivity.main(["--model", "digits-dit", "--out", str(out), "--windows", "2", "--steps", "4",
                                   "--num-samples", "10", "--samples-per-stage", "4"]) == 0
    report = json.loads(out.read_text())
    assert [w["steps"] for w in report["windows"]] == [2, 2]
    for w in report["windows"]:
        iv = w["intervals"]["psnr_to_dense"]
        assert iv["low"] <= w["psnr_to_dense"] <= iv["high"] < 100, w  # pruned: not the dense images
        assert w["widths"]["head_sparsity"] > 0 and 0 <= w["closed_form_score"] <= 1
    assert report["cache"]["hessian_passes"] == 2
