"""The SD3 family beyond the conformance suite: the compact block against diffusers' ``JointTransformerBlock``
in every layout (SD3, SD3.5-Large's q/k norm, SD3.5-Medium's dual attention, the context_pre_only last
block), the joint heads' two compensated consumers, the drop-in in ``StableDiffusion3Pipeline``, save/load
of flow-scheduler stages, refusals, and the memory of the released SD3.5-Large config."""

from __future__ import annotations

import dataclasses

import mosaicdiff
import pytest
import torch
import torch.nn.functional as F
from mosaicdiff.calibrate import ConditionedCalibration
from mosaicdiff.core.stages import StageSpec
from mosaicdiff.families.sd3 import testing
from mosaicdiff.families.sd3.adapter import SD3
from mosaicdiff.families.sd3.blocks import CompactSD3Block
from mosaicdiff.families.sd3.model import MosaicSD3
from torch.testing import assert_close

ATOL, RTOL = 5e-5, 1e-5
#: (qk_norm, dual_attention_layers): SD3-Medium, SD3.5-Large, SD3.5-Medium (blocks 0 and 1 dual) at toy size.
LAYOUTS = {"sd3": (None, ()), "sd35-large": ("rms_norm", ()), "sd35-medium": ("rms_norm", (0, 1))}


@pytest.fixture(autouse=True)
def _torch_backend():
    from mosaic_kernels import ops

    with ops.use_backend("torch"):
        yield


def dense_of(layout: str, seed: int = 0):
    qk_norm, dual = LAYOUTS[layout]
    return testing.tiny_dense(seed, qk_norm=qk_norm, dual_attention_layers=dual)


def block_inputs(dense, x, t, cond) -> list[tuple]:
    """``(hidden_states, encoder_hidden_states, temb)`` each block of `dense` receives on these inputs."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["hidden_states"], kw["encoder_hidden_states"],
                                                                        kw["temb"])), with_kwargs=True)
             for b in dense.transformer_blocks]
    try:
        testing.call(dense, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return seen


def run_compact(compact: CompactSD3Block, block, h, c, temb):
    """The compact block on a dense block's inputs, its modulations from the dense block's own linears."""
    C = h.shape[-1]
    mod = block.norm1.linear(F.silu(temb)).unflatten(1, (-1, C))
    cmod = block.norm1_context.linear(F.silu(temb)).unflatten(1, (-1, C))
    return compact(h.contiguous(), c.contiguous(), mod, cmod)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_the_compact_block_equals_diffusers_joint_block(layout):
    """Every block (dual-attention, plain, the context_pre_only last one), unpruned, against
    ``JointTransformerBlock.forward`` on the inputs it gets inside the dense model."""
    dense = dense_of(layout)
    x, cond = testing.tiny_inputs(dense, 2)
    inputs = block_inputs(dense, x, torch.tensor([900.0, 250.0]), cond)
    kinds = set()
    for block, (h, c, temb) in zip(dense.transformer_blocks, inputs):
        compact = CompactSD3Block(SD3.dense_block(block), SD3.dense_block(block).kind, 8)
        kinds.add(compact.kind)
        want_c, want_h = block(hidden_states=h, encoder_hidden_states=c, temb=temb)
        got_h, got_c = run_compact(compact, block, h, c, temb)
        assert_close(got_h, want_h, atol=ATOL, rtol=RTOL)
        assert (got_c is None) == (want_c is None) == block.context_pre_only
        if want_c is not None:
            assert_close(got_c, want_c, atol=ATOL, rtol=RTOL)
    qk, dual = LAYOUTS[layout]
    assert {k.context_pre_only for k in kinds} == {False, True} and {k.qk_norm for k in kinds} == {qk is not None}
    assert {k.dual_attention for k in kinds} == ({True, False} if dual else {False})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("share", [True, False], ids=["shared", "copies"])
def test_zero_sparsity_mosaic_equals_dense(layout, share):
    """The whole model (one GEMM for every modulation, fused block boundaries or not) equals diffusers'."""
    dense = dense_of(layout)
    stages = [StageSpec("all", 0, 1001, 0.0, [SD3.dense_block(b) for b in dense.transformer_blocks])]
    mosaic = MosaicSD3.from_dense(dense, stages, share_producers=share)
    assert (mosaic.producer_storage is not None) == share
    x, cond = testing.tiny_inputs(dense, 3)
    for fuse in (True, False):
        mosaic.set_block_boundary_fusion(fuse)
        for t in (torch.tensor([1000.0, 500.5, 0.0]), 999):  # the mosaic takes a number too (diffusers: a tensor)
            want = testing.call(dense, x, torch.full((3,), float(t)) if isinstance(t, int) else t, cond)
            assert_close(testing.call(mosaic, x, t, cond), want, atol=ATOL, rtol=RTOL)


def test_the_groups_of_each_block_kind():
    dense = dense_of("sd35-medium")
    first, mid, last = (SD3.groups(b) for b in dense.transformer_blocks)
    assert list(first) == ["attn", "attn2", "ff", "ff_context"] and list(mid) == ["attn", "attn2", "ff", "ff_context"]
    assert list(last) == ["attn", "ff"]  # the context_pre_only block has no text MLP
    block = dense.transformer_blocks[0]
    assert first["attn"].more_consumers == (block.attn.to_add_out,) and len(first["attn"].producers) == 6
    assert last["attn"].more_consumers == () and first["attn"].num_units == 4 and first["attn"].unit_size == 8


def test_the_joint_heads_are_compensated_in_both_streams():
    """OBS on the joint heads compensates ``to_out[0]`` and ``to_add_out``: on calibration-like inputs
    each block's text stream is closer to the dense one than with the sliced, uncompensated
    ``to_add_out``, and the model's output closer than with every consumer sliced."""
    dense = dense_of("sd35-medium")
    calib = testing.tiny_calibration(dense, n=8)
    mosaic = mosaicdiff.prune(dense, calib, 0.3, boundaries=(300, 700), stage_sparsities=(0.5, 0.5, 0.5),
                              samples_per_stage=16, align=None, progress=False)
    early = mosaic.stages[mosaic.stage_for(900)]
    hd = 8

    def columns(kept):
        return (kept[:, None] * hd + torch.arange(hd)).reshape(-1)

    def sliced(block, w, consumers):
        """`w` with the named consumers replaced by the dense ones' kept columns."""
        dense_w = {"add_out_weight": (block.attn.to_add_out, columns(w.kept_heads)),
                   "out_weight": (block.attn.to_out[0], columns(w.kept_heads)),
                   "ff2_weight": (block.ff.net[2], w.kept_channels)}
        if block.attn2 is not None:
            dense_w["out2_weight"] = (block.attn2.to_out[0], columns(w.kept_heads2))
        if block.ff_context is not None:
            dense_w["ffc2_weight"] = (block.ff_context.net[2], w.kept_context_channels)
        return dataclasses.replace(w, **{k: lin.weight.detach()[:, c].clone() for k, (lin, c) in dense_w.items()
                                         if k in consumers and getattr(w, k) is not None})

    # calibration-like inputs of the early stage: x_t = (1 - s) x0 + s eps, t = 1000 s
    t = torch.linspace(850, 1000, 8)
    s = (t / 1000).view(-1, 1, 1, 1)
    x = (1 - s) * calib.latents + s * torch.randn(calib.latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inputs = block_inputs(dense, x, t, calib.conditions)
        for j, (block, w, (h, c, temb)) in enumerate(zip(dense.transformer_blocks, early.blocks, inputs)):
            if block.context_pre_only:
                continue
            assert w.kept_heads.numel() == 2
            want = block(hidden_states=h, encoder_hidden_states=c, temb=temb)[0]
            errors = [(run_compact(CompactSD3Block(v, v.kind, hd), block, h, c, temb)[1] - want).pow(2).mean()
                      for v in (w, sliced(block, w, {"add_out_weight"}))]
            assert errors[0] < 0.99 * errors[1], f"block {j}: text-stream error {errors} (compensated, sliced)"
        stages = [StageSpec(sp.name, sp.t_start, sp.t_end, sp.sparsity,
                            [sliced(b, w, {"add_out_weight", "out_weight", "out2_weight", "ff2_weight", "ffc2_weight"})
                             for b, w in zip(dense.transformer_blocks, sp.blocks)]) for sp in mosaic.stages]
        uncompensated = MosaicSD3.from_dense(dense, stages, share_producers=False)
        want = testing.call(dense, x, t, calib.conditions)
        errors = [(testing.call(m, x, t, calib.conditions) - want).pow(2).mean() for m in (mosaic, uncompensated)]
    assert errors[0] < 0.5 * errors[1], f"model output error {errors} (compensated, sliced)"


def test_save_and_load_of_flow_stages(tmp_path):
    """A pruned SD3.5-Medium mosaic on SD3's flow scheduler (stages tile [0, 1001): the first step is
    t = 1000) saves and loads, also from a config whose meta lost ``num_train_timesteps``."""
    dense = dense_of("sd35-medium")
    mosaic = mosaicdiff.prune(dense, testing.tiny_calibration(dense), 0.3, boundaries=(300, 700),
                              samples_per_stage=4, align=None, progress=False)
    assert max(t1 for _, _, t1, _ in mosaic.stage_ranges) == 1001 and mosaic.producer_storage is not None
    mosaic.save_pretrained(tmp_path / "m")
    loaded = MosaicSD3.from_pretrained(tmp_path / "m")
    x, cond = testing.tiny_inputs(dense, 2)
    for t in (1000.0, 500.0, 3.0):
        tt = torch.full((2,), t)
        assert_close(testing.call(loaded, x, tt, cond), testing.call(mosaic, x, tt, cond), atol=1e-6, rtol=1e-6)
    again = MosaicSD3.from_config({**dict(mosaic.config), "meta": {"note": "edited"}})
    again.save_pretrained(tmp_path / "again")
    assert MosaicSD3.from_pretrained(tmp_path / "again").stage_ranges == mosaic.stage_ranges


def tiny_pipeline(transformer):
    """``StableDiffusion3Pipeline`` with diffusers' tiny test VAE and no text encoders (embeddings passed)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_drop_in_for_the_sd3_pipeline():
    dense = dense_of("sd35-large")
    pipe = tiny_pipeline(dense)
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(2, testing.TOKENS, testing.TEXT, generator=g),
              "pooled_prompt_embeds": torch.randn(2, testing.POOLED, generator=g),
              "negative_prompt_embeds": torch.randn(2, testing.TOKENS, testing.TEXT, generator=g),
              "negative_pooled_prompt_embeds": torch.randn(2, testing.POOLED, generator=g)}

    def sample(output_type="latent"):
        return pipe(**embeds, height=8, width=8, num_inference_steps=4, output_type=output_type,
                    generator=torch.Generator().manual_seed(1)).images

    want = sample()
    pipe.transformer = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False,
                                        scheduler=pipe.scheduler)
    assert_close(sample(), want, atol=1e-4, rtol=1e-4)  # four steps of the zero-sparsity mosaic
    calib = ConditionedCalibration(
        torch.randn(4, 4, 8, 8, generator=g),
        {"encoder_hidden_states": embeds["prompt_embeds"].repeat(2, 1, 1),
         "pooled_projections": embeds["pooled_prompt_embeds"].repeat(2, 1)},
        {"encoder_hidden_states": embeds["negative_prompt_embeds"][:1],
         "pooled_projections": embeds["negative_pooled_prompt_embeds"][:1]})
    pipe.transformer = mosaicdiff.prune(dense, calib, 0.3, scheduler=pipe.scheduler, num_inference_steps=4,
                                        boundaries=(300, 700), samples_per_stage=4, align=None, progress=False)
    assert isinstance(pipe.transformer, MosaicSD3) and pipe.transformer.num_stages == 3
    image = sample("pt")
    assert image.shape == (2, 3, 8, 8) and torch.isfinite(image).all()


def test_unsupported_inputs_are_refused_in_one_line():
    dense = dense_of("sd35-large")
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(dense, 2)
    t = torch.full((2,), 500.0)
    for kwargs, error, match in (
            ({"block_controlnet_hidden_states": [x]}, NotImplementedError, "block_controlnet_hidden_states"),
            ({"skip_layers": [1]}, NotImplementedError, "skip_layers"),
            ({"joint_attention_kwargs": {"scale": 0.5}}, NotImplementedError, "joint_attention_kwargs"),
            ({"pooled_projections": cond["pooled_projections"][:, :3]}, ValueError, r"pooled_projections must be \(2, 16\)"),
            ({"encoder_hidden_states": cond["encoder_hidden_states"][:1]}, ValueError, "encoder_hidden_states must be")):
        with pytest.raises(error, match=match):
            mosaic(x, timestep=t, **{**cond, **kwargs})
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, 4, H, W\) .* up to 16"):
        mosaic(torch.randn(2, 4, 18, 18), timestep=t, **cond)
    # the joint attention joins the text whatever its length
    longer = {**cond, "encoder_hidden_states": torch.randn(2, 9, testing.TEXT)}
    assert_close(testing.call(mosaic, x, t, longer), testing.call(dense, x, t, longer), atol=ATOL, rtol=RTOL)


def test_unfit_calibrations_are_refused_before_any_pass():
    dense = dense_of("sd3")
    good = testing.tiny_calibration(dense)
    cond, null = good.conditions, good.null_conditions
    latents = good.latents
    with pytest.raises(ValueError, match="needs null_conditions .* negative_pooled_prompt_embeds"):
        mosaicdiff.prune(dense, ConditionedCalibration(latents, cond), 0.3, progress=False)
    assert mosaicdiff.prune(dense, ConditionedCalibration(latents, cond, cfg=False), 0.3, boundaries=(300, 700),
                            samples_per_stage=2, align=None, progress=False).num_stages == 3
    cases = [
        (ConditionedCalibration(latents, {"class_labels": torch.zeros(len(latents), dtype=torch.long)}), TypeError,
         "an SD3 is calibrated with"),
        (ConditionedCalibration(latents, cond, {"encoder_hidden_states": null["encoder_hidden_states"]}), ValueError,
         r"null_conditions lacks \['pooled_projections'\]"),
        (ConditionedCalibration(latents, {**cond, "encoder_hidden_states": torch.randn(len(latents), 5, 7)},
                                {**null, "encoder_hidden_states": torch.randn(1, 5, 7)}),
         ValueError, r"conditions\['encoder_hidden_states'\] must be \(6, S, 24\).*joint_attention_dim"),
        (ConditionedCalibration(latents, {**cond, "pooled_projections": torch.randn(len(latents), 3)},
                                {**null, "pooled_projections": torch.randn(1, 3)}),
         ValueError, r"conditions\['pooled_projections'\] must be \(6, 16\).*pooled_projection_dim"),
        (ConditionedCalibration(latents, {**cond, "image_embeds": torch.randn(len(latents), 3)}, null),
         ValueError, r"got also \['image_embeds'\]"),
        (ConditionedCalibration(torch.randn(6, 3, 8, 8), cond, null), ValueError, "config.in_channels"),
    ]
    for calib, error, match in cases:
        with pytest.raises(error, match=match):
            mosaicdiff.prune(dense, calib, 0.3, progress=False)


def test_unsupported_variants_are_refused_in_one_line():
    from diffusers.models.attention_processor import AttnProcessor2_0

    dense = dense_of("sd35-large")
    dense.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks\[1\] .* AttnProcessor2_0 .* MosaicSD3 does not compute"):
        mosaicdiff.prune(dense, None, 0.3, method="magnitude", progress=False)
    dense = dense_of("sd3")
    dense.fuse_qkv_projections()
    with pytest.raises(ValueError, match="FusedJointAttnProcessor2_0"):
        SD3.validate(dense)
    dense = dense_of("sd3")
    dense.context_embedder = torch.nn.Linear(testing.TEXT, 16)
    with pytest.raises(ValueError, match="caption_projection_dim=16 must equal the block width 32"):
        SD3.validate(dense)


def test_memory_of_the_released_sd35_large_config():
    """Meta device only: SD3.5-Large's 8.06 B parameters, a 30% mosaic with shared producers below copies."""
    from mosaicdiff.families.sd3.configs import SD35_LARGE
    from mosaicdiff.families.sd3.memory import memory_ratios

    r = memory_ratios(SD35_LARGE, 0.3, boundaries=(300, 700))
    assert 8.05e9 < r["dense_params"] < 8.07e9 and [s[0] for s in r["stages"]] == ["early", "middle", "late"]
    shared, copies = r["shared"], r["copies"]
    assert shared["producer_params"] > 0 and shared["mosaic_params"] < copies["mosaic_params"]
    # the skeleton holds every block's 12 C x C modulation rows: a third of the model
    assert 2.6e9 < shared["shared_params"] < 2.8e9


def test_the_triton_kernels_compute_the_same_mosaic():
    """The engine's Triton kernels (the interpreter on CPU): q/k RMSNorm'd straight into the joint buffer
    by ``rms_norm_rope(out=...)``, the fused norms, for a dual-attention and the context_pre_only block."""
    import mosaic_kernels as mk
    from mosaic_kernels import ops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    dense = testing.tiny_dense(num_layers=2).to(device)
    x, cond = testing.tiny_inputs(dense, 2)
    x, cond = x.to(device), {k: v.to(device) for k, v in cond.items()}
    blocks = [SD3.dense_block(b) for b in dense.transformer_blocks]
    mosaic = MosaicSD3.from_dense(dense, [StageSpec("all", 0, 1001, 0.0, blocks)], share_producers=True)
    t = torch.tensor([900.0, 100.0], device=device)
    with ops.use_backend("triton"), ops.record_dispatch() as used:
        got = testing.call(mosaic, x, t, cond)
    assert used[("rms_norm_rope", "triton")] == 10  # q, k of both streams in 2 blocks, q, k of attn2
    assert_close(got, testing.call(dense, x, t, cond), atol=ATOL, rtol=RTOL)


def test_kernel_shapes_follow_the_joint_sequence():
    """The kernel configs a stage selects are for the shapes it runs: attention over image + text tokens
    (the text length the last forward had), attn2 over the image, both streams' norms and MLPs."""
    dense = dense_of("sd35-medium")
    mosaic = mosaicdiff.prune(dense, None, 0.3, method="magnitude", align=None, progress=False)
    x, cond = testing.tiny_inputs(dense, 2)
    testing.call(mosaic, x, torch.full((2,), 500.0), {**cond, "encoder_hidden_states": torch.randn(2, 7, 24)})
    shapes = {(op, shape) for op, shape, _ in mosaic.stage_kernel_shapes(0, 2, 16, torch.float32)}
    block = mosaic.stage_blocks[0][0]
    assert ("attention", (2, 16 + 7, block.heads, 8)) in shapes and ("attention", (2, 16, block.heads2, 8)) in shapes
    assert {("rms_norm_rope", (2, 7, block.heads, 8, 0)), ("linear_gelu", (2 * 7, block.context_mlp_width, 32)),
            ("ln_modulate", (2, 7, 32)), ("ln_modulate", (2, 16, 32))} <= shapes


#: Per unit kind: the producers (rows) and consumers (columns) it slices.
UNIT_FIELDS = {"heads": (("qkv", "add_qkv"), ("out", "add_out")), "heads2": (("qkv2",), ("out2",)),
               "channels": (("ff1",), ("ff2",)), "context_channels": (("ffc1",), ("ffc2",))}


def units_of(w, hd: int = 8, **keep):
    """The unit-dense block weights `w` restricted to the listed units per kind (``heads=[1, 2]``, ...),
    uncompensated; kinds the block lacks are ignored."""
    out = {}
    for kind, units in keep.items():
        n, units = getattr(w, f"kept_{kind}").numel(), torch.as_tensor(units)
        if n == 0:
            continue
        cols = (units[:, None] * hd + torch.arange(hd)).reshape(-1) if "heads" in kind else units
        rows = torch.cat([cols + part * n * hd for part in range(3)]) if "heads" in kind else units  # [q | k | v]
        producers, consumers = UNIT_FIELDS[kind]
        out |= {f"{name}_{s}": getattr(w, f"{name}_{s}")[rows] for name in producers for s in ("weight", "bias")}
        out |= {f"{name}_weight": getattr(w, f"{name}_weight")[:, cols] for name in consumers
                if getattr(w, f"{name}_weight") is not None}  # the context_pre_only block has no add_out
        out[f"kept_{kind}"] = getattr(w, f"kept_{kind}")[units]
    return dataclasses.replace(w, **out)


def test_fp8_scales_of_shared_producers_follow_each_stages_rows():
    """Quantized shared producers of stages whose units are overlapping runs (not prefixes: ``prune`` nests
    them, so the conformance suite's runs all start at row 0): each stage's GEMMs use the scales of its
    own rows, so the mosaic equals its dequantized-weights oracle in every stage, every GEMM in float8."""
    from mosaic_kernels import ops
    from tests.families.conformance import dequantized_copy

    dense = dense_of("sd35-medium")
    blocks = [SD3.dense_block(b) for b in dense.transformer_blocks]
    every = {"heads": range(4), "heads2": range(4), "channels": range(128), "context_channels": range(128)}
    late = {"heads": [0, 1, 2], "heads2": [0, 1, 2], "channels": range(96), "context_channels": range(88)}
    early = {"heads": [1, 2, 3], "heads2": [1, 2, 3], "channels": range(40, 128), "context_channels": range(40, 128)}
    stages = [StageSpec(name, t0, t1, 0.3, [units_of(w, **keep) for w in blocks])
              for name, t0, t1, keep in (("late", 0, 300, late), ("middle", 300, 700, every), ("early", 700, 1001, early))]
    mosaic = mosaicdiff.quantize(MosaicSD3.from_dense(dense, stages, share_producers=True), "fp8")
    block = mosaic.stage_blocks[2][0]  # the early stage's dual-attention block: every run starts past row 0
    assert block.producers.qkv_weight.dtype == torch.float8_e4m3fn and block.kind.dual_attention
    assert all(a > 0 for a, _ in block.ranges.values()), block.ranges
    oracle = dequantized_copy(mosaic)
    x, cond = testing.tiny_inputs(dense, 2)
    for t in (150, 500, 850):
        tt = torch.full((2,), float(t))
        with ops.record_dispatch() as calls:
            got = testing.call(mosaic, x, tt, cond)
        assert calls[("fp8_gemm", "torch")] == 10 + 10 + 5, dict(calls)  # two dual-attention blocks, context_pre_only
        assert_close(got, testing.call(oracle, x, tt, cond), atol=1e-4, rtol=1e-4)
