"""The GPU suite's flux stage: one FLUX.1-dev 1024 px transformer forward (batch 1, no CFG) per config.

The real FLUX.1-dev transformer config (`mosaicdiff.families.flux.configs.FLUX_DEV`: 19 double- and
38 single-stream blocks, 24 heads x 128) with seeded random weights in bf16 (speed does not depend on
the weights' values): 1024 x 1024 px is a 128 x 128 x 16 latent packed 2x2 into 4096 image tokens of
64 channels, 512 T5 tokens (4096 wide), CLIP pooled states (768), guidance 3.5, batch 1 (Flux-dev is
guidance-distilled: one forward per step). The sampler is FluxPipeline's: flow-matching Euler, 28
steps on ``linspace(1, 1/28, 28)`` shifted by ``mu`` of 4096 tokens; the model is called with
``timestep / 1000``. The configs (diffusers eager, diffusers + compile, engine dense, mosaic 0.3) and
their timing are suite_forward.py's, at each mosaic stage's timestep (per step) and step-weighted.
Target: mosaic 0.3 at least 1.4x diffusers + compile dense per step. Three 12B-parameter models do
not fit an 80 GB card at once: each engine config is freed after it is timed (`release_models`).
The dry run uses the family's tiny config in fp32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from suite_context import Suite
from suite_forward import PLAN, RATIO_PAIRS, ForwardBench, run_forward_stage, single_thread_on_cpu

from mosaicdiff.families.flux.configs import FLUX_DEV

__all__ = ["PLAN", "FluxBench", "RATIO_PAIRS", "TARGETS", "stage_flux"]

NUM_STEPS = 28  # FluxPipeline's default
GUIDANCE = 3.5
#: 1024 px: (1024 / 16)^2 packed latent tokens; FLUX.1-dev's T5 max_sequence_length.
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512
#: The dry run: the family's tiny layout at 16 packed tokens and 6 text tokens.
TINY_IMAGE_TOKENS, TINY_TEXT_TOKENS = 16, 6
TARGETS = {"flux_mosaic_0.3_vs_compile_dense": ("diffusers_compile_dense", "mosaic_0.3", 1.4)}


class FluxBench(ForwardBench):
    """FLUX.1-dev 1024 px (tiny config in the dry run) under flow-matching Euler, 28 steps."""

    name = "flux"
    targets = TARGETS
    timestep_shape = (1,)  # FluxPipeline's ``timestep.expand(batch) / 1000``
    release_models = True  # 24 GB each in bf16: free an engine config once timed

    def __init__(self, suite: Suite):
        from mosaicdiff.families.flux.testing import tiny_config

        dry = suite.args.dry_run
        self.cfg = tiny_config() if dry else FLUX_DEV
        self.image_tokens, self.text_tokens = (TINY_IMAGE_TOKENS, TINY_TEXT_TOKENS) if dry else (IMAGE_TOKENS,
                                                                                                  TEXT_TOKENS)
        super().__init__(suite)

    def build_dense(self):
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        with torch.device(self.device):  # initialised on the GPU: seconds, not minutes on the host
            model = FluxTransformer2DModel(**self.cfg)
        if self.dtype != torch.float32:
            model = model.to(dtype=self.dtype)
        return model.eval().requires_grad_(False)

    def make_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from mosaicdiff.core.schedulers import flow_shift_mu

        # FLUX.1-dev's scheduler config, timesteps as FluxPipeline sets them at this resolution
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        sigmas = np.linspace(1.0, 1 / NUM_STEPS, NUM_STEPS)
        scheduler.set_timesteps(sigmas=sigmas, mu=flow_shift_mu(scheduler, self.image_tokens))
        return scheduler

    def inputs(self, batch: int | None = None, seed: int = 0) -> dict:
        from mosaicdiff.families.flux.calibration import image_ids

        batch = batch or 1
        g = torch.Generator().manual_seed(seed)
        side = int(round(self.image_tokens ** 0.5))
        on = dict(device=self.device, dtype=self.dtype)
        return {"hidden_states": torch.randn(batch, self.image_tokens, self.cfg["in_channels"], generator=g).to(**on),
                "encoder_hidden_states": torch.randn(batch, self.text_tokens, self.cfg["joint_attention_dim"],
                                                     generator=g).to(**on),
                "pooled_projections": torch.randn(batch, self.cfg["pooled_projection_dim"], generator=g).to(**on),
                "img_ids": image_ids(side, side, device=self.device),
                "txt_ids": torch.zeros(self.text_tokens, 3, device=self.device),
                "guidance": torch.full((batch,), GUIDANCE, device=self.device, dtype=torch.float32)}

    def timestep(self, name: str, t: float) -> torch.Tensor:
        # the pipeline passes t / 1000 (the model scales it back); the mosaic picks its stage from it
        return super().timestep(name, t) / 1000


def stage_flux(suite: Suite, out: Path) -> bool:
    """The flux stage (see the module docstring); writes flux.json after every config."""
    args = suite.args
    with single_thread_on_cpu(args.dry_run):
        bench = FluxBench(suite)
        header = {"env": suite.env,
                  "model": "tiny Flux config (dry run)" if args.dry_run else "FLUX.1-dev transformer, 1024 px",
                  "weights": "random (seed 0)", "dtype": str(bench.dtype).replace("torch.", ""),
                  "guidance": GUIDANCE, "image_tokens": bench.image_tokens, "text_tokens": bench.text_tokens}
        return run_forward_stage(bench, args.rep_ms, out, header)[1]
