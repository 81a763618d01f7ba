"""`mosaicdiff eval` on a tiny sweep: the JSON behind the plot and the plot itself."""

from __future__ import annotations

import json

from mosaicdiff.app.evaluate import format_eval_table, run_eval


def test_eval_sweep_writes_json_and_plot(tmp_path):
    result = run_eval(tmp_path, sparsities=(0.3, 0.5), guidance_scales=(1.0, 2.0), methods=("magnitude",),
                      num_samples=4, steps=3, samples_per_stage=4, progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["complete"] is True
    assert (tmp_path / "fid_vs_sparsity.png").stat().st_size > 1000
    assert set(saved["dense"]) == {"1.0", "2.0"}
    points = {(p["method"], p["sparsity"], p["guidance_scale"]) for p in saved["points"]}
    assert points == {("magnitude", s, g) for s in (0.3, 0.5) for g in (1.0, 2.0)}, points
    for p in saved["points"]:
        assert {"fid", "class_accuracy", "psnr_to_dense", "seconds_per_sample", "stages"} <= set(p), sorted(p)
        assert p["stages"]["all"]["sparsity"] == p["sparsity"]
    table = format_eval_table(result)
    assert "magnitude" in table and "FID g=2" in table, table
