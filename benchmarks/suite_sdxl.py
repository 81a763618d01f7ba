"""The GPU suite's sdxl stage: one SDXL base U-Net forward (one denoising step with CFG) per config.

The real SDXL base U-Net config (`sdxl_config.SDXL`) with seeded random weights in bf16
(speed does not depend on the weights' values), latents 128 x 128 (1024 px), batch 2 (the two
CFG branches), text states (2, 77, 2048), pooled (2, 1280), time ids (2, 6). Configs, timed with
`triton.testing.do_bench` (`suite_common.time_ms`) at the timestep of each mosaic stage:

- ``diffusers_eager_dense``: ``UNet2DConditionModel`` as it is;
- ``mosaic_0.3``: `MosaicUNet` at mean sparsity 0.3 on SDXL's schedule (three stages from the
  closed form, widths aligned to 64, shared producers, cross-attention k/v cache on). The kept
  heads / channels are magnitude-selected (``pruner="magnitude"``): timing depends only on the
  widths, which the divide + allocate step fixes, not on which units OBS would keep;
- ``diffusers_compile_dense``: ``torch.compile(dynamic=False)`` of the dense U-Net, compiled once
  (inductor; the dry run traces with dynamo and runs the graph eagerly, ``backend="eager"``);
- ``engine_dense``: `MosaicUNet` at sparsity 0 (one stage: the compact blocks on the engine's ops).

Each config's ``ms_per_forward`` is the step-weighted mean over a 50-step Euler schedule; the
ratios (slower / faster) are recomputed after every config and the file rewritten, so a guard
timeout keeps what was measured. Optionally (``--sdxl-prune-time``; minutes on an H200, so not
part of gpu_check.sh's 600 s) the wall time of ``mosaicdiff.prune`` with OBS and 32 random
calibration latents per stage. The dry run uses diffusers' tiny SDXL test config in fp32 on
the CPU and always rehearses the prune timing (2 samples per stage).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sdxl_config import SDXL, SDXL_TINY
from suite_common import StageTimeout, is_timeout, log, stage_step_weights, time_ms, unique_graphs, write_json
from suite_context import Suite

NUM_STEPS = 50
BATCH = 2  # one prompt, both CFG branches in one forward (what the SDXL pipeline runs)
TEXT_TOKENS = 77
TARGET_SPARSITY = 0.3
#: name -> (slower config, faster config, target ratio of their ms_per_forward).
TARGETS = {"PF8_sdxl_mosaic_0.3_vs_compile_dense": ("diffusers_compile_dense", "mosaic_0.3", 1.4)}
RATIO_PAIRS = (("diffusers_eager_dense", "diffusers_compile_dense"), ("diffusers_eager_dense", "engine_dense"),
               ("diffusers_compile_dense", "engine_dense"), ("engine_dense", "mosaic_0.3"),
               ("diffusers_eager_dense", "mosaic_0.3"), ("diffusers_compile_dense", "mosaic_0.3"))
#: In order of importance: the file keeps what was measured when the guard fires.
PLAN = ("diffusers_eager_dense", "mosaic_0.3", "diffusers_compile_dense", "engine_dense")


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


class SDXLModels:
    """The dense U-Net and the configs built from it, on first use."""

    def __init__(self, suite: Suite):
        self.device, self.dtype = suite.device, suite.dtype
        self.cfg = SDXL_TINY if suite.args.dry_run else SDXL
        self.scheduler = euler_scheduler()
        #: inductor on the GPU; in the dry run dynamo still traces the whole U-Net (graph and
        #: recompile counts are real) but skips inductor's CPU codegen, a minute on 2 cores.
        self.compile_backend = "eager" if suite.args.dry_run else "inductor"
        self.dense = build_dense_unet(self.cfg, self.device, self.dtype)
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = self._build(name)
        return self._models[name]

    def _build(self, name: str):
        import mosaicdiff
        from mosaicdiff.families.unet.model import MosaicUNet
        from mosaicdiff.api import prune_stages

        if name == "diffusers_eager_dense":
            return self.dense
        if name == "diffusers_compile_dense":
            return torch.compile(self.dense, dynamic=False, backend=self.compile_backend)
        if name == "engine_dense":
            engine = mosaicdiff.prune(self.dense, None, 0.0, method="magnitude", scheduler=self.scheduler,
                                      progress=False)
            return engine.enable_cross_kv_cache(True)
        if name == "mosaic_0.3":
            stages = prune_stages(self.dense, None, TARGET_SPARSITY, method="mosaic", pruner="magnitude",
                                  scheduler=self.scheduler, num_inference_steps=NUM_STEPS, progress=False)
            mosaic = MosaicUNet.from_dense(self.dense, stages, share_producers=True,
                                           meta={"method": "timing-only magnitude", "target_sparsity": TARGET_SPARSITY})
            return mosaic.enable_cross_kv_cache(True)
        raise ValueError(f"unknown sdxl config {name!r}")

    def timestep(self, name: str, t: float) -> torch.Tensor:
        """A 0-D timestep: on the device for diffusers (the pipeline's form; no recompile per value
        under ``dynamic=False``), on the host for a `MosaicUNet` (its stage is read there, no sync)."""
        device = "cpu" if name in ("engine_dense", "mosaic_0.3") else self.device
        return torch.tensor(float(t), device=device)


def measure(models: SDXLModels, name: str, inputs: dict, rep_ms: int, weights: list[tuple[int, int]]) -> dict:
    """Per-stage and step-weighted ms per U-Net forward of one config (``weights``: the mosaic's
    (timestep, steps) per stage: every config runs at the same timesteps)."""
    model = models.model(name)
    cuda = models.device == "cuda"
    rec: dict = {"config": name, "per_stage_ms": {}, "first_call_s": {}}
    graphs_before, t_start = unique_graphs(), time.perf_counter()
    total = steps = 0.0
    with torch.no_grad():
        for t, n in weights:
            tt = models.timestep(name, t)
            run = lambda: model(timestep=tt, return_dict=False, **inputs)  # noqa: E731
            first = time.perf_counter()
            run()  # compile (inductor, Triton kernels) happens here
            if cuda:
                torch.cuda.synchronize()
            rec["first_call_s"][str(t)] = round(time.perf_counter() - first, 2)
            ms = time_ms(run, models.device, rep_ms)
            rec["per_stage_ms"][str(t)] = ms
            total, steps = total + n * ms, steps + n
    rec["ms_per_forward"] = total / steps
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    rec["dynamo_graphs_compiled"] = unique_graphs() - graphs_before
    rec["timestep_form"] = "host 0-D tensor" if name in ("engine_dense", "mosaic_0.3") else "device 0-D tensor"
    return rec


def ratios(records: list[dict]) -> dict:
    """Ratios of ms_per_forward within this run (slower / faster: > 1 means the second is faster)."""
    by = {r["config"]: r for r in records}
    out = {"ratios": {}, "targets": {}}
    for num, den in RATIO_PAIRS:
        if num in by and den in by:
            out["ratios"][f"{num}/{den}"] = by[num]["ms_per_forward"] / by[den]["ms_per_forward"]
    for name, (num, den, target) in TARGETS.items():
        if num in by and den in by:
            value = by[num]["ms_per_forward"] / by[den]["ms_per_forward"]
            out["targets"][name] = {"measure": "ms_per_forward", "ratio": value, "target": target,
                                    "met": value >= target}
    return out


def prune_time(models: SDXLModels, samples_per_stage: int, batch_size: int) -> dict:
    """Wall time of ``mosaicdiff.prune`` (mosaic, OBS) on random calibration latents and text states."""
    import mosaicdiff
    from mosaicdiff.method.calibrate import TextCalibration

    n = samples_per_stage
    data = unet_inputs(models.cfg, models.device, models.dtype, batch=n, seed=1)
    cal = TextCalibration(data["sample"], data["encoder_hidden_states"],
                          pooled_prompt_embeds=data["added_cond_kwargs"]["text_embeds"],
                          add_time_ids=data["added_cond_kwargs"]["time_ids"])
    if models.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    mosaic = mosaicdiff.prune(models.dense, cal, TARGET_SPARSITY, method="mosaic", scheduler=models.scheduler,
                              samples_per_stage=n, batch_size=batch_size, progress=False)
    if models.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"pruner": "obs", "samples_per_stage": n, "cfg_duplicated": True, "batch_size": batch_size,
            "seconds": round(seconds, 2), "stages": [list(r) for r in mosaic.stage_ranges]}


def stage_sdxl(suite: Suite, out: Path) -> bool:
    """The sdxl stage (see the module docstring); writes sdxl.json after every config."""
    threads = torch.get_num_threads()
    if suite.args.dry_run:  # tiny ops: an OpenMP team spinning on a busy shared core costs ~100x
        torch.set_num_threads(1)
    try:
        return _stage_sdxl(suite, out)
    finally:
        torch.set_num_threads(threads)


def _stage_sdxl(suite: Suite, out: Path) -> bool:
    args = suite.args
    models = SDXLModels(suite)
    inputs = unet_inputs(models.cfg, models.device, models.dtype)
    result = {"env": suite.env, "model": "tiny SDXL test config (dry run)" if args.dry_run else "SDXL base U-Net",
              "weights": "random (seed 0)", "dtype": str(models.dtype).replace("torch.", ""),
              "inputs": {"sample": list(inputs["sample"].shape),
                         "encoder_hidden_states": list(inputs["encoder_hidden_states"].shape),
                         **{k: list(v.shape) for k, v in inputs["added_cond_kwargs"].items()}},
              "scheduler": f"{type(models.scheduler).__name__} ({NUM_STEPS} steps)", "steps": NUM_STEPS,
              "target_sparsity": TARGET_SPARSITY, "mosaic_pruner": "magnitude (timing only: widths from divide + allocate)",
              "cross_kv_cache": "on for engine_dense and mosaic_0.3", "compile_backend": models.compile_backend, "records": [], "errors": []}
    try:
        mosaic = models.model("mosaic_0.3")  # its stages fix the timesteps every config is timed at
        weights = stage_step_weights(mosaic, models.scheduler)
        result["stages"] = [{"name": name, "t_start": t0, "t_end": t1, "sparsity": sp, "timestep": t, "steps": n}
                            for (name, t0, t1, sp), (t, n) in zip(mosaic.stage_ranges, weights)]
        result["memory"] = {"mosaic_0.3": mosaic.memory_report()}
        write_json(out / "sdxl.json", result)
        for name in PLAN:
            try:
                rec = measure(models, name, inputs, args.rep_ms, weights)
            except Exception as exc:  # noqa: BLE001 - one config failing must not lose the others
                if is_timeout(exc):
                    raise StageTimeout(str(exc)) from exc
                result["errors"].append({"config": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"  sdxl {name}: {type(exc).__name__}: {exc}")
                continue
            result["records"].append(rec)
            result.update(ratios(result["records"]))
            write_json(out / "sdxl.json", result)
            per_stage = ", ".join(f"t={t} {ms:.2f}" for t, ms in rec["per_stage_ms"].items())
            log(f"  sdxl {name:<24} {rec['ms_per_forward']:8.2f} ms/forward ({per_stage}), "
                f"{rec['dynamo_graphs_compiled']} dynamo graphs, {rec['wall_s']} s")
        if args.sdxl_prune_time or args.dry_run:
            samples = 2 if args.dry_run else args.sdxl_prune_samples
            result["prune_time"] = prune_time(models, samples, batch_size=16)
            log(f"  sdxl prune (OBS, {samples} samples per stage): {result['prune_time']['seconds']} s")
    finally:
        if "engine_dense" in models._models:
            result.setdefault("memory", {})["engine_dense"] = models.model("engine_dense").memory_report()
        if result["records"] or result["errors"]:
            write_json(out / "sdxl.json", result)
    return not result["errors"]
