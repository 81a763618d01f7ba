"""The Flux family beyond the conformance suite: the compact blocks against diffusers' blocks, the joint
attention's two consumers and the single block's shared consumer, the calibration's forward as
``FluxPipeline`` calls the model, pruning end to end, the pipeline drop-in, and the refusals."""

from __future__ import annotations

import mosaicdiff
import pytest
import torch
from mosaicdiff.calibrate import ConditionedCalibration, Shared
from mosaicdiff.families.flux import FAMILY, testing
from mosaicdiff.families.flux.adapter import FLUX, check_flux
from mosaicdiff.families.flux.blocks import (
    CompactFluxDoubleBlock,
    CompactFluxSingleBlock,
)
from mosaicdiff.families.flux.calibration import flux_forward_inputs
from mosaicdiff.families.flux.model import MosaicFlux
from mosaicdiff.method import compact
from torch.testing import assert_close

import mosaic_kernels as mk
from tests.families.conformance import three_stage_mosaic

ATOL, RTOL = 5e-5, 1e-5


@pytest.fixture(autouse=True)
def _torch_backend():
    with mk.ops.use_backend("torch"):
        yield


def _rope_and_temb(dense, batch: int, tokens: int, g: torch.Generator):
    """diffusers' RoPE tables of ``tokens`` text + 16 image positions, and a random ``temb``."""
    from mosaicdiff.families.flux.calibration import image_ids

    ids = torch.cat([torch.zeros(tokens, 3), image_ids(4, 4)])
    cos, sin = dense.pos_embed(ids)
    return cos, sin, torch.randn(batch, dense.inner_dim, generator=g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_blocks_at_sparsity_zero_equal_diffusers_blocks(backend):
    if backend == "triton" and not mk.backends("cpu")["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    dense = testing.tiny_dense()
    g = torch.Generator().manual_seed(3)
    cos, sin, temb = _rope_and_temb(dense, 2, testing.TOKENS, g)
    img, txt = torch.randn(2, 16, dense.inner_dim, generator=g), torch.randn(2, testing.TOKENS, dense.inner_dim,
                                                                             generator=g)
    act = torch.nn.functional.silu(temb)
    with torch.no_grad(), mk.ops.use_backend(backend):
        block = dense.transformer_blocks[1]
        want_txt, want_img = block(img, txt, temb, (cos, sin))
        mod = torch.cat([block.norm1.linear(act), block.norm1_context.linear(act)], 1).view(2, 12, -1)
        got_img, got_txt = CompactFluxDoubleBlock(FLUX.dense_block(block), 16)(img, txt, mod, cos, sin)
        assert_close(got_img, want_img, atol=ATOL, rtol=RTOL)
        assert_close(got_txt, want_txt, atol=ATOL, rtol=RTOL)
        single = dense.single_transformer_blocks[0]
        want = torch.cat(single(img, txt, temb, (cos, sin)), 1)
        got = CompactFluxSingleBlock(FLUX.dense_block(single), 16)(torch.cat([txt, img], 1),
                                                                   single.norm.linear(act).view(2, 3, -1), cos, sin)
        assert_close(got, want, atol=ATOL, rtol=RTOL)


def _correlated(n: int, width: int, g: torch.Generator) -> torch.Tensor:
    """Inputs with correlated columns (a random mixing of fewer factors plus noise): OBS's
    compensation has something to recover."""
    mix = torch.randn(width // 2, width, generator=g, dtype=torch.float64)
    return torch.randn(n, width // 2, generator=g, dtype=torch.float64) @ mix + \
        0.1 * torch.randn(n, width, generator=g, dtype=torch.float64)


def _errors(consumer: torch.nn.Linear, x: torch.Tensor, cols: torch.Tensor, compensated: torch.Tensor):
    """Output error of the compensated kept columns and of the plain slice of the same columns."""
    w = consumer.weight.detach().double()
    want = x @ w.T
    return ((x[:, cols] @ compensated.double().T - want).norm().item(),
            (x[:, cols] @ w[:, cols].T - want).norm().item())


def test_the_joint_attention_prunes_heads_of_both_consumers_each_compensated():
    block = testing.tiny_dense().transformer_blocks[0]
    groups = FLUX.groups(block)
    attn = groups["attn"]
    assert attn.consumers == (block.attn.to_out[0], block.attn.to_add_out) and len(attn.producers) == 6
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = _correlated(400, 64, g), _correlated(300, 64, g)
    hessians = {"attn": x_img.T @ x_img / 400, "attn:1": x_txt.T @ x_txt / 300,
                "ff": torch.eye(256, dtype=torch.float64), "ff_context": torch.eye(256, dtype=torch.float64)}
    pruned = compact.prune_groups(groups, hessians, 0.5, method="obs", align=None)
    a = pruned["attn"]
    assert a.kept.numel() == 2
    cols = (a.kept[:, None] * 16 + torch.arange(16)).reshape(-1)
    for consumer, x, w in ((block.attn.to_out[0], x_img, a.consumer_weight),
                           (block.attn.to_add_out, x_txt, a.more_consumer_weights[0])):
        ours, sliced = _errors(consumer, x, cols, w)
        assert ours < 0.9 * sliced
    weights = FLUX.compact_block(block, pruned)
    assert torch.equal(weights.add_out_weight, a.more_consumer_weights[0])
    assert torch.equal(weights.add_qkv_weight[:32], block.attn.add_q_proj.weight[cols])


def test_the_single_block_prunes_heads_and_channels_on_one_compensated_proj_out():
    block = testing.tiny_dense().single_transformer_blocks[0]
    groups = FLUX.groups(block)
    assert groups["attn"].consumer is groups["mlp"].consumer is block.proj_out
    assert groups["mlp"].consumer_offset == 64 and groups["mlp"].num_units == 256
    g = torch.Generator().manual_seed(1)
    x = _correlated(600, 320, g)
    h = x.T @ x / 600
    pruned = compact.prune_groups(groups, {"attn": h, "mlp": h}, 0.5, method="obs", align=None)
    heads, channels = pruned["attn"].kept, pruned["mlp"].kept
    cols = torch.cat([(heads[:, None] * 16 + torch.arange(16)).reshape(-1), 64 + channels])
    weights = FLUX.compact_block(block, pruned)
    assert weights.out_weight.shape == (64, 32 + 128)
    ours, sliced = _errors(block.proj_out, x, cols, weights.out_weight)
    assert ours < 0.9 * sliced
    assert torch.equal(weights.proj_weight[96:], block.proj_mlp.weight[channels])


def test_the_calibration_forward_is_the_pipelines():
    """`FluxAdapter.run`'s inputs: the pipeline's packing and ids (its static methods as the oracle),
    ``t / 1000``, and the guidance scale broadcast, unscaled."""
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    text = torch.randn(2, 5, testing.TEXT)
    got = flux_forward_inputs(x, torch.tensor([500, 1000]), {"encoder_hidden_states": text, "guidance": 3.5})
    assert torch.equal(got["hidden_states"], FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(got["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    assert torch.equal(got["txt_ids"], torch.zeros(5, 3))
    assert_close(got["timestep"], torch.tensor([0.5, 1.0]))
    assert torch.equal(got["guidance"], torch.tensor([3.5, 3.5]))


def test_pruning_end_to_end():
    dense = testing.tiny_dense()
    calib = testing.tiny_calibration(dense)
    mosaic = mosaicdiff.prune(dense, calib, 0.3, samples_per_stage=4, align=None, progress=False)
    assert isinstance(mosaic, MosaicFlux) and mosaic.num_stages == 3 and mosaic.producer_storage is not None
    assert mosaic.meta["cfg"] is False and mosaic.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    x, cond = testing.tiny_inputs(dense, 2)
    for t in (990, 500, 10):
        out = testing.call(mosaic, x, torch.full((2,), t), cond)
        want = testing.call(dense, x, torch.full((2,), t), cond)
        assert torch.isfinite(out).all() and out.shape == want.shape
    assert (out - want).abs().max() > 1e-3
    widths = mosaic.meta["stage_widths"]
    assert min(w["heads"] for w in widths.values()) < 4


def test_obs_on_the_calibration_beats_magnitude_pruning():
    """The calibration passes reach every consumer (both joint-attention outputs, the single blocks'
    proj_out): one OBS stage at sparsity 0.4 stays much closer to the dense model than magnitude
    pruning, on held-out latents noised as the flow process does (about 5x lower MSE here)."""
    from mosaicdiff.families.flux.calibration import pack_latents

    dense = testing.tiny_dense()
    calib = testing.tiny_calibration(dense, n=16)
    obs = mosaicdiff.prune(dense, calib, 0.4, method="uniform", samples_per_stage=32, align=None, progress=False)
    magnitude = mosaicdiff.prune(dense, None, 0.4, method="magnitude", align=None, progress=False)
    assert obs.meta["realized_mean_sparsity"] == magnitude.meta["realized_mean_sparsity"]
    g = torch.Generator().manual_seed(99)
    x0, eps = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    _, cond = testing.tiny_inputs(dense, 8, seed=5)
    for t in (100, 500, 900):
        x, tt = pack_latents((1 - t / 1000) * x0 + t / 1000 * eps), torch.full((8,), t)
        want = testing.call(dense, x, tt, cond)
        err_obs = (testing.call(obs, x, tt, cond) - want).pow(2).mean()
        err_magnitude = (testing.call(magnitude, x, tt, cond) - want).pow(2).mean()
        assert err_obs < 0.5 * err_magnitude, (t, err_obs, err_magnitude)


def test_the_first_flow_step_runs_in_the_highest_noise_stage():
    """FluxPipeline's first timestep is t = 1000 (sigma = 1), passed as 1.0 (in bf16 it may round up to
    1.0039): the stage of the highest timestep; the stages tile [0, 1001) under flow matching."""
    dense = testing.tiny_dense()
    mosaic = three_stage_mosaic(FAMILY, dense, share_producers=True)
    top = max(t1 for _, _, t1, _ in mosaic.stage_ranges) - 1
    assert top == 1000
    got = mosaic.stage_timestep(torch.tensor([1.0039, 1.0, 0.5, -1e-4]))
    assert_close(got, torch.tensor([1000.0, 1000.0, 500.0, 0.0]))
    assert mosaic.stage_for(mosaic.stage_timestep(1.0)) == mosaic.stage_for(999) == mosaic.stage_names.index("early")


def _pipeline(transformer):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def test_a_mosaic_drops_into_flux_pipeline():
    dense = testing.tiny_dense()
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, testing.TOKENS, testing.TEXT, generator=g),
              pooled_prompt_embeds=torch.randn(1, testing.POOLED, generator=g), height=16, width=16,
              num_inference_steps=4, guidance_scale=3.5, output_type="latent")
    want = _pipeline(dense)(**kw, generator=torch.Generator().manual_seed(1)).images
    zero = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    assert_close(_pipeline(zero)(**kw, generator=torch.Generator().manual_seed(1)).images, want, atol=ATOL,
                 rtol=RTOL)
    pruned = three_stage_mosaic(FAMILY, dense, share_producers=True)
    seen = []
    real = pruned.forward_stage
    pruned.forward_stage = lambda stage, *args: seen.append(stage) or real(stage, *args)
    pipe = _pipeline(pruned)
    images = pipe(**{**kw, "output_type": "np"}, generator=torch.Generator().manual_seed(1)).images
    assert images.shape == (1, 16, 16, 3) and bool((images >= 0).all() and (images <= 1).all())
    assert seen[0] == pruned.stage_names.index("early") and len(set(seen)) > 1, "the stages follow the timesteps"


def test_shared_producers_and_copies_save_and_load(tmp_path):
    dense = testing.tiny_dense()
    stages = mosaicdiff.api.prune_stages(dense, None, 0.4, pruner="magnitude", boundaries=(300, 700),
                                         stage_sparsities=(0.5, 0.25, 0.5), align=None, progress=False,
                                         share_producers=True)
    x, cond = testing.tiny_inputs(dense, 2)
    for share in (True, False):
        mosaic = MosaicFlux.from_dense(dense, stages, share_producers=share)
        assert (mosaic.producer_storage is not None) is share
        mosaic.save_pretrained(tmp_path / str(share))
        loaded = MosaicFlux.from_pretrained(tmp_path / str(share))
        for t in (100, 500, 900):
            tt = torch.full((2,), t)
            assert_close(testing.call(loaded, x, tt, cond), testing.call(mosaic, x, tt, cond), atol=1e-6, rtol=1e-6)
        for a, b in zip(loaded.stages[0].blocks, mosaic.stages[0].blocks):
            for key, value in a.tensors().items():
                assert torch.equal(value, getattr(b, key)), key


# ----------------------------------------------------------------------------- refusals


def test_unsupported_variants_are_refused_in_one_line():
    from diffusers.models.transformers.transformer_flux import (
        FluxIPAdapterAttnProcessor,
    )

    dense = testing.tiny_dense()
    dense.transformer_blocks[0].attn.set_processor(FluxIPAdapterAttnProcessor(64, 8))
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\] .* FluxIPAdapterAttnProcessor"):
        check_flux(dense)
    dense = testing.tiny_dense()
    dense.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused q/k/v projections"):
        mosaicdiff.prune(dense, None, 0.3, method="magnitude", progress=False)


@pytest.mark.parametrize("edit, message", [
    (lambda c, n: ({**c}, True), "guidance-distilled .* cfg=False"),
    (lambda c, n: ({k: v for k, v in c.items() if k != "guidance"}, False), "needs 'guidance'"),
    (lambda c, n: ({**c, "pooled_projections": torch.randn(n, 3)}, False), r"pooled_projections'\] must be"),
    (lambda c, n: ({**c, "encoder_hidden_states": torch.randn(n, 4, 7)}, False), r"encoder_hidden_states'\] must be"),
    (lambda c, n: ({**c, "txt_ids": torch.zeros(n, 3)}, False), "wrap it in mosaicdiff.calibrate.Shared"),
    (lambda c, n: ({**c, "img_ids": Shared(torch.zeros(5, 3))}, False), r"img_ids'\] must be \(16, 3\)"),
    (lambda c, n: ({**c, "class_labels": torch.zeros(n, dtype=torch.long)}, False), "does not take here"),
])
def test_unfit_calibrations_are_refused_before_any_pass(edit, message):
    dense = testing.tiny_dense()
    good = testing.tiny_calibration(dense)
    n = len(good)
    conditions, cfg = edit(good.conditions, n)
    nulls = {"encoder_hidden_states": torch.zeros(1, testing.TOKENS, testing.TEXT)} if cfg else None
    calib = ConditionedCalibration(good.latents, conditions, nulls, cfg=cfg)
    with pytest.raises(ValueError, match=message):
        mosaicdiff.prune(dense, calib, 0.3, boundaries=(300, 700), samples_per_stage=2, align=None, progress=False)


def test_another_familys_calibration_is_refused_as_the_wrong_kind():
    from mosaicdiff.calibrate import Calibration

    dense = testing.tiny_dense()
    with pytest.raises(TypeError, match="prompt_embeds.*got conditions with keys \\['class_labels'\\]"):
        mosaicdiff.prune(dense, Calibration(torch.randn(2, 4, 8, 8), torch.tensor([0, 1])), 0.3, progress=False)


def test_bad_forward_inputs_are_refused():
    dense = testing.tiny_dense()
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(dense, 2)
    t = torch.full((2,), 500)
    with pytest.raises(NotImplementedError, match="joint_attention_kwargs"):
        testing.call(mosaic, x, t, {**cond, "joint_attention_kwargs": {"scale": 0.5}})
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, L, 16\)"):
        testing.call(mosaic, x[..., :8], t, cond)
    with pytest.raises(ValueError, match="pass `guidance`"):
        testing.call(mosaic, x, t, {k: v for k, v in cond.items() if k != "guidance"})
    with pytest.raises(ValueError, match=r"img_ids must be \(16, 3\)"):
        testing.call(mosaic, x, t, {**cond, "img_ids": torch.zeros(4, 3)})


def test_unfused_blocks_equal_the_fused_chain():
    """The gated residuals fused with the next block's norm (double -> double -> single -> single) equal
    the blocks run one by one."""
    dense = testing.tiny_dense()
    mosaic = three_stage_mosaic(FAMILY, dense, share_producers=True)
    x, cond = testing.tiny_inputs(dense, 3)
    t = torch.tensor([900, 500, 100])
    fused = testing.call(mosaic, x, t, cond)
    assert_close(testing.call(mosaic.set_block_boundary_fusion(False), x, t, cond), fused, atol=ATOL, rtol=RTOL)


def test_flux_dev_memory_at_mean_sparsity_0_3():
    """FLUX.1-dev's config on the meta device (nothing allocated): the skeleton (embedders and every
    block's modulation, 3.5 G of the 11.9 G parameters) is stored once, and with shared producers
    the three stages cost 1.16x the dense transformer instead of 1.66x with copies."""
    from mosaicdiff.families.flux.configs import FLUX_DEV
    from mosaicdiff.families.flux.memory import memory_ratios

    out = memory_ratios(FLUX_DEV, 0.3)
    assert out["dense_params"] == 11_901_408_320
    assert [s[0] for s in out["stages"]] == ["early", "middle", "late"] and out["stages"][0][2] == 1001
    shared, copies = out["shared"], out["copies"]
    assert shared["shared_params"] == copies["shared_params"] > 3e9
    assert 1.1 < shared["ratio"] < 1.2 and 1.6 < copies["ratio"] < 1.7
