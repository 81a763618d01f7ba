"""scripts/cache_quality.py on a tiny setting: the counted block evaluations follow the caches' rules.

With a first-block cache threshold no step can stay under (1e9), every sampling run's first step
runs every block and each later step the first block only, restarting at each stage switch of the
mosaic; TaylorSeer's computed steps follow its warm-up and interval per stage. The counts come from
the instrumented blocks, so these are checks of what really ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import cache_quality  # noqa: E402

STEPS, IMAGES, BATCH = 5, 10, 5


def test_a_tiny_run_counts_what_the_caches_skip(tmp_path):
    out = tmp_path / "cache.json"
    assert cache_quality.main(["--out", str(out), "--steps", str(STEPS), "--num-samples", str(IMAGES),
                               "--batch", str(BATCH), "--samples-per-stage", "4", "--threshold", "1e9",
                               "--taylor-warmup", "3", "--taylor-interval", "3"]) == 0
    report = json.loads(out.read_text())
    v, runs = report["variants"], IMAGES // BATCH
    assert set(v) == {"dense", "dense+fbc", "dense+taylorseer", "mosaic", "mosaic+fbc", "mosaic+taylorseer"}
    (layers,) = {f // (STEPS * runs) for f in v["dense"]["block_forwards_per_stage"]}
    assert v["dense"]["block_evals_per_image"] == 2 * STEPS * layers  # CFG: two rows per image
    assert v["dense+fbc"]["block_evals_per_image"] == 2 * (layers + STEPS - 1)
    # TaylorSeer computes steps 0, 1, 2 (warm-up) and 4, predicts step 3
    assert v["dense+taylorseer"]["block_evals_per_image"] == 2 * 4 * layers
    steps_per_stage = [f // (runs * layers) for f in v["mosaic"]["block_forwards_per_stage"]]
    assert sum(steps_per_stage) == STEPS and len(steps_per_stage) == 3
    assert v["mosaic+fbc"]["block_forwards_per_stage"] == [runs * (layers + k - 1) if k else 0 for k in steps_per_stage]
    assert v["mosaic"]["block_evals_per_image"] == v["dense"]["block_evals_per_image"]
    assert v["mosaic"]["dense_block_equivalents_per_image"] < v["dense"]["dense_block_equivalents_per_image"]
    assert v["dense"]["psnr_to_dense"] > 60  # the engine dense model computes the dense one
    for name in ("dense+fbc", "mosaic", "mosaic+fbc"):
        iv = v[name]["intervals"]["psnr_to_dense"]
        assert iv["low"] <= v[name]["psnr_to_dense"] <= iv["high"] < 60, name  # not the dense images
    m = report["multiply"]["fbc"]
    assert abs(m["gain_both"] - v["dense"]["dense_block_equivalents_per_image"]
               / v["mosaic+fbc"]["dense_block_equivalents_per_image"]) < 1e-9
    assert abs(m["gain_if_multiplied"] - m["gain_cache_alone"] * m["gain_mosaic_alone"]) < 1e-9
