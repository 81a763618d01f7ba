"""`mosaicdiff.quantize(model, "fp8")`: float8 compact GEMM weights with per-output-channel scales.

Oracle: a copy of the mosaic whose compact weights are replaced by their dequantized values
(``q.float() * scale``, written here) and run through the unquantized ops. The quantized mosaic
runs the FP8 GEMMs (the Triton kernels through the interpreter where it is enabled, else the
reference), so the two agree up to fp32 rounding in ``"weight_only"`` mode. Against the
original weights, the error is the quantization's (a few parts per thousand): a quantize that
dropped the scales, or applied one per tensor, fails both checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mosaicdiff
import mosaic_kernels as mk
from mosaicdiff.core.quantize import quantized_modules
from mosaicdiff.families.dit.model import MosaicDiT
from tests.families.conformance import dequantized_copy
from tests.runtime.dit_helpers import inputs, two_stage_specs
from tests.runtime.test_shared_producers import nested_specs

FP8 = torch.float8_e4m3fn


def _mosaic(dense, shared: bool) -> MosaicDiT:
    specs = nested_specs(dense) if shared else two_stage_specs(dense)
    return MosaicDiT.from_dense(dense, specs, share_producers=shared).eval()


def _run(model, t):
    x, labels = inputs()
    with torch.no_grad():
        return model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample


def _backend() -> str:
    return "triton" if mk.backends("cpu")["triton"]["available"] else "torch"


@pytest.mark.auto_backend
@pytest.mark.parametrize("shared", [True, False], ids=["shared-producers", "copies"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused-boundaries", "per-block"])
def test_quantized_mosaic_equals_its_dequantized_weights(dense, shared, fuse):
    mosaic = _mosaic(dense, shared)
    mosaic.fuse_block_boundaries = fuse
    original = copy.deepcopy(mosaic)
    assert mosaicdiff.quantize(mosaic, "fp8") is mosaic
    targets = quantized_modules(mosaic)
    assert targets and all(getattr(m, n).dtype == FP8 and getattr(m, f"{n}_scale").dtype == torch.float32
                           for _, m in targets for n in type(m).fp8_weights if getattr(m, n).numel())
    oracle = dequantized_copy(mosaic)
    with mk.use_backend(_backend()), mk.ops.record_dispatch() as calls:
        got = {t: _run(mosaic, t) for t in (100, 500, 900)}
    assert calls[("fp8_gemm", _backend())] > 0, dict(calls)
    with mk.use_backend("torch"):
        for t, out in got.items():
            assert_close(out, _run(oracle, t), atol=1e-4, rtol=1e-4, msg=lambda m: f"t={t}\n{m}")
            want = _run(original, t)
            rel = float((out - want).norm() / want.norm())
            assert rel < 0.03, f"t={t}: quantized vs original weights, relative error {rel:.4f}"


@pytest.mark.auto_backend
def test_per_token_activations(dense):
    mosaic = _mosaic(dense, shared=True)
    original = copy.deepcopy(mosaic)
    mosaicdiff.quantize(mosaic, "fp8", activations="per_token")
    assert {m.fp8_mode for _, m in quantized_modules(mosaic) if hasattr(m, "fp8_mode")} == {"per_token"}
    with mk.use_backend(_backend()):
        out = _run(mosaic, 500)
    with mk.use_backend("torch"):
        want, weight_only = _run(original, 500), _run(dequantized_copy(mosaic), 500)
    rel = float((out - want).norm() / want.norm())
    assert 0 < rel < 0.06, rel
    assert float((out - weight_only).abs().max()) > 1e-5  # the activations were quantized too


@pytest.mark.parametrize("shared", [True, False], ids=["shared-producers", "copies"])
def test_memory_report_halves_the_bf16_compact_weight_bytes(dense, shared):
    mosaic = _mosaic(dense, shared).to(torch.bfloat16)
    before = mosaic.memory_report()
    n_weights = sum(getattr(m, n).numel() for _, m in quantized_modules(mosaic) for n in type(m).fp8_weights)
    mosaicdiff.quantize(mosaic, "fp8")
    after = mosaic.memory_report()
    n_scales = sum(getattr(m, n).shape[0] for _, m in quantized_modules(mosaic) for n in type(m).fp8_weights
                   if getattr(m, n).numel())

    def compact(r):
        return r["producer_bytes"] + sum(s["bytes"] for s in r["stages"].values())

    assert compact(after) == compact(before) - n_weights + 4 * n_scales  # 2 -> 1 byte a weight, + fp32 scales
    assert compact(after) < 0.6 * compact(before)
    assert after["shared_bytes"] == before["shared_bytes"]  # the skeleton is not quantized


def test_engine_dense_model_is_quantized_too(dense):
    engine = MosaicDiT.from_dense_unpruned(dense).eval()
    want = _run(engine, 500)
    mosaicdiff.quantize(engine, "fp8")
    rel = float((_run(engine, 500) - want).norm() / want.norm())
    assert 0 < rel < 0.03, rel


def test_quantize_twice_changes_nothing(dense):
    mosaic = mosaicdiff.quantize(_mosaic(dense, shared=False), "fp8")
    state = {k: (v.data_ptr(), v.dtype) for k, v in mosaic.state_dict().items()}
    mosaicdiff.quantize(mosaic, "fp8")
    assert {k: (v.data_ptr(), v.dtype) for k, v in mosaic.state_dict().items()} == state  # nothing re-quantized


def test_bad_arguments_raise_clear_errors(dense):
    mosaic = _mosaic(dense, shared=False)
    with pytest.raises(ValueError, match=r"mode must be one of \('fp8',\), got 'int4'"):
        mosaicdiff.quantize(mosaic, "int4")
    with pytest.raises(ValueError, match="activations must be one of"):
        mosaicdiff.quantize(mosaic, "fp8", activations="fp8")
    with pytest.raises(NotImplementedError, match="Sequential has no compact blocks with FP8 GEMM weights"):
        mosaicdiff.quantize(nn.Sequential(nn.Linear(4, 4)), "fp8")


def test_quantize_and_layerwise_casting_refuse_each_other(dense):
    cast = _mosaic(dense, shared=False)
    cast.enable_layerwise_casting(compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="layerwise casting enabled"):
        mosaicdiff.quantize(cast, "fp8")
    quantized = mosaicdiff.quantize(_mosaic(dense, shared=False), "fp8")
    with pytest.raises(RuntimeError, match="on a quantized mosaic"):
        quantized.enable_layerwise_casting(compute_dtype=torch.float32)


def test_a_saved_config_with_a_bad_quantization_spec_is_refused(dense, tmp_path):
    import json

    mosaicdiff.quantize(_mosaic(dense, shared=True), "fp8").save_pretrained(tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["_quantization"] == {"mode": "fp8", "activations": "weight_only"}
    config["_quantization"] = {"mode": "int4", "activations": "weight_only"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: _quantization: quantize_layout: spec must be"):
        MosaicDiT.from_pretrained(tmp_path / "q")
