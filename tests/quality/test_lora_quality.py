"""scripts/lora_quality.py: the random LoRA's scale, the fused reference, and a reduced run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import lora_quality


def test_the_random_lora_has_the_asked_strength_and_fuses_into_the_dense_weights():
    from mosaicdiff.families.dit import testing

    dense = testing.tiny_dense()
    lora = lora_quality.random_lora(dense, rank=4, strength=0.25, seed=0)
    assert len(lora) == 2 * len(lora_quality.LORA_MODULES) * len(dense.transformer_blocks)
    fused = lora_quality.fused_dense(dense, lora)
    for j in range(len(dense.transformer_blocks)):
        for name in lora_quality.LORA_MODULES:
            module = f"transformer_blocks.{j}.{name}"
            a, b = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
            assert a.shape[0] == b.shape[1] == 4
            w = dense.get_submodule(module).weight.detach()
            delta = fused.get_submodule(module).weight.detach() - w
            assert_close(delta, b @ a, atol=1e-6, rtol=1e-5)
            assert abs(float(delta.norm() / w.norm()) - 0.25) < 1e-4
    assert not torch.equal(lora_quality.random_lora(dense, 4, 0.25, seed=1)[next(iter(lora))], lora[next(iter(lora))])


def test_a_reduced_run_writes_every_model_with_intervals(tmp_path):
    out = tmp_path / "lora.json"
    assert lora_quality.main(["--out", str(out), "--steps", "3", "--num-samples", "10", "--samples-per-stage", "4",
                              "--strength", "0.3"]) == 0
    report = json.loads(out.read_text())
    assert [r["strength"] for r in report["runs"]] == [0.3]
    run = report["runs"][0]
    assert set(run["models"]) == {"dense_without_lora", "mosaic_without_lora", "mosaic_plus_lora", "pruned_fused"}
    for name, m in [*run["models"].items(), ("pruning alone", report["mosaic_to_dense_without_lora"])]:
        iv = m["intervals"]["psnr_to_dense"]
        assert iv["low"] <= m["psnr_to_dense"] <= iv["high"] < 100, name  # none is its reference itself
    # loading the LoRA moves the mosaic's images towards the dense + LoRA ones
    assert run["models"]["mosaic_plus_lora"]["psnr_to_dense"] > run["models"]["mosaic_without_lora"]["psnr_to_dense"]
    assert "psnr_to_dense" in run["mosaic_plus_lora_minus_pruned_fused"]
