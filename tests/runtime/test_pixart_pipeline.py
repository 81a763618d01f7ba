"""The PixArt mosaic as ``pipe.transformer`` in PixArtSigmaPipeline and PixArtAlphaPipeline (tiny random
models, prompt embeddings passed directly: no text encoder, no network)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff.calibrate import ConditionedCalibration
from mosaicdiff.core.schedulers import scheduler_alphas_cumprod
from mosaicdiff.families.pixart.model import MosaicPixArt
from mosaicdiff.families.pixart.testing import TEXT, TOKENS, tiny_dense
from mosaicdiff.method import schedule

pytest.importorskip("transformers")  # diffusers' PixArt pipeline modules import it


@pytest.fixture(autouse=True)
def _torch_backend():
    """The fast torch reference backend of the kernel ops (the kernels have their own tests)."""
    from mosaic_kernels import ops

    with ops.use_backend("torch"):
        yield


def _pipeline(kind: str, transformer):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear")
    cls = PixArtSigmaPipeline if kind == "sigma" else PixArtAlphaPipeline
    return cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def _prompts(seed: int = 3):
    """Prompt and negative-prompt embeddings with T5-style masks (the negative keeps one token)."""
    g = torch.Generator().manual_seed(seed)
    embeds, neg = torch.randn(1, TOKENS, TEXT, generator=g), torch.randn(1, TOKENS, TEXT, generator=g)
    mask, neg_mask = torch.ones(1, TOKENS), torch.zeros(1, TOKENS)
    mask[0, -1], neg_mask[0, 0] = 0, 1
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": neg,
            "negative_prompt_attention_mask": neg_mask}


def _sample(pipe, steps: int = 6):
    return pipe(**_prompts(), negative_prompt=None, num_inference_steps=steps, guidance_scale=4.5, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output_type="latent", use_resolution_binning=False,
                max_sequence_length=TOKENS).images


def _calibration(n: int = 6) -> ConditionedCalibration:
    g = torch.Generator().manual_seed(1)
    p = _prompts()
    mask = torch.ones(n, TOKENS)
    mask[::2, -2:] = 0
    return ConditionedCalibration(
        torch.randn(n, 4, 8, 8, generator=g),
        {"encoder_hidden_states": torch.randn(n, TOKENS, TEXT, generator=g), "encoder_attention_mask": mask},
        {"encoder_hidden_states": p["negative_prompt_embeds"],
         "encoder_attention_mask": p["negative_prompt_attention_mask"]})


@pytest.mark.parametrize("kind", ["sigma", "alpha"])
def test_zero_sparsity_mosaic_samples_as_the_dense_transformer(kind):
    dense = tiny_dense(use_additional_conditions=False)
    pipe = _pipeline(kind, dense)
    want = _sample(pipe)
    pipe.transformer = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    got = _sample(pipe)
    assert torch.isfinite(got).all() and want.abs().max() > 0.1
    assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sigma", "alpha"])
def test_pruned_mosaic_is_a_drop_in_transformer(kind, tmp_path):
    """The issue's line: ``pipe.transformer = mosaicdiff.prune(pipe.transformer, calib, 0.3,
    scheduler=pipe.scheduler)``; then save/load and the k/v cache keep the samples."""
    dense = tiny_dense(use_additional_conditions=False)
    pipe = _pipeline(kind, dense)
    dense_out = _sample(pipe)
    pipe.transformer = mosaicdiff.prune(pipe.transformer, _calibration(), 0.3, scheduler=pipe.scheduler,
                                        samples_per_stage=4, align=None, progress=False)
    mosaic = pipe.transformer
    assert isinstance(mosaic, MosaicPixArt) and mosaic.num_stages == 3 and mosaic.producer_storage is not None
    assert mosaic.meta["scheduler"] == "DPMSolverMultistepScheduler"
    out = _sample(pipe)
    assert torch.isfinite(out).all() and (out - dense_out).abs().max() > 1e-4  # pruned: not the dense samples
    mosaic.enable_cross_kv_cache()
    assert_close(_sample(pipe), out, atol=1e-5, rtol=1e-5)
    mosaic.save_pretrained(tmp_path / "transformer")
    pipe.transformer = MosaicPixArt.from_pretrained(tmp_path / "transformer")
    assert_close(_sample(pipe), out, atol=1e-5, rtol=1e-5)


def test_stage_boundaries_come_from_the_scheduler_passed():
    """prune(scheduler=...) divides the trajectory on that scheduler's alphas_cumprod; the default is
    PixArt's own DPM-Solver on linear betas 0.0001..0.02."""
    from diffusers import DDIMScheduler

    dense = tiny_dense(use_additional_conditions=False)
    pixart = _pipeline("sigma", dense).scheduler
    other = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    got = {}
    for name, sched in (("pixart", pixart), ("sd", other), ("default", None)):
        stages = mosaicdiff.api.prune_stages(dense, _calibration(), 0.3, scheduler=sched, pruner="magnitude",
                                             align=None, progress=False)
        got[name] = (stages[1].t_start, stages[1].t_end)
    r = _calibration().x0_sq_norm
    for name, sched in (("pixart", pixart), ("sd", other)):
        assert got[name] == schedule.stage_boundaries(scheduler_alphas_cumprod(sched), x0_sq_norm=r), name
    assert got["default"] == got["pixart"] and got["sd"] != got["pixart"]
