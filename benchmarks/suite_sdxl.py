"""The GPU suite's sdxl stage: one SDXL base U-Net forward (one denoising step with CFG) per config.

The real SDXL base U-Net config (`sdxl_config.SDXL`) with seeded random weights in bf16
(speed does not depend on the weights' values), latents 128 x 128 (1024 px), batch 2 (the two
CFG branches), text states (2, 77, 2048), pooled (2, 1280), time ids (2, 6). The configs
(diffusers eager, diffusers + compile, engine dense, mosaic 0.3) and their timing are
suite_forward.py's, at the timestep of each mosaic stage, step-weighted over Euler-50; the
engine configs run with the cross-attention k/v cache on. Optionally (``--sdxl-prune-time``;
minutes on an H200, so not part of gpu_check.sh's 600 s) the wall time of ``mosaicdiff.prune``
with OBS and 32 random calibration latents per stage. The dry run uses diffusers' tiny SDXL test
config in fp32 on the CPU and always rehearses the prune timing (2 samples per stage).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sdxl_config import SDXL, SDXL_TINY
from suite_common import log, write_json
from suite_context import Suite
from suite_forward import PLAN, RATIO_PAIRS, TARGET_SPARSITY, ForwardBench, run_forward_stage, single_thread_on_cpu

__all__ = ["PLAN", "RATIO_PAIRS", "SDXLBench", "TARGETS", "stage_sdxl"]

NUM_STEPS = 50
BATCH = 2  # one prompt, both CFG branches in one forward (what the SDXL pipeline runs)
TEXT_TOKENS = 77
#: name -> (slower config, faster config, target ratio of their ms_per_forward).
TARGETS = {"PF8_sdxl_mosaic_0.3_vs_compile_dense": ("diffusers_compile_dense", "mosaic_0.3", 1.4)}


def euler_scheduler(num_steps: int = NUM_STEPS):
    """SDXL's default sampler (Euler, scaled_linear betas) set to ``num_steps`` steps."""
    from mosaicdiff.families.unet.adapter import UNET

    scheduler = UNET.default_scheduler()
    scheduler.set_timesteps(num_steps)
    return scheduler


def build_dense_unet(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A seeded random-weight ``UNet2DConditionModel`` on ``device`` in ``dtype`` (initialised there)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):  # on the GPU: seconds instead of a minute of host init for 2.6 B params
        unet = UNet2DConditionModel(**cfg)
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    return unet.eval().requires_grad_(False)


def unet_inputs(cfg: dict, device: str, dtype: torch.dtype, batch: int = BATCH, seed: int = 0) -> dict:
    """Latents, text states, pooled embeddings and time ids shaped as the config's U-Net takes them."""
    g = torch.Generator().manual_seed(seed)
    size = cfg["sample_size"]
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    sample = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, cfg["cross_attention_dim"], generator=g)
    px = float(size * 8)  # original size, crop top-left, target size, as the pipeline builds them
    time_ids = torch.tensor([px, px, 0.0, 0.0, px, px]).repeat(batch, 1)
    return {"sample": sample.to(device, dtype), "encoder_hidden_states": text.to(device, dtype),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
                                  "time_ids": time_ids.to(device, dtype)}}


class SDXLBench(ForwardBench):
    """The SDXL base U-Net (tiny test config in the dry run) under Euler-50."""

    name = "sdxl"
    targets = TARGETS

    def __init__(self, suite: Suite):
        self.cfg = SDXL_TINY if suite.args.dry_run else SDXL
        super().__init__(suite)

    def build_dense(self):
        return build_dense_unet(self.cfg, self.device, self.dtype)

    def make_scheduler(self):
        return euler_scheduler()

    def inputs(self, batch: int | None = None, seed: int = 0) -> dict:
        return unet_inputs(self.cfg, self.device, self.dtype, batch=batch or BATCH, seed=seed)

    def engine(self, mosaic):
        return mosaic.enable_cross_kv_cache(True)


def prune_time(bench: SDXLBench, samples_per_stage: int, batch_size: int) -> dict:
    """Wall time of ``mosaicdiff.prune`` (mosaic, OBS) on random calibration latents and text states."""
    import mosaicdiff
    from mosaicdiff.method.calibrate import TextCalibration

    n = samples_per_stage
    data = bench.inputs(batch=n, seed=1)
    cal = TextCalibration(data["sample"], data["encoder_hidden_states"],
                          pooled_prompt_embeds=data["added_cond_kwargs"]["text_embeds"],
                          add_time_ids=data["added_cond_kwargs"]["time_ids"])
    if bench.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    mosaic = mosaicdiff.prune(bench.dense, cal, TARGET_SPARSITY, method="mosaic", scheduler=bench.scheduler,
                              samples_per_stage=n, batch_size=batch_size, progress=False)
    if bench.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"pruner": "obs", "samples_per_stage": n, "cfg_duplicated": True, "batch_size": batch_size,
            "seconds": round(seconds, 2), "stages": [list(r) for r in mosaic.stage_ranges]}


def stage_sdxl(suite: Suite, out: Path) -> bool:
    """The sdxl stage (see the module docstring); writes sdxl.json after every config."""
    args = suite.args
    with single_thread_on_cpu(args.dry_run):
        bench = SDXLBench(suite)
        header = {"env": suite.env, "model": "tiny SDXL test config (dry run)" if args.dry_run else "SDXL base U-Net",
                  "weights": "random (seed 0)", "dtype": str(bench.dtype).replace("torch.", ""),
                  "cross_kv_cache": "on for engine_dense and mosaic_0.3"}
        result, ok = run_forward_stage(bench, args.rep_ms, out, header)
        if args.sdxl_prune_time or args.dry_run:
            samples = 2 if args.dry_run else args.sdxl_prune_samples
            result["prune_time"] = prune_time(bench, samples, batch_size=16)
            log(f"  sdxl prune (OBS, {samples} samples per stage): {result['prune_time']['seconds']} s")
            write_json(out / "sdxl.json", result)
    return ok
