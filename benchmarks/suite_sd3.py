"""The GPU suite's sd3 stage: one SD3.5-Large 1024 px transformer forward (one step with CFG) per config.

The real SD3.5-Large transformer config (`mosaicdiff.families.sd3.configs.SD35_LARGE`: 38 blocks of 38
heads x 64, q/k RMSNorm) with seeded random weights in bf16 (speed does not depend on the weights'
values): latents 128 x 128 x 16 (4096 image tokens), batch 2 (both CFG branches in one forward, as
StableDiffusion3Pipeline runs them), text states (2, 333, 4096) (77 CLIP + 256 T5 tokens), pooled
states (2, 2048). The sampler is the pipeline's flow-matching Euler, 28 steps, shift 3; the model is
called with the scheduler's timestep (0..1000). The configs (diffusers eager, diffusers + compile,
engine dense, mosaic 0.3) and their timing are suite_forward.py's, at each mosaic stage's timestep
(per step) and step-weighted. Target: mosaic 0.3 at least 1.4x diffusers + compile dense per step.
The dry run uses the family's tiny config in fp32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from suite_context import Suite
from suite_forward import PLAN, RATIO_PAIRS, ForwardBench, run_forward_stage, single_thread_on_cpu

from mosaicdiff.families.sd3.configs import SD35_LARGE

__all__ = ["PLAN", "RATIO_PAIRS", "SD3Bench", "TARGETS", "stage_sd3"]

NUM_STEPS = 28  # StableDiffusion3Pipeline's default
BATCH = 2  # one prompt, both CFG branches in one forward
TEXT_TOKENS, TINY_TEXT_TOKENS = 333, 5  # 77 CLIP + 256 T5 (max_sequence_length) tokens
TARGETS = {"sd3_mosaic_0.3_vs_compile_dense": ("diffusers_compile_dense", "mosaic_0.3", 1.4)}


class SD3Bench(ForwardBench):
    """SD3.5-Large 1024 px (tiny config in the dry run) under flow-matching Euler 28 steps, shift 3."""

    name = "sd3"
    targets = TARGETS
    timestep_shape = (BATCH,)  # the pipeline's ``t.expand(latent_model_input.shape[0])``

    def __init__(self, suite: Suite):
        from mosaicdiff.families.sd3.testing import tiny_config

        dry = suite.args.dry_run
        self.cfg = tiny_config() if dry else SD35_LARGE
        self.text_tokens = TINY_TEXT_TOKENS if dry else TEXT_TOKENS
        super().__init__(suite)

    def build_dense(self):
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        with torch.device(self.device):  # initialised on the GPU: seconds, not minutes on the host
            model = SD3Transformer2DModel(**self.cfg)
        if self.dtype != torch.float32:
            model = model.to(dtype=self.dtype)
        return model.eval().requires_grad_(False)

    def make_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        scheduler.set_timesteps(NUM_STEPS)
        return scheduler

    def inputs(self, batch: int | None = None, seed: int = 0) -> dict:
        batch = batch or BATCH
        g = torch.Generator().manual_seed(seed)
        size = self.cfg["sample_size"]
        on = dict(device=self.device, dtype=self.dtype)
        return {"hidden_states": torch.randn(batch, self.cfg["in_channels"], size, size, generator=g).to(**on),
                "encoder_hidden_states": torch.randn(batch, self.text_tokens, self.cfg["joint_attention_dim"],
                                                     generator=g).to(**on),
                "pooled_projections": torch.randn(batch, self.cfg["pooled_projection_dim"], generator=g).to(**on)}


def stage_sd3(suite: Suite, out: Path) -> bool:
    """The sd3 stage (see the module docstring); writes sd3.json after every config."""
    args = suite.args
    with single_thread_on_cpu(args.dry_run):
        bench = SD3Bench(suite)
        header = {"env": suite.env,
                  "model": "tiny SD3.5 config (dry run)" if args.dry_run else "SD3.5-Large transformer, 1024 px",
                  "weights": "random (seed 0)", "dtype": str(bench.dtype).replace("torch.", ""),
                  "text_tokens": bench.text_tokens}
        return run_forward_stage(bench, args.rep_ms, out, header)[1]
