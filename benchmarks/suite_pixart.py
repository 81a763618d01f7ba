"""The GPU suite's pixart stage: one PixArt-Sigma 1024 px transformer forward (one step with CFG) per config.

The real PixArt-Sigma-XL-2-1024-MS transformer config (`pixart_config.PIXART_SIGMA_1024`) with
seeded random weights in bf16 (speed does not depend on the weights' values), latents 128 x 128
(4096 tokens), batch 2 (the two CFG branches), T5 text states (2, 300, 4096) with the pipeline's
attention mask (a 120-token prompt: the rest masked). The configs (diffusers eager, diffusers +
compile, engine dense, mosaic 0.3) and their timing are suite_forward.py's, at the timestep of
each mosaic stage (per step) and step-weighted over PixArt-Sigma's sampler, DPM-Solver++ with 20
steps on linear betas. Target: mosaic 0.3 at least 1.4x diffusers + compile dense per step.
The dry run uses a tiny PixArt config in fp32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pixart_config import PIXART_SIGMA_1024, PIXART_SIGMA_TEXT_TOKENS, PIXART_TINY, PIXART_TINY_TEXT_TOKENS
from suite_context import Suite
from suite_forward import PLAN, RATIO_PAIRS, ForwardBench, run_forward_stage, single_thread_on_cpu

__all__ = ["PLAN", "PixArtBench", "RATIO_PAIRS", "TARGETS", "stage_pixart"]

NUM_STEPS = 20  # PixArtSigmaPipeline's default
BATCH = 2  # one prompt, both CFG branches in one forward (what the pipeline runs)
PROMPT_TOKENS = 120  # unmasked text tokens of the timed prompt (the rest of the 300 are padding)
#: name -> (slower config, faster config, target ratio of their ms_per_forward).
TARGETS = {"pixart_mosaic_0.3_vs_compile_dense": ("diffusers_compile_dense", "mosaic_0.3", 1.4)}


class PixArtBench(ForwardBench):
    """PixArt-Sigma 1024 px (tiny config in the dry run) under DPM-Solver++ 20 steps."""

    name = "pixart"
    targets = TARGETS
    timestep_shape = (BATCH,)  # the pipeline's ``timestep.expand(batch)``

    def __init__(self, suite: Suite):
        dry = suite.args.dry_run
        self.cfg = PIXART_TINY if dry else PIXART_SIGMA_1024
        self.text_tokens = PIXART_TINY_TEXT_TOKENS if dry else PIXART_SIGMA_TEXT_TOKENS
        super().__init__(suite)

    def build_dense(self):
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        with torch.device(self.device):  # initialised on the GPU: seconds, not a minute on the host
            model = PixArtTransformer2DModel(**self.cfg)
        if self.dtype != torch.float32:
            model = model.to(dtype=self.dtype)
        return model.eval().requires_grad_(False)

    def make_scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                                beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)
        scheduler.set_timesteps(NUM_STEPS)
        return scheduler

    def inputs(self, batch: int | None = None, seed: int = 0) -> dict:
        batch = batch or BATCH
        g = torch.Generator().manual_seed(seed)
        size, tokens = self.cfg["sample_size"], self.text_tokens
        latents = torch.randn(batch, self.cfg["in_channels"], size, size, generator=g)
        text = torch.randn(batch, tokens, self.cfg["caption_channels"], generator=g)
        mask = torch.zeros(batch, tokens)
        mask[:, : min(PROMPT_TOKENS, tokens // 2)] = 1
        return {"hidden_states": latents.to(self.device, self.dtype),
                "encoder_hidden_states": text.to(self.device, self.dtype),
                "encoder_attention_mask": mask.to(self.device, self.dtype),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def engine(self, mosaic):
        # the text k/v of the kept cross-attention heads, computed once per prompt
        return mosaic.enable_cross_kv_cache(True) if hasattr(mosaic, "enable_cross_kv_cache") else mosaic


def stage_pixart(suite: Suite, out: Path) -> bool:
    """The pixart stage (see the module docstring); writes pixart.json after every config."""
    args = suite.args
    with single_thread_on_cpu(args.dry_run):
        bench = PixArtBench(suite)
        header = {"env": suite.env,
                  "model": "tiny PixArt config (dry run)" if args.dry_run else "PixArt-Sigma-XL-2-1024-MS transformer",
                  "weights": "random (seed 0)", "dtype": str(bench.dtype).replace("torch.", ""),
                  "cross_kv_cache": "on for engine_dense and mosaic_0.3"}
        return run_forward_stage(bench, args.rep_ms, out, header)[1]
