"""configs: the per-shape choices (vendor vs Triton GEMM, SDPA kernel), their measurement, the
persisted cache and the per-stage pre-resolution. The Triton launch settings are tested in
test_settings.py."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

import mosaic_kernels as mk
from mosaic_kernels import configs, ops
from mosaic_kernels.ops import _dispatch

GEMM = (4096, 576, 1152)


def test_keys_and_buckets():
    assert configs.shape_bucket("linear_gelu", (4096, 2304, 1152)) == "M4096_N2304_K1152"
    assert configs.shape_bucket("linear_gelu", (4000, 2304, 1152)) == "M4096_N2304_K1152"
    assert configs.shape_bucket("linear_gated_residual", (1 << 22, 1152, 576)) == "M1048576_N1152_K576"
    assert configs.config_key("linear_gelu", (512, 2304, 1152), torch.bfloat16, "cpu") == \
        "linear_gelu/M512_N2304_K1152/bf16/cpu"
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        configs.shape_bucket("softmax", (1, 2))
    with pytest.raises(ValueError, match=r"shape must be \(M, N, K\)"):
        configs.shape_bucket("linear_gelu", (1, 2))
    with pytest.raises(ValueError, match="nothing is chosen per shape"):
        configs.shape_bucket("ln_modulate", (2, 256, 1152))
    with pytest.raises(TypeError, match="unsupported dtype"):
        configs.config_key("linear_gelu", (1, 2, 3), torch.float64, "cpu")


def test_defaults_are_vendor_gemm_and_torch_sdpa(tmp_config_cache):
    """Without a measurement the GEMMs take the vendor path and attention torch's SDPA choice."""
    for op, case in ops.BENCH_CASES.items():
        if case.choice is None:
            continue
        expected = {"backend": "vendor"} if case.choice.field == "backend" else {"sdpa_backend": "auto"}
        assert configs.default_config(op) == expected, op
        shape = case.tiny_shape
        assert configs.get_config(op, shape, torch.bfloat16, "cpu") == expected, op
    gemm_ops = {op for op, c in ops.BENCH_CASES.items() if c.choice is not None and c.choice.field == "backend"}
    assert {"linear_gelu", "linear_gated_residual"} <= gemm_ops


def test_no_shipped_tables():
    """A shipped table exists only for a card it was tuned on: none was, so none ships."""
    assert not resources.files("mosaic_kernels").joinpath("configs").is_dir()
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert "configs/*.json" not in pyproject


def _timer(times: list[float]):
    """A timer that runs each option and answers the next of ``times`` (an exception: raised)."""
    it = iter(times)

    def timer(fn):
        fn()
        value = next(it)
        if isinstance(value, Exception):
            raise value
        return value

    return timer


def test_measure_persists_and_is_read_back(tmp_config_cache):
    with ops.record_dispatch() as calls:
        best = configs.measure("linear_gelu", GEMM[:1] + (64, 72), torch.float32, "cpu", timer=_timer([3.0, 1.0]))
    assert best == {"backend": "triton"}
    # each option ran the GEMM path it names
    assert set(calls) == {("linear_gelu", "vendor"), ("linear_gelu", "triton")}, calls
    key = configs.config_key("linear_gelu", (4096, 64, 72), torch.float32, "cpu")
    data = json.loads(tmp_config_cache.read_text())
    assert data["version"] == configs.CACHE_VERSION
    assert data["entries"][key]["config"] == {"backend": "triton"}
    assert data["entries"][key]["timings_ms"] == {"vendor": 3.0, "triton": 1.0}
    assert not [p for p in tmp_config_cache.parent.iterdir() if p.name.endswith(".tmp")], "temp file left behind"
    configs.clear_memo()  # a new process: read from the file, for every M of the bucket
    assert configs.get_config("linear_gelu", (4000, 64, 72), torch.float32, "cpu") == {"backend": "triton"}
    # a second measured key merges into the same file; a failing option is skipped
    best = configs.measure("linear_gelu", (64, 64, 72), torch.float32, "cpu",
                           timer=_timer([0.5, RuntimeError("does not compile")]))
    assert best == {"backend": "vendor"}
    assert len(json.loads(tmp_config_cache.read_text())["entries"]) == 2


def test_measured_gemm_choice_reaches_the_dispatch(tmp_config_cache):
    """auto runs the Triton GEMM exactly where a measurement chose it (vendor is CUDA-only, so
    its CPU stand-in is the reference)."""
    if not mk.backends("cpu")["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    x, w = torch.randn(2, 8, 72), torch.randn(64, 72) / 8
    with mk.use_backend("auto"):
        assert _dispatch.gemm_path("linear_gelu", x, 16, 64, 72) == "torch"
        configs.measure("linear_gelu", (16, 64, 72), torch.float32, "cpu", timer=_timer([2.0, 1.0]))
        assert _dispatch.gemm_path("linear_gelu", x, 16, 64, 72) == "triton"
        assert _dispatch.gemm_path("linear_gelu", x, 16, 64, 80) == "torch"  # another shape: default
        with ops.record_dispatch() as calls:
            out = mk.linear_gelu(x, w, None)
    assert calls == {("linear_gelu", "triton"): 1}
    torch.testing.assert_close(out, mk.linear_gelu(x, w, None), atol=1e-5, rtol=1e-5)


def test_measure_needs_a_working_option(tmp_config_cache):
    with pytest.raises(RuntimeError, match="all 2 options failed"):
        configs.measure("linear_gelu", (16, 64, 72), torch.float32, "cpu",
                        timer=_timer([RuntimeError("a"), RuntimeError("b")]))
    with pytest.raises(ValueError, match="nothing is chosen per shape"):
        configs.measure("ln_modulate", (1, 2, 72), torch.float32, "cpu", timer=_timer([1.0]))
    assert not tmp_config_cache.exists()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 1, "entries": {}}), json.dumps([1])])
def test_corrupt_or_old_cache_is_ignored(tmp_config_cache, caplog, content):
    key = configs.config_key("linear_gelu", GEMM, torch.bfloat16, "cpu")
    tmp_config_cache.write_text(content)
    assert configs.get_config("linear_gelu", GEMM, torch.bfloat16, "cpu") == {"backend": "vendor"}
    assert "ignoring" in caplog.text and str(tmp_config_cache) in caplog.text
    # a persisted option the op does not offer is ignored too
    configs.clear_memo()
    tmp_config_cache.write_text(json.dumps({"version": configs.CACHE_VERSION,
                                            "entries": {key: {"config": {"backend": "cudnn"}}}}))
    assert configs.get_config("linear_gelu", GEMM, torch.bfloat16, "cpu") == {"backend": "vendor"}


def test_select_configs_for_shapes(tmp_config_cache):
    """A stage's shapes resolve in one call; keys are unique per (op, bucket, dtype, device); the
    row ops (nothing chosen per shape) get no entry."""
    M, C, F, h_hd = 512, 1152, 2304, 576
    items = [
        ("ln_modulate", (2, 256, C), torch.bfloat16),
        ("linear_gelu", (M, F, C), torch.bfloat16),
        ("linear_gated_residual", (M, C, F), torch.bfloat16),
        ("linear_gated_residual", (M, C, h_hd), torch.bfloat16),
        ("gated_residual_ln_modulate", (2, 256, C), torch.bfloat16),
        ("attention", (2, 256, 8, 72), torch.bfloat16),
        ("linear_gelu", (M - 12, F, C), torch.bfloat16),  # same bucket: a duplicate key
    ]
    out = configs.select_configs_for_shapes(items, "cpu", tune=True)  # tune: CUDA only, ignored here
    assert list(out) == ["linear_gelu/M512_N2304_K1152/bf16/cpu", "linear_gated_residual/M512_N1152_K2304/bf16/cpu",
                         "linear_gated_residual/M512_N1152_K576/bf16/cpu", "attention/B2_L256_H8_hd72/bf16/cpu"]
    for op, shape, dtype in items:
        if ops.BENCH_CASES[op].choice is not None:  # what the op itself would run
            assert out[configs.config_key(op, shape, dtype, "cpu")] == configs.get_config(op, shape, dtype, "cpu")
    assert not tmp_config_cache.exists(), "nothing measured off CUDA"
    with pytest.raises(ValueError, match="unknown op"):
        configs.select_configs_for_shapes([("softmax", (1, 2), torch.float32)], "cpu")


def test_cache_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.CACHE_ENV, str(tmp_path / "x.json"))
    assert configs.cache_path() == tmp_path / "x.json"
    monkeypatch.delenv(configs.CACHE_ENV)
    assert configs.cache_path().parts[-3:] == (".cache", "mosaic_kernels", "configs.json")
