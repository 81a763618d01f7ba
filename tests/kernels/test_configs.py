"""configs: keys, shipped tables, the persistent autotune cache and per-stage pre-resolution."""

from __future__ import annotations

import json

import pytest
import torch

from mosaic_kernels import configs


def test_keys_and_buckets():
    assert configs.shape_bucket("ln_modulate", (2, 256, 1152)) == "D2048"
    assert configs.shape_bucket("ln_modulate", (512, 1000)) == "D1024"
    assert configs.shape_bucket("linear_gelu", (4096, 2304, 1152)) == "M4096_N2304_K1152"
    assert configs.shape_bucket("linear_gelu", (4000, 2304, 1152)) == "M4096_N2304_K1152"
    assert configs.config_key("gated_residual", (1, 2, 72), torch.bfloat16, "cpu") == "gated_residual/D128/bf16/cpu"
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        configs.shape_bucket("softmax", (1, 2))
    with pytest.raises(ValueError, match=r"shape must be \(M, N, K\)"):
        configs.shape_bucket("linear_gelu", (1, 2))
    with pytest.raises(TypeError, match="unsupported dtype"):
        configs.config_key("ln_modulate", (1, 2, 3), torch.float64, "cpu")


def test_interpreter_config_is_single_and_covers_row():
    cfg = configs.interpreter_config("ln_modulate", (2, 8, 1152))
    assert cfg["BLOCK_D"] == 2048 and cfg["BLOCK_M"] == 16  # all 16 rows in one program
    with pytest.raises(NotImplementedError, match="exceeds the single-pass row limit"):
        configs.interpreter_config("ln_modulate", (1, 1, configs.MAX_FUSED_D + 1))


@pytest.mark.parametrize("family", ["h100", "a100"])
def test_shipped_tables_are_valid(family, monkeypatch, tmp_config_cache):
    """Every op resolves from the table, tables say they are untuned, GEMMs default to vendor."""
    table = configs._load_table(family)
    assert table["tuned_on_hardware"] is False and "NOT" in table["note"]
    monkeypatch.setattr(configs, "device_name", lambda device: family.upper())
    monkeypatch.setattr(configs, "_interpreting", lambda device: False)
    for op in configs.ROW_OPS:
        for D in (72, 1152, 4608, 8192):
            cfg = configs.get_config(op, (2, 256, D), torch.bfloat16, "cpu")
            assert cfg["BLOCK_D"] >= (D if op != "gated_residual" else 1) and cfg["num_warps"] in (4, 8, 16, 32)
    for op in configs.GEMM_OPS:
        cfg = configs.get_config(op, (4096, 2304, 1152), torch.bfloat16, "cpu")
        assert cfg["backend"] == "vendor" and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(cfg)
    assert configs.table_config("ln_modulate", (1, 1, 72), torch.float32, "cpu") == {"BLOCK_M": 8, "num_warps": 4}


def test_table_match_rules():
    m = {"dtype": ["bf16"], "N": 2304, "K_min": 1000}
    assert configs._matches(m, "linear_gelu", (64, 2304, 1152), torch.bfloat16)
    assert not configs._matches(m, "linear_gelu", (64, 2304, 1152), torch.float16)
    assert not configs._matches(m, "linear_gelu", (64, 2301, 1152), torch.bfloat16)
    assert not configs._matches(m, "linear_gelu", (64, 2304, 576), torch.bfloat16)


def test_autotune_persists_and_is_read_back(tmp_config_cache, monkeypatch):
    monkeypatch.setattr(configs, "_interpreting", lambda device: False)
    cands = [{"backend": "vendor"}, {"backend": "triton", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
             {"backend": "triton", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}]
    times = {0: 3.0, 1: 1.0, 2: 2.0}
    seen = []

    def bench(cfg):
        seen.append(cfg)
        i = cands.index(cfg)
        if i == 2:
            raise RuntimeError("does not compile")  # a failing candidate is skipped
        return times[i]

    best = configs.autotune("linear_gelu", (4096, 576, 1152), torch.bfloat16, "cpu", cands, bench)
    assert best == cands[1] and len(seen) == 3
    data = json.loads(tmp_config_cache.read_text())
    key = configs.config_key("linear_gelu", (4096, 576, 1152), torch.bfloat16, "cpu")
    assert data["entries"][key]["config"] == cands[1] and data["entries"][key]["time_ms"] == 1.0
    assert not list(tmp_config_cache.parent.glob(".configs.*.tmp")), "temp file left behind"
    configs.clear_memo()  # a new process: read from the file
    assert configs.get_config("linear_gelu", (4000, 576, 1152), torch.bfloat16, "cpu")["backend"] == "triton"
    # a second tuned key merges into the same file
    configs.autotune("linear_gelu", (64, 576, 1152), torch.bfloat16, "cpu", cands[:1], lambda c: 0.5)
    assert len(json.loads(tmp_config_cache.read_text())["entries"]) == 2


def test_autotune_needs_bench_off_gpu_and_a_working_candidate(tmp_config_cache):
    with pytest.raises(RuntimeError, match="autotune benchmarks on a CUDA device"):
        configs.autotune("ln_modulate", (1, 2, 72), torch.float32, "cpu")

    def broken(cfg):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="all 1 candidates failed"):
        configs.autotune("ln_modulate", (1, 2, 72), torch.float32, "cpu", [{"BLOCK_M": 1}], broken)


def test_corrupt_cache_is_ignored(tmp_config_cache, monkeypatch, caplog):
    monkeypatch.setattr(configs, "_interpreting", lambda device: False)
    tmp_config_cache.write_text("{not json")
    cfg = configs.get_config("ln_modulate", (1, 2, 72), torch.float32, "cpu")
    assert cfg == configs.default_config("ln_modulate", (1, 2, 72), torch.float32, "cpu")
    assert "ignoring unreadable autotune cache" in caplog.text


def test_select_configs_for_shapes(tmp_config_cache):
    """A stage's shapes resolve in one call; keys are unique per (op, bucket, dtype, device)."""
    M, C, F, h_hd = 512, 1152, 2304, 576
    items = [
        ("ln_modulate", (2, 256, C), torch.bfloat16),
        ("linear_gelu", (M, F, C), torch.bfloat16),
        ("linear_gated_residual", (M, C, F), torch.bfloat16),
        ("linear_gated_residual", (M, C, h_hd), torch.bfloat16),
        ("gated_residual_ln_modulate", (2, 256, C), torch.bfloat16),
        ("ln_modulate", (2, 256, C), torch.bfloat16),  # duplicate
    ]
    out = configs.select_configs_for_shapes(items, "cpu")
    assert len(out) == 5
    assert all(cfg for cfg in out.values())


def test_cache_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.CACHE_ENV, str(tmp_path / "x.json"))
    assert configs.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv(configs.CACHE_ENV)
    assert configs.cache_path().parts[-3:] == (".cache", "mosaic_kernels", "configs.json")
