"""The U-Net adapter, TextCalibration and the stage-switching MosaicUNet on a tiny SDXL-style U-Net.

Oracle: pruning without compensation (magnitude) must equal the dense U-Net with the dropped
heads' and channels' consumer columns zeroed; at sparsity 0 the mosaic equals the dense U-Net.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import collect_hessians, stage_inputs
from mosaicdiff.families.unet.adapter import UNET, transformer_blocks
from mosaicdiff.families.unet.model import MosaicUNet
from mosaicdiff.method.text_calibration import TextCalibration
from mosaicdiff.core.stages import StageSpec

TIME_IDS = torch.tensor([[16.0, 16, 0, 0, 16, 16]])


#: Width of the text states (the tiny configs' cross_attention_dim).
TEXT = 64


def tiny_unet(sdxl: bool = True, seed: int = 0):
    """diffusers' tiny SDXL test U-Net (its pipeline tests' config: 12 transformer blocks, 4 heads of
    16 at width 64, text_time conditioning); ``sdxl=False``: the same without the added
    conditioning and with cross-attention at both resolutions (an SD-1.5-style layout)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if sdxl:
        layout = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=80, use_linear_projection=True)
    else:
        layout = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1)
    unet = UNet2DConditionModel(
        **{"layers_per_block": 2, **layout}, block_out_channels=(32, 64), sample_size=16, in_channels=4,
        out_channels=4, cross_attention_dim=TEXT, attention_head_dim=(2, 4))
    with torch.no_grad():
        for p in unet.parameters():  # no trivially zero bias / norm
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def calibration(n: int = 6, sdxl: bool = True, seed: int = 0) -> TextCalibration:
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, 32, generator=g) if sdxl else None
    return TextCalibration(torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 7, TEXT, generator=g), pooled,
                           TIME_IDS if sdxl else None)


def unet_inputs(batch: int = 2, sdxl: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 7, TEXT, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": TIME_IDS.expand(batch, 6)} if sdxl else None
    return x, text, added


def test_groups_are_the_blocks_heads_and_geglu_channels():
    unet = tiny_unet()
    blocks = transformer_blocks(unet)
    from diffusers.models.attention import BasicTransformerBlock

    every = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == len(every) > 6 and {id(b) for b in blocks} == {id(b) for b in every}
    for b in blocks:
        g = UNET.groups(b)
        assert g["attn1"].num_units == b.attn1.heads and g["attn2"].num_units == b.attn2.heads
        assert g["attn2"].producers[1].in_features == TEXT  # k/v read the text states
        inner = b.ff.net[2].in_features
        assert g["ff"].num_units == inner and b.ff.net[0].proj.out_features == 2 * inner
        assert g["ff"].producer_rows(torch.tensor([0, 3])).tolist() == [0, 3, inner, inner + 3]


def test_sparsity_zero_mosaic_equals_the_dense_unet():
    unet = tiny_unet()
    stage = StageSpec("all", 0, 1000, 0.0, [UNET.dense_block(b) for b in transformer_blocks(unet)])
    mosaic = MosaicUNet.from_dense(unet, [stage])
    x, text, added = unet_inputs()
    for t in (999, 400, 0):
        tt = torch.full((2,), t)
        with torch.no_grad():
            assert_close(mosaic(x, tt, text, added_cond_kwargs=added).sample,
                         unet(x, tt, text, added_cond_kwargs=added).sample, atol=2e-5, rtol=1e-5)
    assert len(transformer_blocks(unet)) == len(stage.blocks), "the dense U-Net keeps its blocks"
    assert sum(p.numel() for p in mosaic.unet.parameters()) < sum(p.numel() for p in unet.parameters())


def _zeroed(unet, kept):
    """The dense U-Net with every dropped unit's consumer columns zeroed (kept: per block, per group)."""
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for b, k in zip(transformer_blocks(ref), kept):
            for name, attn in (("attn1", b.attn1), ("attn2", b.attn2)):
                hd = attn.inner_dim // attn.heads
                mask = torch.zeros(attn.inner_dim, dtype=torch.bool)
                for h in k[name].tolist():
                    mask[h * hd:(h + 1) * hd] = True
                attn.to_out[0].weight[:, ~mask] = 0
            mask = torch.zeros(b.ff.net[2].in_features, dtype=torch.bool)
            mask[k["ff"]] = True
            b.ff.net[2].weight[:, ~mask] = 0
    return ref


def test_uncompensated_stages_equal_the_zeroed_dense_unet():
    """Two stages with different magnitude/random selections; each equals its zeroed reference."""
    unet = tiny_unet()
    blocks = transformer_blocks(unet)
    specs, kept = [], {}
    for name, (t0, t1), method in (("late", (0, 500), "magnitude"), ("early", (500, 1000), "random")):
        pruned = [compact.prune_groups(UNET.groups(b), None, 0.5, method=method, align=None,
                                       generator=torch.Generator().manual_seed(3)) for b in blocks]
        kept[name] = [{g: p.kept for g, p in pr.items()} for pr in pruned]
        specs.append(StageSpec(name, t0, t1, 0.5, [UNET.compact_block(b, p) for b, p in zip(blocks, pruned)]))
    mosaic = MosaicUNet.from_dense(unet, specs)
    x, text, added = unet_inputs()
    for name, t in (("late", 100), ("early", 800)):
        tt = torch.full((2,), t)
        with torch.no_grad():
            want = _zeroed(unet, kept[name])(x, tt, text, added_cond_kwargs=added).sample
            got = mosaic(x, tt, text, added_cond_kwargs=added).sample
        assert_close(got, want, atol=2e-5, rtol=1e-5, msg=lambda m: f"stage {name}\n{m}")
    mixed = torch.tensor([100, 800])  # a batch over two stages: each row as run alone
    with torch.no_grad():
        got = mosaic(x, mixed, text, added_cond_kwargs=added).sample
        want = [mosaic(x[i:i + 1], mixed[i:i + 1], text[i:i + 1],
                       added_cond_kwargs={k: v[i:i + 1] for k, v in added.items()}).sample for i in range(2)]
    assert_close(got, torch.cat(want), atol=2e-5, rtol=1e-5)


def test_obs_on_text_conditioned_hessians_beats_magnitude():
    unet, cal = tiny_unet(), calibration(8)
    x_t, t, cond = stage_inputs(cal, 0, 1000, 8, generator=torch.Generator().manual_seed(0))
    text = cond["encoder_hidden_states"]
    assert x_t.shape[0] == 16 and torch.equal(text[8:], torch.zeros(8, 7, TEXT))  # CFG: zeros
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"][8:], torch.zeros(8, 32))
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], TIME_IDS.expand(16, 6)), "time ids: both branches"
    hessians = collect_hessians(unet, x_t, t, cond, batch_size=8, progress=False, adapter=UNET)
    blocks = transformer_blocks(unet)
    assert set(hessians[0]) == {"attn1", "attn2", "ff"}
    assert hessians[0]["ff"].shape == (blocks[0].ff.net[2].in_features,) * 2
    x, text, added = unet_inputs(4, seed=5)
    tt = torch.full((4,), 500)
    with torch.no_grad():
        ref = unet(x, tt, text, added_cond_kwargs=added).sample
    errs = {}
    for method in ("obs", "magnitude"):
        pruned = [compact.prune_groups(UNET.groups(b), hessians[i], 0.5, method=method, align=None)
                  for i, b in enumerate(blocks)]
        stage = StageSpec("all", 0, 1000, 0.5, [UNET.compact_block(b, p) for b, p in zip(blocks, pruned)])
        with torch.no_grad():
            out = MosaicUNet.from_dense(unet, [stage])(x, tt, text, added_cond_kwargs=added).sample
        errs[method] = float((out - ref).norm() / ref.norm())
    assert errs["obs"] < errs["magnitude"], errs


def test_text_calibration_refuses_bad_input():
    x, e = torch.randn(3, 4, 16, 16), torch.randn(3, 7, TEXT)
    with pytest.raises(ValueError, match="prompt_embeds must be a 3-D tensor with 3 rows"):
        TextCalibration(x, torch.randn(2, 7, TEXT))
    with pytest.raises(ValueError, match="needs both pooled_prompt_embeds and add_time_ids"):
        TextCalibration(x, e, torch.randn(3, 32))
    with pytest.raises(ValueError, match="6 columns"):
        TextCalibration(x, e, torch.randn(3, 32), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="latents must be a non-empty"):
        TextCalibration(torch.randn(0, 4, 16, 16), e[:0])
    with pytest.raises(ValueError, match="NaN"):
        TextCalibration(torch.full((3, 4, 16, 16), float("nan")), e)
    with pytest.raises(ValueError, match="shaped like prompt_embeds"):
        TextCalibration(x, e, negative_prompt_embeds=torch.randn(1, 5, TEXT))
    neg = torch.randn(1, 7, TEXT)
    cal = TextCalibration(x, e, negative_prompt_embeds=neg)
    cond = cal.condition_rows(torch.tensor([2, 0]))
    null = cal.null_condition_rows(torch.tensor([2, 0]))
    assert set(cond) == set(null) == {"encoder_hidden_states"}  # SD 1.x/2.x: no added_cond_kwargs
    assert torch.equal(cond["encoder_hidden_states"], e[[2, 0]])
    assert torch.equal(null["encoder_hidden_states"], neg.expand(2, 7, TEXT))



@pytest.mark.parametrize("case", ["zeros", "negative-ehs-only", "negative-one-row", "negative-per-row",
                                  "adapter-default"])
def test_sdxl_cfg_half_gets_the_null_pooled_embeds(case):
    """The CFG half of a stage's calibration batch (`stage_inputs`) holds the null branch's
    ``text_embeds``: zeros by default (also the U-Net adapter's default for a ConditionedCalibration
    without nulls), else the negative pooled embeds, never the prompt's; the time ids are the
    conditional rows' in both halves."""
    from mosaicdiff.method.calibrate import prepare_calibration
    from mosaicdiff.method.conditioned_calibration import ConditionedCalibration

    n, draws = 4, 6  # draws > n: cycles through the latents
    rows = torch.arange(n, dtype=torch.float32)
    latents = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = (rows + 1).view(n, 1, 1).expand(n, 7, TEXT).contiguous()  # row i is i + 1 everywhere
    pooled = (rows + 100).view(n, 1).expand(n, 32).contiguous()
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]]).repeat(n, 1)
    time_ids[:, 2] = rows  # a different crop per latent
    neg = {"negative-one-row": (torch.full((1, 7, TEXT), -3.0), torch.full((1, 32), -7.0)),
           "negative-per-row": (-(rows + 10).view(n, 1, 1).expand(n, 7, TEXT), -(rows + 200).view(n, 1).expand(n, 32)),
           "negative-ehs-only": (torch.full((1, 7, TEXT), -3.0), None)}.get(case, (None, None))
    if case == "adapter-default":
        cal = ConditionedCalibration(latents, {"encoder_hidden_states": text, "added_cond_kwargs": {
            "text_embeds": pooled, "time_ids": time_ids}})
        assert cal.null_conditions is None
        cal = prepare_calibration(tiny_unet(), UNET, cal)
    else:
        cal = TextCalibration(latents, text, pooled, time_ids, *neg)
    x_t, t, cond = stage_inputs(cal, 0, 1000, draws, cfg=True, generator=torch.Generator().manual_seed(1))
    assert x_t.shape[0] == t.shape[0] == 2 * draws
    assert torch.equal(x_t[:draws], x_t[draws:]) and torch.equal(t[:draws], t[draws:])
    ehs, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
    drawn = ehs[:draws, 0, 0].long() - 1
    assert sorted(set(drawn.tolist())) == list(range(n))
    assert torch.equal(ehs[:draws], text[drawn]) and torch.equal(added["text_embeds"][:draws], pooled[drawn])
    null_ehs, null_pooled = neg
    null_ehs = torch.zeros(1, 7, TEXT) if null_ehs is None else null_ehs
    null_pooled = torch.zeros(1, 32) if null_pooled is None else null_pooled
    pick = (lambda t: t.expand(draws, *t.shape[1:])) if case != "negative-per-row" else (lambda t: t[drawn])
    assert torch.equal(ehs[draws:], pick(null_ehs)), "the CFG half's text states"
    assert torch.equal(added["text_embeds"][draws:], pick(null_pooled)), "the CFG half's pooled embeds"
    assert torch.equal(added["time_ids"][:draws], time_ids[drawn])
    assert torch.equal(added["time_ids"][draws:], time_ids[drawn]), "time ids: the same in both halves"


def test_calibration_that_does_not_fit_the_unet_is_refused():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds and add_time_ids"):
        UNET.check_calibration(unet, calibration(sdxl=False))
    with pytest.raises(ValueError, match=f"cross_attention_dim is {TEXT}"):
        UNET.check_calibration(unet, TextCalibration(torch.randn(2, 4, 16, 16), torch.randn(2, 7, TEXT // 2),
                                                     torch.randn(2, 32), TIME_IDS))
    with pytest.raises(ValueError, match="expects 32"):
        UNET.check_calibration(unet, TextCalibration(torch.randn(2, 4, 16, 16), torch.randn(2, 7, TEXT),
                                                     torch.randn(2, 30), TIME_IDS))
    with pytest.raises(ValueError, match="multiples of 2"):
        UNET.check_calibration(unet, TextCalibration(torch.randn(2, 4, 15, 16), torch.randn(2, 7, TEXT),
                                                     torch.randn(2, 32), TIME_IDS))
    with pytest.raises(TypeError, match="TextCalibration"):
        UNET.check_calibration(unet, object())
    UNET.check_calibration(tiny_unet(sdxl=False), calibration(sdxl=False))  # SD 1.x/2.x layout


def test_unsupported_blocks_are_named():
    unet = tiny_unet()
    transformer_blocks(unet)[3].norm_type = "ada_norm"
    with pytest.raises(ValueError, match="transformer block 3 is norm_type 'ada_norm'"):
        UNET.validate(unet)


def test_the_tiny_configs_are_diffusers_test_shapes():
    """12 transformer blocks of 4 heads of 16 (width 64) in the SDXL one; SD-1.5 style: no added conditioning."""
    blocks = transformer_blocks(tiny_unet())
    assert len(blocks) == 12 and {(b.attn1.heads, b.attn1.inner_dim) for b in blocks} == {(4, 64)}
    sd = tiny_unet(sdxl=False)
    assert sd.config.addition_embed_type is None and len(transformer_blocks(sd)) > 0


def test_sd15_style_unet_prunes_and_runs():
    unet = tiny_unet(sdxl=False)
    stage = StageSpec("all", 0, 1000, 0.0, [UNET.dense_block(b) for b in transformer_blocks(unet)])
    mosaic = MosaicUNet.from_dense(unet, [stage])
    x, text, _ = unet_inputs(sdxl=False)
    with torch.no_grad():
        assert_close(mosaic(x, torch.full((2,), 300), text).sample, unet(x, torch.full((2,), 300), text).sample,
                     atol=2e-5, rtol=1e-5)
