"""The PixArt family beyond the conformance suite: the digits stand-in's exact layout, the refusals of
unsupported variants and unfit calibrations, the text mask, the text k/v cache and the unfused path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff.calibrate import ConditionedCalibration
from mosaicdiff.families.pixart import testing
from mosaicdiff.families.pixart.model import MosaicPixArt

ATOL, RTOL = 5e-5, 1e-5


@pytest.fixture(autouse=True)
def _torch_backend():
    from mosaic_kernels import ops

    with ops.use_backend("torch"):
        yield


def stand_in() -> nn.Module:
    """The layout of the embedded digits-pixart model (random weights)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=6, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
        cross_attention_dim=192, sample_size=16, patch_size=2, caption_channels=64, norm_type="ada_norm_single",
        activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
        use_additional_conditions=False, attention_bias=True).eval()


def label_tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4, 64) label-token states drawn from an 11-row table (row 10: the null prompt)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(11, 4, 64, generator=g)
    return table[torch.arange(n) % 10], table[10:]


def test_the_stand_in_layout_prunes_and_runs_as_it_is_called():
    dense = stand_in()
    tokens, null = label_tokens(8)
    x0 = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    calib = ConditionedCalibration(x0, {"encoder_hidden_states": tokens,
                                        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
                                   {"encoder_hidden_states": null})
    mosaic = mosaicdiff.prune(dense, calib, 0.3, samples_per_stage=4, align=None, progress=False)
    assert isinstance(mosaic, MosaicPixArt) and mosaic.num_stages == 3 and mosaic.config.sample_size == 16
    zero = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([900, 500, 100])
    for mask in (None, torch.ones(3, 4)):
        kw = dict(encoder_hidden_states=tokens[:3], timestep=t, encoder_attention_mask=mask,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
        with torch.no_grad():
            want = dense(x, **kw)[0]
            assert_close(zero(x, **kw)[0], want, atol=ATOL, rtol=RTOL)
            out = mosaic(x, **kw)[0]
        assert out.shape == want.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
        assert (out - want).abs().max() > 1e-3  # pruned


def test_the_text_mask_is_applied_as_diffusers_applies_it():
    """Padding tokens change the output; the mosaic equals dense with a (B, S) mask and with diffusers'
    (B, 1, S) bias form."""
    testing_dense = testing.tiny_dense()
    mosaic = mosaicdiff.prune(testing_dense, None, 0.0, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(testing_dense, 3)
    t = torch.full((3,), 400)
    mask = cond["encoder_attention_mask"]
    assert (mask == 0).any()
    bias = ((1 - mask) * -10000.0).unsqueeze(1)
    unmasked = testing.call(mosaic, x, t, {**cond, "encoder_attention_mask": None})
    for m in (mask, bias):
        got = testing.call(mosaic, x, t, {**cond, "encoder_attention_mask": m})
        want = testing.call(testing_dense, x, t, {**cond, "encoder_attention_mask": m})
        assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert (got - unmasked).abs().max() > 1e-3


def test_unfused_blocks_equal_the_fused_chain():
    dense = testing.tiny_dense()
    from tests.families.conformance import three_stage_mosaic

    mosaic = three_stage_mosaic(mosaicdiff.families.family_for(dense), dense, share_producers=True)
    x, cond = testing.tiny_inputs(dense, 3)
    t = torch.tensor([900, 500, 100])
    fused = testing.call(mosaic, x, t, cond)
    assert_close(testing.call(mosaic.set_block_boundary_fusion(False), x, t, cond), fused, atol=ATOL, rtol=RTOL)


def test_the_text_kv_cache_computes_once_per_run_and_follows_the_text():
    dense = testing.tiny_dense()
    mosaic = mosaicdiff.prune(dense, None, 0.3, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(dense, 2)
    calls = []
    mosaic.shared.caption_projection.register_forward_hook(lambda *a: calls.append(1))
    fresh = [testing.call(mosaic, x, torch.full((2,), t), cond) for t in (800, 300)]
    mosaic.enable_cross_kv_cache()
    calls.clear()
    cached = [testing.call(mosaic, x, torch.full((2,), t), cond) for t in (800, 300)]
    assert len(calls) == 1, "the caption projection must run once for the same text tensor"
    for a, b in zip(cached, fresh):
        assert_close(a, b, atol=1e-6, rtol=1e-6)
    # the same tensor edited in place, and another tensor: recomputed, as without the cache
    text = cond["encoder_hidden_states"]
    text.mul_(-1.0)
    edited = testing.call(mosaic, x, torch.full((2,), 300), cond)
    other = {**cond, "encoder_hidden_states": torch.randn_like(text)}
    swapped = testing.call(mosaic, x, torch.full((2,), 300), other)
    mosaic.enable_cross_kv_cache(False)
    assert_close(edited, testing.call(mosaic, x, torch.full((2,), 300), cond), atol=1e-6, rtol=1e-6)
    assert_close(swapped, testing.call(mosaic, x, torch.full((2,), 300), other), atol=1e-6, rtol=1e-6)
    assert (edited - fresh[1]).abs().max() > 1e-3


@pytest.mark.parametrize("edit, message", [
    (lambda b: setattr(b, "norm_type", "ada_norm_zero"), "norm_type='ada_norm_zero'"),
    (lambda b: setattr(b.ff.net[0], "approximate", "none"), "approximate='none'"),
    (lambda b: setattr(b.attn1, "norm_q", nn.LayerNorm(12)), "qk-norm in attn1"),
    (lambda b: setattr(b.attn2, "scale", 1.0), "attn2 scale 1.0"),
])
def test_unsupported_variants_are_refused_in_one_line(edit, message):
    dense = testing.tiny_dense()
    edit(dense.transformer_blocks[1])
    pattern = rf"transformer_blocks\[1\] of PixArtTransformer2DModel uses .*{message}"
    with pytest.raises(ValueError, match=pattern) as err:
        mosaicdiff.prune(dense, None, 0.3, method="magnitude", align=None, progress=False)
    assert "\n" not in str(err.value)


def _calib(**edits):
    dense = testing.tiny_dense()
    good = testing.tiny_calibration(dense)
    cond, nulls = good.conditions, good.null_conditions
    cond.update(edits.pop("cond", {}))
    nulls = edits.pop("nulls", nulls)
    return dense, ConditionedCalibration(edits.pop("latents", good.latents), cond, nulls)


@pytest.mark.parametrize("edits, error, message", [
    ({"cond": {"encoder_hidden_states": torch.randn(6, 5, 23)},
      "nulls": {"encoder_hidden_states": torch.randn(1, 5, 23)}},
     ValueError, "has width 23, the model's text width is 24"),
    ({"cond": {"encoder_hidden_states": torch.randn(5, 5, 24)}, "nulls": None}, ValueError,
     r"encoder_hidden_states'\] must be \(6, S, 24\)"),
    ({"cond": {"encoder_attention_mask": torch.ones(6, 4)}, "nulls": {"encoder_hidden_states": torch.randn(1, 5, 24)}},
     ValueError, r"encoder_attention_mask'\] must be \(6, 5\)"),
    ({"cond": {"encoder_hidden_states": torch.full((6, 5, 24), float("nan"))}}, ValueError, "contains NaN/inf"),
    ({"cond": {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}}, ValueError,
     r"'resolution'\] must be \(6, 2\)"),
    ({"latents": torch.randn(6, 3, 8, 8)}, ValueError, "the model takes 4 channels"),
    ({"nulls": None}, ValueError, "needs null_conditions for the classifier-free-guidance branch"),
])
def test_unfit_calibrations_are_refused_before_any_pass(edits, error, message):
    dense, calib = _calib(**edits)
    with pytest.raises(error, match=message):
        mosaicdiff.prune(dense, calib, 0.3, samples_per_stage=2, align=None, progress=False)


def test_calibration_of_another_family_and_null_text_of_another_width_are_refused():
    from mosaicdiff.calibrate import Calibration

    dense = testing.tiny_dense()
    with pytest.raises(TypeError, match="a PixArt is calibrated with ConditionedCalibration"):
        mosaicdiff.prune(dense, Calibration(torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), 10), 0.3,
                         progress=False)
    calib = testing.tiny_calibration(dense)
    inf = torch.full((1, 5, 24), float("inf"))
    bad = ConditionedCalibration(calib.latents, calib.conditions, {"encoder_hidden_states": inf})
    with pytest.raises(ValueError, match=r"null_conditions\['encoder_hidden_states'\] contains NaN/inf"):
        mosaicdiff.prune(dense, bad, 0.3, samples_per_stage=2, align=None, progress=False)


def test_forward_refuses_what_it_does_not_compute():
    dense = testing.tiny_dense()
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(dense, 2)
    t = torch.full((2,), 10)
    with pytest.raises(NotImplementedError, match="self-attention attention_mask"):
        mosaic(x, timestep=t, attention_mask=torch.ones(2, 16), **cond)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, S, 24\)"):
        mosaic(x, timestep=t, **{**cond, "encoder_hidden_states": None})
    with pytest.raises(ValueError, match="added_cond_kwargs needs 'resolution'"):
        mosaic(x, timestep=t, **{**cond, "added_cond_kwargs": None})


def test_memory_ratios_from_the_config_match_a_pruned_mosaic():
    """`memory_ratios` (meta device, nothing allocated) counts what `prune` builds at that target."""
    from mosaicdiff.api import prune_stages
    from mosaicdiff.families.pixart.memory import memory_ratios

    dense = testing.tiny_dense()
    config = {k: v for k, v in dense.config.items() if not k.startswith("_")}
    got = memory_ratios(config, 0.5, align=None)
    stages = prune_stages(dense, None, 0.5, pruner="magnitude", align=None, progress=False, share_producers=True)
    for label, share in (("shared", True), ("copies", False)):
        want = MosaicPixArt.from_dense(dense, stages, share_producers=share).memory_report()
        assert got[label]["mosaic_params"] == want["mosaic_params"], label
        assert got[label]["ratio"] == pytest.approx(want["ratio"]), label
    assert got["dense_params"] == sum(p.numel() for p in dense.parameters())
    assert got["shared"]["ratio"] < got["copies"]["ratio"] and got["shared"]["producer_params"] > 0


@pytest.mark.parametrize("name", ["PIXART_SIGMA_1024", "PIXART_ALPHA_1024"])
def test_the_released_configs_are_accepted(name):
    """PixArt-Sigma and PixArt-alpha 1024 (with its resolution / aspect-ratio conditions) pass the
    adapter's checks (built on the meta device: no weights)."""
    from diffusers import PixArtTransformer2DModel

    from mosaicdiff.families.pixart import configs
    from mosaicdiff.families.pixart.adapter import PIXART

    with torch.device("meta"):
        dense = PixArtTransformer2DModel(**getattr(configs, name))
    PIXART.validate(dense)
    assert mosaicdiff.families.family_for(dense).name == "pixart"
    assert dense.adaln_single.emb.use_additional_conditions == (name == "PIXART_ALPHA_1024")


def test_bf16_cuda_graph_runner_and_kernel_shapes():
    """A bf16 zero-sparsity mosaic stays within bf16 rounding of the bf16 dense model (diffusers rounds
    the table sums to bf16, the kernels add them in fp32: a few ulps of O(1) outputs); the graph runner
    (eager on CPU tensors) takes the trimmed tensor inputs; the k/v cache is refused under graphs; every
    op of a stage's kernel shapes is one the config lookup knows."""
    from mosaic_kernels import configs

    dense = testing.tiny_dense()
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False).to(torch.bfloat16)
    dense = dense.to(torch.bfloat16)
    x, cond = testing.tiny_inputs(dense, 3)
    x = x.bfloat16()
    cond = {**cond, "encoder_hidden_states": cond["encoder_hidden_states"].bfloat16(),
            "added_cond_kwargs": {k: v.bfloat16() for k, v in cond["added_cond_kwargs"].items()}}
    t = torch.full((3,), 500)
    got = testing.call(mosaic, x, t, cond)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), testing.call(dense, x, t, cond).float(), atol=0.05, rtol=2 ** -6)
    mosaic.enable_cuda_graphs()
    with pytest.raises(ValueError, match="does not work under CUDA graphs"):
        mosaic.enable_cross_kv_cache()
    for c in (cond, {**cond, "encoder_attention_mask": None}):
        assert_close(testing.call(mosaic, x, t, c), testing.call(mosaic.enable_cuda_graphs(False), x, t, c),
                     atol=1e-6, rtol=1e-6)
        mosaic.enable_cuda_graphs()
    items = mosaic.stage_kernel_shapes(0, 3, 16, torch.bfloat16)
    assert {op for op, _, _ in items} >= {"ln_modulate_table", "gated_residual_ln_modulate_table", "attention",
                                         "linear_gelu", "linear_gated_residual", "linear_residual"}
    configs.select_configs_for_shapes(items, "cpu")


def test_the_triton_kernels_run_the_mosaic():
    """Every op of the compact block on the Triton backend (the interpreter on CPU): the zero-sparsity
    mosaic equals dense, fused and unfused, and the dispatch log shows the table ops ran there."""
    import mosaic_kernels as mk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    dense = testing.tiny_dense().to(device)
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(dense, 2)
    x = x.to(device)
    cond = {k: v.to(device) if isinstance(v, torch.Tensor) else {kk: vv.to(device) for kk, vv in v.items()}
            for k, v in cond.items()}
    t = torch.full((2,), 700, device=device)
    want = testing.call(dense, x, t, cond)
    with mk.use_backend("triton"), mk.record_dispatch() as log:
        fused = testing.call(mosaic, x, t, cond)
        unfused = testing.call(mosaic.set_block_boundary_fusion(False), x, t, cond)
    for got in (fused, unfused):
        assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert log["ln_modulate_table", "triton"] > 0 and log["gated_residual_ln_modulate_table", "triton"] > 0
