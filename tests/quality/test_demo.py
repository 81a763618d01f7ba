"""`mosaicdiff demo` end to end on a reduced setting, and its partial report on failure."""

from __future__ import annotations

import json
import math
import time

import pytest

from mosaicdiff.app.cli import main

METRIC_KEYS = {"fid", "class_accuracy", "psnr_to_dense", "seconds_per_sample"}


def test_demo_end_to_end(tmp_path, capsys):
    """Reduced setting (8 samples, DDIM 5 steps, 8 calibration samples per stage); measured
    about 25-35 s on 2 free cores, most of it OBS pruning and imports."""
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    code = main(["demo", "--num-samples", "8", "--steps", "5", "--samples-per-stage", "8",
                 "--out", str(out), "--no-progress"])
    elapsed = time.perf_counter() - t0
    print(f"demo (reduced) took {elapsed:.1f} s")
    assert code == 0
    table = capsys.readouterr().out
    for method in ("dense", "mosaic", "uniform", "magnitude"):
        assert method in table, f"{method} missing from the printed table:\n{table}"
        assert (out / f"grid_{method}.png").is_file(), f"grid_{method}.png not written"
    assert (out / "stages.png").is_file()

    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and "error" not in report
    assert set(report["methods"]) == {"dense", "mosaic", "uniform", "magnitude"}
    for name, m in report["methods"].items():
        missing = METRIC_KEYS - set(m)
        assert not missing, f"{name} lacks {missing}"
        assert m["fid"] > 0 and 0 <= m["class_accuracy"] <= 1 and m["seconds_per_sample"] > 0, m
    assert report["methods"]["dense"]["psnr_to_dense"] is None  # the reference itself
    for name in ("mosaic", "uniform", "magnitude"):
        p = report["methods"][name]["psnr_to_dense"]
        assert p is not None and 0 < p < 100, f"{name}: PSNR to dense {p} (pruned images identical to dense?)"

    t_low, t_high = report["boundaries"]
    assert 0 < t_low < t_high < 1000
    stages = report["methods"]["mosaic"]["stages"]
    assert list(stages) == ["early", "middle", "late"]
    assert stages["middle"]["t_start"] == t_low and stages["middle"]["t_end"] == t_high
    sp = {k: v["sparsity"] for k, v in stages.items()}
    assert sp["middle"] < min(sp["early"], sp["late"]), f"middle stage not pruned least: {sp}"
    steps = report["steps_per_stage"]
    mean = sum(steps[k] * sp[k] for k in sp) / sum(steps.values())
    assert math.isclose(mean, 0.5, abs_tol=1e-6), f"step-weighted mean sparsity {mean} != 0.5"
    assert math.isclose(report["methods"]["mosaic"]["mean_sparsity"], mean, abs_tol=1e-6)
    for name in ("uniform", "magnitude"):
        assert report["methods"][name]["stages"]["all"]["sparsity"] == pytest.approx(0.5)
    mem = report["methods"]["mosaic"]["memory"]
    assert {"mosaic_bytes", "dense_bytes", "ratio", "stages"} <= set(mem), sorted(mem)
    assert len(report["empirical_curve"]["mse"]) == 5


def test_demo_keeps_partial_results_on_failure(tmp_path, monkeypatch):
    import mosaicdiff.api
    from mosaicdiff.app.demo import run_demo

    def broken(*args, **kwargs):
        raise RuntimeError("pruning exploded")

    monkeypatch.setattr(mosaicdiff.api, "prune", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        run_demo(tmp_path, num_samples=4, steps=3, samples_per_stage=4, methods=("uniform",), progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is False and "pruning exploded" in report["error"]
    assert "fid" in report["methods"]["dense"], "the finished dense result was lost"
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_report_file_is_valid_json_and_keeps_errors(tmp_path):
    """NaN/inf become null (JSON has neither), tensors and paths become JSON values; an error is
    recorded and re-raised; no temporary file is left."""
    import torch

    from mosaicdiff.app.experiment import ReportFile

    report = ReportFile(tmp_path / "r.json", {"nan": float("nan"), "inf": [float("-inf"), 1.5],
                                              "tensor": torch.tensor([1, 2]), "path": tmp_path, 3: "int key"})
    report.save()
    saved = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["nan"] is None and saved["inf"] == [None, 1.5] and saved["tensor"] == [1, 2]
    assert saved["path"] == str(tmp_path) and saved["3"] == "int key" and saved["wall_seconds"] >= 0
    with pytest.raises(KeyboardInterrupt), report.keeping_errors():
        report.data["step"] = "finished"
        raise KeyboardInterrupt
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["step"] == "finished" and saved["error"] == "KeyboardInterrupt: "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"], "temporary files left behind"


def test_demo_digits_unet_with_seeds_intervals_and_comparisons(tmp_path, capsys):
    """`demo --model digits-unet` (reduced: 4 samples x 2 noise seeds, DDIM 3 steps): the U-Net's
    transformer blocks pruned in three stages, intervals per metric, the paired comparisons
    MosaicDiff - baseline, and QF3's correlations in report.json and in the printed table."""
    out = tmp_path / "unet"
    code = main(["demo", "--model", "digits-unet", "--num-samples", "4", "--num-seeds", "2", "--steps", "3",
                 "--samples-per-stage", "4", "--sparsity", "0.3", "--methods", "mosaic,uniform", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "mosaic - uniform:" in table and "QF3: Pearson" in table, table
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and report["settings"]["model"] == "digits-unet"
    assert report["settings"]["num_seeds"] == 2 and "scaled_linear" in report["settings"]["sampler"]
    dense, mosaic = report["methods"]["dense"], report["methods"]["mosaic"]
    assert dense["images"] == 8 and len(dense["fid_per_seed"]) == 2
    iv = mosaic["intervals"]["psnr_to_dense"]
    assert iv["low"] <= mosaic["psnr_to_dense"] <= iv["high"] and 0 < mosaic["psnr_to_dense"] < 100
    assert list(mosaic["stages"]) == ["early", "middle", "late"]
    sp = {k: v["sparsity"] for k, v in mosaic["stages"].items()}
    assert sp["middle"] < min(sp["early"], sp["late"]), sp
    assert 0 < mosaic["memory"]["ratio"] < 3
    comp = report["comparisons"]["mosaic - uniform"]
    assert set(comp["separated"]) == {"fid", "pixel_w1", "class_accuracy", "psnr_to_dense", "ssim_to_dense",
                                      "speckle_rate"}
    assert 0 <= mosaic["speckle_rate"] <= 1 and 0 < mosaic["ssim_to_dense"] <= 1 and mosaic["pixel_w1"] > 0
    assert comp["psnr_to_dense"]["value"] == pytest.approx(
        mosaic["psnr_to_dense"] - report["methods"]["uniform"]["psnr_to_dense"], abs=1e-9)
    curve = report["stage_curve"]
    assert curve["steps"] == 3 and -1 <= curve["pearson_rate"] <= 1 and curve["pearson_mse"] > 0.9
    for name in ("dense", "mosaic", "uniform"):
        assert (out / f"grid_{name}.png").is_file()


def test_demo_three_way_stepwise_and_searched(tmp_path, monkeypatch, capsys):
    """`demo --methods mosaic,stepwise,searched` (reduced: 4 samples, DDIM 6 steps, a one-generation
    search on 2 held-out images): one stage per step for stepwise (its ten stages capped at the
    steps), five t-uniform stages for the search (six would leave one without a DDIM-6 step: it
    failed so before `stage_count`), stepwise's step-weighted mean at the target, and the paired
    differences stepwise - searched and mosaic - stepwise."""
    from mosaicdiff.app import searched

    monkeypatch.setattr(searched, "EVOLUTION", dict(population=1, offspring=1, generations=1, seed=0))
    monkeypatch.setattr(searched, "FITNESS_IMAGES", 2)
    monkeypatch.setattr(searched, "FITNESS_STEPS", 2)
    out = tmp_path / "three"
    code = main(["demo", "--num-samples", "4", "--steps", "6", "--samples-per-stage", "4", "--sparsity", "0.3",
                 "--methods", "mosaic,stepwise,searched", "--out", str(out), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True
    stepwise, found = report["methods"]["stepwise"], report["methods"]["searched"]
    assert len(stepwise["stages"]) == 6 and len(found["stages"]) == 5
    assert stepwise["mean_sparsity"] == pytest.approx(0.3, abs=1e-6)
    assert found["mean_sparsity"] == pytest.approx(0.3, abs=1e-6)
    assert set(report["comparisons"]) == {"mosaic - stepwise", "mosaic - searched", "stepwise - searched"}
    comp = report["comparisons"]["stepwise - searched"]["psnr_to_dense"]
    assert comp["value"] == pytest.approx(stepwise["psnr_to_dense"] - found["psnr_to_dense"], abs=1e-9)
    assert "stepwise - searched:" in table, table
    assert stepwise["memory"]["ratio"] < found["memory"]["ratio"], "stepwise nests its producers; the search does not"
