"""configs: keys, shipped tables, the persistent autotune cache and per-stage pre-resolution."""

from __future__ import annotations

import json

import pytest
import torch

from mosaic_kernels import configs


def test_keys_and_buckets():
    assert configs.shape_bucket("ln_modulate", (2, 256, 1152)) == "D1024+128"
    assert configs.shape_bucket("ln_modulate", (512, 1000)) == "D512+512"
    assert configs.shape_bucket("gated_residual_ln_modulate", (512, 4096)) == "D4096"
    assert configs.shape_bucket("linear_gelu", (4096, 2304, 1152)) == "M4096_N2304_K1152"
    assert configs.shape_bucket("linear_gelu", (4000, 2304, 1152)) == "M4096_N2304_K1152"
    assert configs.config_key("gated_residual", (1, 2, 72), torch.bfloat16, "cpu") == "gated_residual/D64+8/bf16/cpu"
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        configs.shape_bucket("softmax", (1, 2))
    with pytest.raises(ValueError, match=r"shape must be \(M, N, K\)"):
        configs.shape_bucket("linear_gelu", (1, 2))
    with pytest.raises(TypeError, match="unsupported dtype"):
        configs.config_key("ln_modulate", (1, 2, 3), torch.float64, "cpu")


def test_interpreter_config_is_single_and_covers_row():
    cfg = configs.interpreter_config("ln_modulate", (2, 8, 1152))
    assert (cfg["BLOCK_D"], cfg["TAIL_D"], cfg["BLOCK_M"]) == (1024, 128, 16)  # all 16 rows in one program
    cfg = configs.interpreter_config("gated_residual", (2, 8, 1152))
    assert (cfg["BLOCK_D"], cfg["TAIL_D"], cfg["BLOCK_M"]) == (1024, 128, 16)  # one column tile + tail
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
        for D in (72, 1000, 1152, 2301, 4608, 8192):
            cfg = configs.get_config(op, (2, 256, D), torch.bfloat16, "cpu")
            _assert_valid_row_config(op, D, cfg)
            assert cfg["num_warps"] in (4, 8, 16, 32)
            if D == 1152:
                assert configs.lane_utilization(op, D, cfg) == 1.0
    for op in configs.GEMM_OPS:
        cfg = configs.get_config(op, (4096, 2304, 1152), torch.bfloat16, "cpu")
        assert cfg["backend"] == "vendor" and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(cfg)
    assert configs.table_config("ln_modulate", (1, 1, 72), torch.float32, "cpu") == {"BLOCK_M": 8, "num_warps": 4}


def _assert_valid_row_config(op, D, cfg):
    """cfg is what the row kernels run for width D: powers of two, column blocks fitted to D."""
    bm, bd, td = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["TAIL_D"]
    for v in (bm, bd):
        assert v >= 1 and v & (v - 1) == 0, (op, D, cfg)
    assert td == 0 or td & (td - 1) == 0, (op, D, cfg)
    if op == "gated_residual":
        assert (bd, td) == configs.column_tiles(D, bd)[::2], (op, D, cfg)
    else:
        assert (bd, td) == configs.row_blocks(D), (op, D, cfg)
    assert configs.fit_row_config(op, D, cfg) == cfg, (op, D, cfg)


def test_row_blocks_cover_every_width():
    """main + tail cover D exactly: the main chunk never masked, the tail < 2x what it covers."""
    examples = {1: (1, 0), 2: (2, 0), 3: (2, 1), 13: (8, 8), 72: (64, 8), 576: (512, 64), 1000: (512, 512),
                1025: (1024, 1), 1152: (1024, 128), 2301: (2048, 256), 4096: (4096, 0), 4608: (4096, 512)}
    for D, split in examples.items():
        assert configs.row_blocks(D) == split, D
    for D in list(range(1, 5001)) + [65535, 65536]:
        bd, td = configs.row_blocks(D)
        rem = D - bd
        assert bd & (bd - 1) == 0 and bd <= D < 2 * bd, D  # main: largest power of two <= D
        if rem == 0:
            assert td == 0, D
        else:
            assert td & (td - 1) == 0 and rem <= td < 2 * rem, D  # tail: next power of two >= rem
        assert bd + td <= configs.next_power_of_2(D), D  # never more lanes than one pow2 block
        util = configs.lane_utilization("ln_modulate", D)
        assert util == D / (bd + td) and util >= D / configs.next_power_of_2(D) and util > 0.5, D
    with pytest.raises(ValueError, match="D must be >= 1"):
        configs.row_blocks(0)


def test_column_tiles_cover_every_width():
    for D in range(1, 5001):
        for width in (1, 8, 64, 256, 1024, 8192):
            bd, n_full, td = configs.column_tiles(D, width)
            rem = D - n_full * bd
            assert bd == min(width, configs.prev_power_of_2(D)) and n_full >= 1, (D, width)
            assert 0 <= rem < bd and (td == 0 if rem == 0 else rem <= td < 2 * rem), (D, width)
    assert configs.column_tiles(1152, 1024) == (1024, 1, 128)
    assert configs.column_tiles(1152, 256) == (256, 4, 128)
    assert configs.column_tiles(72, 1024) == (64, 1, 8)
    with pytest.raises(ValueError, match="power of two"):
        configs.column_tiles(1152, 96)


def test_lane_utilization_dit_width():
    """D = 1152 (DiT-XL/2): no masked lane in any row kernel (one 2048 block wasted 44%)."""
    for op in configs.ROW_OPS:
        assert configs.lane_utilization(op, 1152) == 1.0
    assert configs.lane_utilization("gated_residual", 1152, {"BLOCK_D": 256}) == 1.0
    assert configs.lane_utilization("ln_modulate", 2301) == pytest.approx(2301 / 2304)
    assert configs.lane_utilization("gated_residual", 1000, {"BLOCK_D": 1024}) == pytest.approx(1000 / 1024)
    with pytest.raises(ValueError, match="not a row op"):
        configs.lane_utilization("linear_gelu", 1152)


@pytest.mark.parametrize("op", configs.ROW_OPS)
def test_every_row_config_is_valid(op):
    """default_config, interpreter_config and candidate_configs only return runnable configs."""
    for D in (1, 2, 3, 13, 72, 576, 1000, 1025, 1152, 2301, 4608, 8192, 65536):
        shape = (3, 5, D)
        configs_for_D = [configs.default_config(op, shape, torch.bfloat16, "cpu"),
                         configs.interpreter_config(op, shape)] + configs.candidate_configs(op, shape, torch.bfloat16)
        for cfg in configs_for_D:
            _assert_valid_row_config(op, D, cfg)
            lanes = cfg["BLOCK_D"] + cfg["TAIL_D"] if op != "gated_residual" else cfg["BLOCK_D"]
            assert cfg["BLOCK_M"] * lanes <= 2 * configs.MAX_FUSED_D, (op, D, cfg)


def test_fit_row_config_overrides_stale_blocks(tmp_config_cache, monkeypatch):
    """A cached norm config from the old kernels (BLOCK_D = next pow2) runs with the fitted split."""
    monkeypatch.setattr(configs, "_interpreting", lambda device: False)
    key = configs.config_key("ln_modulate", (2, 8, 1152), torch.bfloat16, "cpu")
    tmp_config_cache.write_text(json.dumps({"version": configs.CACHE_VERSION, "entries": {
        key: {"config": {"BLOCK_M": 2, "BLOCK_D": 2048, "num_warps": 8}}}}))
    cfg = configs.get_config("ln_modulate", (2, 8, 1152), torch.bfloat16, "cpu")
    assert cfg == {"BLOCK_M": 2, "BLOCK_D": 1024, "TAIL_D": 128, "num_warps": 8}
    assert configs.fit_row_config("gated_residual", 1152, {"BLOCK_M": 4, "BLOCK_D": 4096})["BLOCK_D"] == 1024
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        configs.fit_row_config("ln_modulate", 1152, {"BLOCK_M": 3})
    with pytest.raises(ValueError, match="over 65535"):
        configs.fit_row_config("gated_residual", 65536, {"BLOCK_M": 1, "BLOCK_D": 1})


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
    expected_keys = {configs.config_key(op, shape, dtype, "cpu"): (op, shape, dtype) for op, shape, dtype in items}
    assert list(out) == list(expected_keys)  # one entry per distinct key, in first-seen order
    assert list(out)[:2] == ["ln_modulate/D1024+128/bf16/cpu", "linear_gelu/M512_N2304_K1152/bf16/cpu"]
    for key, (op, shape, dtype) in expected_keys.items():
        cfg = out[key]
        assert cfg == configs.get_config(op, shape, dtype, "cpu"), key  # what the op itself would run
        if op in configs.ROW_OPS:
            _assert_valid_row_config(op, shape[-1], cfg)
        else:
            assert cfg["backend"] in ("vendor", "triton"), (key, cfg)
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, (key, name, cfg)


def test_cache_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.CACHE_ENV, str(tmp_path / "x.json"))
    assert configs.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv(configs.CACHE_ENV)
    assert configs.cache_path().parts[-3:] == (".cache", "mosaic_kernels", "configs.json")
