"""Triton launch settings (mosaic_kernels/triton/settings.py): row settings as a function of D and
dtype, the column chunks they are made of, and the GEMM autotune list."""

from __future__ import annotations

import pytest
import torch

settings = pytest.importorskip("mosaic_kernels.triton.settings", reason="triton is not importable")

WIDTHS = (1, 2, 3, 13, 72, 576, 1000, 1025, 1152, 2301, 4608, 8192, 65536)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _assert_valid_row_config(op, D, cfg):
    """cfg is what the row kernels run for width D: powers of two, column blocks fitted to D."""
    bm, bd, td = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["TAIL_D"]
    for v in (bm, bd):
        assert v >= 1 and v & (v - 1) == 0, (op, D, cfg)
    assert td == 0 or td & (td - 1) == 0, (op, D, cfg)
    if op == "gated_residual":
        assert (bd, td) == settings.column_tiles(D, bd)[::2], (op, D, cfg)
    else:
        assert (bd, td) == settings.row_blocks(D), (op, D, cfg)
    assert settings.fit_row_config(op, D, cfg) == cfg, (op, D, cfg)


@pytest.mark.parametrize("op", settings.ROW_OPS)
def test_every_row_setting_is_valid(op):
    """row_settings only returns runnable settings, for every dtype, with no masked lane at 1152."""
    for D in WIDTHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cfg = settings.row_settings(op, D, dtype)
            _assert_valid_row_config(op, D, cfg)
            assert cfg["num_warps"] in (4, 8, 16, 32), (op, D, cfg)
            lanes = cfg["BLOCK_D"] + cfg["TAIL_D"] if op in settings.NORM_OPS else cfg["BLOCK_D"]
            assert cfg["BLOCK_M"] * lanes <= 2 * settings.MAX_FUSED_D, (op, D, cfg)
    assert settings.lane_utilization(op, 1152, settings.row_settings(op, 1152, torch.bfloat16)) == 1.0
    with pytest.raises(NotImplementedError, match="exceeds the single-pass row limit"):
        settings.row_settings(op, settings.MAX_FUSED_D + 1, torch.float32)
    with pytest.raises(TypeError, match="unsupported dtype"):
        settings.row_settings(op, 72, torch.float64)


def test_interpreter_settings_take_whole_rows_in_few_programs():
    """Under the interpreter (programs cost ms each) a program takes many whole rows."""
    if not settings.INTERPRETED:
        pytest.skip("the Triton kernels are compiled here, not interpreted")
    cfg = settings.row_settings("ln_modulate", 1152, torch.float32)
    assert (cfg["BLOCK_D"], cfg["TAIL_D"]) == (1024, 128) and cfg["BLOCK_M"] >= 16  # 2 x 8 rows: one program
    cfg = settings.row_settings("gated_residual", 1152, torch.float32)
    assert (cfg["BLOCK_D"], cfg["TAIL_D"]) == (1024, 128) and cfg["BLOCK_M"] >= 16  # one column tile + tail
    assert len(settings.GEMM_CONFIGS) == 1, "the interpreter cannot autotune over several configs"


def test_row_blocks_cover_every_width():
    """main + tail cover D exactly: the main chunk never masked, the tail < 2x what it covers."""
    examples = {1: (1, 0), 2: (2, 0), 3: (2, 1), 13: (8, 8), 72: (64, 8), 576: (512, 64), 1000: (512, 512),
                1025: (1024, 1), 1152: (1024, 128), 2301: (2048, 256), 4096: (4096, 0), 4608: (4096, 512)}
    for D, split in examples.items():
        assert settings.row_blocks(D) == split, D
    for D in list(range(1, 5001)) + [65535, 65536]:
        bd, td = settings.row_blocks(D)
        rem = D - bd
        assert bd & (bd - 1) == 0 and bd <= D < 2 * bd, D  # main: largest power of two <= D
        if rem == 0:
            assert td == 0, D
        else:
            assert td & (td - 1) == 0 and rem <= td < 2 * rem, D  # tail: next power of two >= rem
        assert bd + td <= _next_pow2(D), D  # never more lanes than one pow2 block
        util = settings.lane_utilization("ln_modulate", D)
        assert util == D / (bd + td) and util >= D / _next_pow2(D) and util > 0.5, D
    with pytest.raises(ValueError, match="D must be >= 1"):
        settings.row_blocks(0)


def test_column_tiles_cover_every_width():
    for D in range(1, 5001):
        for width in (1, 8, 64, 256, 1024, 8192):
            bd, n_full, td = settings.column_tiles(D, width)
            rem = D - n_full * bd
            assert bd == min(width, 1 << (D.bit_length() - 1)) and n_full >= 1, (D, width)
            assert 0 <= rem < bd and (td == 0 if rem == 0 else rem <= td < 2 * rem), (D, width)
    assert settings.column_tiles(1152, 1024) == (1024, 1, 128)
    assert settings.column_tiles(1152, 256) == (256, 4, 128)
    assert settings.column_tiles(72, 1024) == (64, 1, 8)
    with pytest.raises(ValueError, match="power of two"):
        settings.column_tiles(1152, 96)


def test_lane_utilization_dit_width():
    """D = 1152 (DiT-XL/2): no masked lane in any row kernel (one 2048 block wasted 44%)."""
    for op in settings.ROW_OPS:
        assert settings.lane_utilization(op, 1152) == 1.0
    assert settings.lane_utilization("gated_residual", 1152, {"BLOCK_D": 256}) == 1.0
    assert settings.lane_utilization("ln_modulate", 2301) == pytest.approx(2301 / 2304)
    assert settings.lane_utilization("gated_residual", 1000, {"BLOCK_D": 1024}) == pytest.approx(1000 / 1024)
    with pytest.raises(ValueError, match="row op"):
        settings.lane_utilization("linear_gelu", 1152)


def test_fit_row_config_overrides_stale_blocks():
    """A pinned norm config from the old kernels (BLOCK_D = next pow2) runs with the fitted split."""
    cfg = settings.fit_row_config("ln_modulate", 1152, {"BLOCK_M": 2, "BLOCK_D": 2048, "num_warps": 8})
    assert cfg == {"BLOCK_M": 2, "BLOCK_D": 1024, "TAIL_D": 128, "num_warps": 8}
    assert settings.fit_row_config("gated_residual", 1152, {"BLOCK_M": 4, "BLOCK_D": 4096})["BLOCK_D"] == 1024
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        settings.fit_row_config("ln_modulate", 1152, {"BLOCK_M": 3})
    with pytest.raises(ValueError, match="over 65535"):
        settings.fit_row_config("gated_residual", 65536, {"BLOCK_M": 1, "BLOCK_D": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemm_candidates_are_tiles(dtype):
    """The GEMM autotune list: power-of-two tiles of at least 16, warps and stages set."""
    cands = settings.gemm_candidate_configs(dtype)
    assert cands and len(cands) <= len(settings.GEMM_CONFIGS)
    for cfg in cands:
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, (name, cfg)
        assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] >= 1, cfg
