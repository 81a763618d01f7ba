"""`mosaicdiff.prune` on a U-Net, and the mosaic inside StableDiffusionXLPipeline (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff import schedule
from mosaicdiff.integrations.diffusers_unet import UNET
from mosaicdiff.integrations.schedulers import scheduler_alphas_cumprod
from mosaicdiff.mosaic_unet import MosaicUNet
from tests.method.test_unet_adapter import TEXT, calibration, tiny_unet


def test_sdxl_schedule_gives_the_closed_form_stages():
    """scaled_linear betas 0.00085-0.012: the closed form puts the middle stage at [198, 783)."""
    abar = scheduler_alphas_cumprod(UNET.default_scheduler())
    assert schedule.stage_boundaries(abar, x0_sq_norm=1.0) == (198, 783)


@pytest.mark.parametrize("method", ["mosaic", "uniform", "magnitude", "random"])
def test_prune_returns_a_stage_switching_unet(method):
    unet, cal = tiny_unet(), calibration(6)
    data = cal if method in ("mosaic", "uniform") else None
    mosaic = mosaicdiff.prune(unet, data, 0.4, method=method, samples_per_stage=4, align=None, progress=False,
                              boundaries=(198, 783) if method == "mosaic" else None)
    assert isinstance(mosaic, MosaicUNet)
    names = [r[0] for r in mosaic.stage_ranges]
    assert names == (["early", "middle", "late"] if method == "mosaic" else ["all"])
    if method == "mosaic":
        assert [r[1:3] for r in mosaic.stage_ranges] == [(783, 1000), (198, 783), (0, 198)]
        assert mosaic.stage_ranges[1][3] < mosaic.stage_ranges[0][3]  # the middle stage is pruned least
    for blocks in mosaic.stage_blocks:
        assert all(min(b.heads) >= 1 for b in blocks)
    assert mosaic.meta["scheduler"] == "EulerDiscreteScheduler"


def test_prune_refuses_class_calibration_for_a_unet():
    from mosaicdiff.calibrate import Calibration

    with pytest.raises(TypeError, match="TextCalibration"):
        mosaicdiff.prune(tiny_unet(), Calibration(torch.randn(2, 4, 16, 16), torch.zeros(2)), 0.4, progress=False)


def _pipeline(unet, scheduler_name: str):
    pytest.importorskip("transformers")  # diffusers' SDXL pipeline module imports it
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    kind = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler_name]
    scheduler = kind(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler)


@pytest.mark.parametrize("scheduler_name", ["euler", "ddim", "dpm"])
def test_sparsity_zero_mosaic_matches_the_dense_unet_in_the_sdxl_pipeline(scheduler_name):
    unet = tiny_unet()
    pipe = _pipeline(unet, scheduler_name)
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 7, TEXT, generator=g), torch.randn(1, 32, generator=g)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
              negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=4, output_type="latent",
              height=32, width=32, guidance_scale=5.0)
    dense = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    pipe.unet = mosaicdiff.prune(unet, None, 0.0, method="magnitude", progress=False)
    out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert_close(out, dense, atol=1e-4 * float(dense.abs().max()), rtol=1e-4)
    pipe.unet = mosaicdiff.prune(unet, None, 0.5, method="magnitude", progress=False)
    pruned = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert not torch.allclose(pruned, dense, atol=1e-3)  # the pruned U-Net really runs in the pipeline


def test_cross_kv_cache_computes_the_text_keys_once_per_run(monkeypatch):
    unet = tiny_unet()
    mosaic = mosaicdiff.prune(unet, None, 0.5, method="magnitude", progress=False)
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TEXT, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    kv_weights = [block.kv2_params()[0] for block in mosaic.stage_blocks[0]]  # views in shared storage
    real_linear, counted = torch.nn.functional.linear, {"n": 0}

    def counting(inp, weight, bias=None):  # counts the GEMMs of the text states' k/v
        counted["n"] += any(weight.data_ptr() == kv.data_ptr() and weight.shape == kv.shape for kv in kv_weights)
        return real_linear(inp, weight, bias)

    t = torch.full((2,), 500)
    with torch.no_grad():
        want = mosaic(x, t, text, added_cond_kwargs=added).sample
        monkeypatch.setattr(torch.nn.functional, "linear", counting)
        mosaic.enable_cross_kv_cache()
        got = [mosaic(x, t, text, added_cond_kwargs=added).sample for _ in range(3)]
        once = counted["n"]
        text.mul_(2.0)  # modified in place: the cache must notice
        changed = mosaic(x, t, text, added_cond_kwargs=added).sample
        monkeypatch.undo()
        mosaic.enable_cross_kv_cache(False)
        fresh = mosaic(x, t, text, added_cond_kwargs=added).sample
    assert once == len(kv_weights), f"k/v computed {once} times for {len(kv_weights)} blocks over 3 steps"
    assert counted["n"] == 2 * len(kv_weights)
    for a in got:
        assert_close(a, want, atol=0, rtol=0)
    assert_close(changed, fresh, atol=0, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    unet, cal = tiny_unet(), calibration(6)
    mosaic = mosaicdiff.prune(unet, cal, 0.4, samples_per_stage=4, align=None, progress=False)
    mosaic.save_pretrained(tmp_path / "m")
    loaded = MosaicUNet.from_pretrained(tmp_path / "m")
    assert loaded.stage_ranges == mosaic.stage_ranges and loaded.memory_report() == mosaic.memory_report()
    assert loaded.config.in_channels == 4 and loaded.config.addition_time_embed_dim == 8  # what pipelines read
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TEXT, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    for t in (900, 500, 100):
        tt = torch.full((2,), t)
        with torch.no_grad():
            assert_close(loaded(x, tt, text, added_cond_kwargs=added).sample,
                         mosaic(x, tt, text, added_cond_kwargs=added).sample, atol=0, rtol=0)
    half = MosaicUNet.from_pretrained(tmp_path / "m", torch_dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_load_refuses_folders_that_do_not_fit(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    mosaic = mosaicdiff.prune(tiny_unet(), None, 0.5, method="magnitude", progress=False)
    mosaic.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.startswith("stage_blocks.0.3.ff2_weight"))
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=r"tensor 'stage_blocks.0.3.ff2_weight' has shape"):
        MosaicUNet.from_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "format": "mosaicdiff.MosaicDiT"}))
    with pytest.raises(ValueError, match="expected 'mosaicdiff.MosaicUNet'"):
        MosaicUNet.from_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError, match="saving a MosaicUNet there"):
        mosaic.save_pretrained(tmp_path / "m")  # the folder now holds another kind of mosaic
