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
                                  "stepwise-copies", "--stepwise-stages", "2", "--s-max", "0.35", "--num-samples", "4", "--steps", "6", "--samples-per-stage", "4",
                                  "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    configs = report["configs"]
    assert set(configs) == {"0.3/mosaic", "0.3/stepwise", "0.3/stepwise-copies", "0.3/stepwise-k2"}
    assert configs["0.3/stepwise"]["num_stages"] == 6
    assert configs["0.3/stepwise-k2"]["num_stages"] == 2
    assert configs["0.3/stepwise-k2"]["mean_sparsity"] == pytest.approx(0.3, abs=1e-6)
    assert report["s_max"] == 0.35  # the cap reaches every stepwise model (its allocation alone exceeds it)
    assert all(max(configs[f"0.3/{m}"]["stage_sparsities"]) <= 0.35 + 1e-4 for m in ("stepwise", "stepwise-k2"))
    assert configs["0.3/stepwise"]["mean_sparsity"] == pytest.approx(0.3, abs=1e-6)
    assert configs["0.3/stepwise"]["stage_sparsities"] == configs["0.3/stepwise-copies"]["stage_sparsities"]
    assert configs["0.3/stepwise"]["memory_ratio"] < configs["0.3/stepwise-copies"]["memory_ratio"]
    assert set(report["differences"]) == {"0.3/stepwise - mosaic", "0.3/stepwise - stepwise-copies",
                                          "0.3/stepwise - stepwise-k2", "0.3/stepwise-copies - mosaic",
                                          "0.3/stepwise-copies - stepwise-k2", "0.3/stepwise-k2 - mosaic"}
    d = report["differences"]["0.3/stepwise - mosaic"]["psnr_to_dense"]
    assert d["value"] == pytest.approx(configs["0.3/stepwise"]["psnr_to_dense"] - configs["0.3/mosaic"]["psnr_to_dense"],
                                       abs=1e-9)
    assert "stepwise" in capsys.readouterr().out


def test_a_search_run_here_is_reusable_as_a_stored_search(tmp_path, monkeypatch):
    """``--searched run`` writes its search log; ``--searched FILE`` re-prunes the same model from it."""
    from mosaicdiff.app import searched
    from mosaicdiff.search.es import EvolutionConfig

    monkeypatch.setattr(searched, "FITNESS_IMAGES", 4)
    tiny = EvolutionConfig(population=1, offspring=1, generations=1, seed=0)
    monkeypatch.setattr(compare_stepwise, "searched_mosaic",
                        lambda run, sp, g: searched.searched_mosaic(run, sp, g, evolution=tiny))
    common = ["--model", "digits-dit", "--sparsities", "0.3", "--methods", "searched", "--num-samples", "4",
              "--steps", "6", "--samples-per-stage", "4"]
    first, second = tmp_path / "run.json", tmp_path / "stored.json"
    assert compare_stepwise.main([*common, "--searched", "run", "--out", str(first)]) == 0
    log = json.loads(first.read_text())["searches"]["0.3"]
    assert log["num_stages"] == len(log["stage_sparsities"]) >= 2
    assert compare_stepwise.main([*common, "--searched", str(first), "--out", str(second)]) == 0
    ran, stored = (json.loads(p.read_text())["configs"]["0.3/searched"] for p in (first, second))
    assert stored["stage_sparsities"] == ran["stage_sparsities"]
    assert stored["prune_seconds"] == pytest.approx(ran["prune_seconds"], abs=0.01)
    assert stored["psnr_to_dense"] == pytest.approx(ran["psnr_to_dense"], abs=1e-3)
