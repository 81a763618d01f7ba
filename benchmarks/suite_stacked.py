"""The GPU suite's stacked stage: pruning on top of what users already stack (issue 23, item 5).

DiT-XL/2 (random bf16 weights at the real config, 256 px), forward batch ``--batches[0]`` (16: 8
images with CFG, as the e2e stage), DDIM 50, guidance 4, one card, one run. Configs (`PLAN`):

- ``diffusers_compile_dense``: ``torch.compile(dense, dynamic=False)`` (the e2e stage's baseline);
- ``diffusers_compile_fp8_fbc``: the same stack without pruning -- diffusers' DiT with the
  ``nn.Linear`` of its attention and MLP (the GEMMs ``mosaicdiff.quantize`` stores in FP8 on a
  mosaic: qkv, proj, fc1, fc2) in float8_e4m3fn with per-output-channel scales and per-token
  activation scales through ``torch._scaled_mm`` (fp8_linear.py: no torchao on the GPU machine),
  its blocks compiled regionally (`compile_blocks`: diffusers' ``compile_repeated_blocks`` needs a
  ``_repeated_blocks`` declaration DiTTransformer2DModel lacks, and it compiles ``Module.__call__``,
  which would trace the cache's host-side decision into the graph), and diffusers' own first-block
  cache (``apply_first_block_cache``: it hooks DiT's ``transformer_blocks`` of registered
  ``BasicTransformerBlock`` directly; the model has no ``CacheMixin``, so its cache context is set
  through ``CacheMixin.cache_context``'s own code). The cache's hooks run eagerly around the
  compiled blocks, as on the mosaic;
- ``mosaic_0.5_fp8_fbc``: the timing mosaic at mean sparsity 0.5 (three stages, magnitude-selected:
  speed depends on the widths only), ``mosaicdiff.quantize(mosaic, "fp8")`` (weight-only: bf16
  activations, weights converted in the kernel) and ``enable_cache(FirstBlockCacheConfig(0.1))``
  (the threshold of the cache quality table in docs/results.md). It runs on the engine's kernels
  without CUDA graphs (the cache decides on the host which blocks run; ``enable_cache`` refuses
  graphs) and unfused at block boundaries (the hooks wrap each block's ``forward``);
- ``engine_dense_fp8_fbc`` and ``mosaic_0.5_fp8_per_token_fbc``: the engine's dense model with the
  same FP8 + cache (what pruning alone adds on the engine), and the mosaic with per-token FP8
  activations -- timed last, if the guard leaves time.

Per config: each mosaic stage's timestep once with every block running (no cache yet) -- its first
pass (compile, Triton JIT) timed apart from the steady state (``compile_s`` per stage) -- then, with
the cache on, one counted DDIM-50 + CFG run (block evaluations per image: a block the cache skips
is not counted) and timed runs (``ms_per_image``: the fastest run / images). Random weights make the
cache skip other steps than a trained DiT-XL/2 would, so read the speed against the counted block
evaluations. The dry run uses the tiny DiT on the CPU: FP8 there runs the torch fallbacks
(dequantized matmuls), never FP8 speed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from dit_models import NUM_STEPS
from fp8_linear import fp8_supported, swap_fp8_linears
import suite_common
from suite_common import free_memory, log, stage_step_weights, time_ms, unique_graphs, write_json
from suite_context import Suite
from suite_forward import single_thread_on_cpu

GUIDANCE = 4.0  # the e2e stage's
TARGET_SPARSITY = 0.5
THRESHOLD = 0.1  # first-block cache: docs/results.md's cache quality table
CACHE_NAME = "stacked"
#: The dense blocks' GEMMs put in FP8: what ``mosaicdiff.quantize`` converts on a mosaic.
FP8_LAYERS = ("attn1.", "ff.")
PLAN = ("diffusers_compile_dense", "diffusers_compile_fp8_fbc", "mosaic_0.5_fp8_fbc", "engine_dense_fp8_fbc",
        "mosaic_0.5_fp8_per_token_fbc")
CACHED = PLAN[1:]
#: name -> (slower config, faster config, target ratio of ms_per_image).
TARGETS = {"stacked_vs_compile_dense": ("diffusers_compile_dense", "mosaic_0.5_fp8_fbc", 4.0),
           "stacked_vs_same_stack_unpruned": ("diffusers_compile_fp8_fbc", "mosaic_0.5_fp8_fbc", 1.5)}
RATIO_PAIRS = (("diffusers_compile_dense", "mosaic_0.5_fp8_fbc"), ("diffusers_compile_fp8_fbc", "mosaic_0.5_fp8_fbc"),
               ("diffusers_compile_dense", "diffusers_compile_fp8_fbc"), ("engine_dense_fp8_fbc", "mosaic_0.5_fp8_fbc"),
               ("diffusers_compile_dense", "engine_dense_fp8_fbc"),
               ("mosaic_0.5_fp8_fbc", "mosaic_0.5_fp8_per_token_fbc"))


def compile_blocks(blocks, backend: str) -> None:
    """Regional compilation: every block's own forward through one compiled function (the blocks
    are alike, so dynamo traces one graph and reuses it at any depth); hooks stay outside."""
    forward = type(blocks[0]).forward

    def run_block(block, hidden_states, *args, **kwargs):
        return forward(block, hidden_states, *args, **kwargs)

    compiled = torch.compile(run_block, dynamic=False, backend=backend)

    def call(block, hidden_states, *args, **kwargs):
        # the first block's input is the patch embedding's transposed view: a stride guard would
        # compile it a second graph
        return compiled(block, hidden_states.contiguous(), *args, **kwargs)

    for block in blocks:
        block.forward = functools.partial(call, block)


class RowCounter:
    """Batch rows through the blocks' forward, installed under the cache hooks (a block the
    cache skips never reaches it): what `count_block_evaluations` counts on a mosaic."""

    def __init__(self, blocks):
        self.rows = 0
        for block in blocks:
            block.forward = self._counted(block.forward)

    def _counted(self, forward):
        def counted(*args, **kwargs):
            self.rows += int((args[0] if args else kwargs["hidden_states"]).shape[0])
            return forward(*args, **kwargs)

        return counted


def dense_block_weights(dense) -> int:
    """Weights (and biases) of one dense block's GEMMs: the unit `count_block_evaluations` weighs
    a compact block's rows by (qkv, proj, fc1, fc2)."""
    block = dense.transformer_blocks[0]
    return sum(p.numel() for n, p in block.named_parameters() if n.startswith(FP8_LAYERS))


@contextlib.contextmanager
def cache_context(model) -> Iterator[None]:
    """The cache context of one sampling run, reset after it (as diffusers' pipelines do)."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    try:
        with CacheMixin.cache_context(model, CACHE_NAME):  # diffusers' code: any module with cache hooks
            yield
    finally:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()


class StackedBench:
    """The stage's configs, built on first use; cache hooks enabled by `enable_cache`."""

    def __init__(self, suite: Suite):
        from diffusers import DDIMScheduler

        self.suite = suite
        self.compile_backend = "eager" if suite.args.dry_run else "inductor"  # as suite_forward.py
        self.batch = suite.batches[0]
        self.images = self.batch // 2  # CFG doubles every forward
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.scheduler.set_timesteps(NUM_STEPS)
        self.counters: dict[str, RowCounter] = {}
        self.block_weights = dense_block_weights(suite.dense())

    def build(self, name: str):
        """A fresh config (the caller drops it once timed: `free_memory`)."""
        import mosaicdiff
        from mosaicdiff.families.dit.model import MosaicDiT

        suite = self.suite
        if name == "diffusers_compile_dense":
            return torch.compile(suite.dense(), dynamic=False, backend=self.compile_backend)
        if name == "diffusers_compile_fp8_fbc":
            model = copy.deepcopy(suite.dense())
            swap_fp8_linears(model, FP8_LAYERS)
            compile_blocks(model.transformer_blocks, self.compile_backend)
            self.counters[name] = RowCounter(model.transformer_blocks)
            return model
        if name == "engine_dense_fp8_fbc":
            engine = MosaicDiT.from_dense_unpruned(suite.dense()).enable_cuda_graphs(False)  # a cache needs them off
            return mosaicdiff.quantize(engine, "fp8")
        if name.startswith("mosaic_0.5_fp8"):
            mosaic = copy.deepcopy(suite.mosaic(TARGET_SPARSITY)).enable_cuda_graphs(False)
            activations = "per_token" if "per_token" in name else "weight_only"
            return mosaicdiff.quantize(mosaic, "fp8", activations=activations)
        raise ValueError(f"unknown stacked config {name!r}")

    def enable_cache(self, name: str, model) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        if name == "diffusers_compile_fp8_fbc":
            apply_first_block_cache(model, FirstBlockCacheConfig(threshold=THRESHOLD))
        elif name in CACHED:
            model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))

    @contextlib.contextmanager
    def counting(self, name: str, model) -> Iterator[dict]:
        """Block evaluations of one sampling run: rows per image, and rows weighted by each block's
        GEMM weights in dense-block units (a compact block of a 0.5 mosaic weighs about half)."""
        from mosaicdiff.core.block_cache import count_block_evaluations

        found: dict = {}
        if name in self.counters:
            counter = self.counters[name]
            counter.rows = 0
            yield found
            rows, weights, source = counter.rows, counter.rows * self.block_weights, "counted (under the cache hooks)"
        elif name in CACHED:
            with count_block_evaluations(model) as counts:
                yield found
            rows, weights, source = counts.total_rows, counts.total_weights, "count_block_evaluations"
        else:
            yield found
            rows = 2 * NUM_STEPS * len(self.suite.dense().transformer_blocks) * self.images
            weights, source = rows * self.block_weights, "every block at every step (no cache)"
        found.update(block_evaluations_per_image=rows / self.images,
                     dense_block_equivalents_per_image=weights / self.block_weights / self.images,
                     block_evaluations_source=source)

    def sampling_run(self, name: str, model, labels) -> None:
        from mosaicdiff.core.sampling import sample

        ctx = cache_context(model) if name in CACHED else contextlib.nullcontext()
        with ctx:
            sample(model, labels, num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE, scheduler=self.scheduler,
                   progress=False, generator=torch.Generator().manual_seed(0))


def measure(bench: StackedBench, name: str, weights: list[tuple[int, int]], runs: int) -> dict:
    """One config: per stage first pass and steady forward (every block running), then per image
    with the cache on (counted run, then ``runs`` timed runs)."""
    from mosaic_kernels import ops

    suite = bench.suite
    t_start, graphs_before = time.perf_counter(), unique_graphs()
    model = bench.build(name)
    rec: dict = {"config": name, "batch": bench.batch, "images_per_run": bench.images, "first_pass_s": {},
                 "per_stage_ms": {}, "compile_s": {}, "build_s": round(time.perf_counter() - t_start, 1)}
    x, y = suite.inputs(bench.batch)
    with torch.no_grad():
        total = steps = 0.0
        for t, n in weights:
            tt = suite.timestep(model, t, bench.batch)
            run = lambda: model(x, timestep=tt, class_labels=y)  # noqa: E731
            first = time.perf_counter()
            with ops.record_dispatch() as calls:  # compile / Triton JIT of this stage happen here
                run()
            if suite.cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - first
            ms = time_ms(run, suite.device, suite.args.rep_ms)
            rec["first_pass_s"][str(t)] = round(first_s, 3)
            rec["compile_s"][str(t)] = round(max(first_s - ms / 1e3, 0.0), 3)  # first pass less a steady one
            rec["per_stage_ms"][str(t)] = ms
            rec.setdefault("dispatch", {}).update({f"{op}:{backend}": k for (op, backend), k in sorted(calls.items())})
            total, steps = total + n * ms, steps + n
        rec["ms_per_forward"] = total / steps  # every block running: the cost of a computed step
        rec["dynamo_graphs_first_passes"] = unique_graphs() - graphs_before
        bench.enable_cache(name, model)
        labels = y[: bench.images].cpu()
        first = time.perf_counter()
        with bench.counting(name, model) as counts:  # also the warm-up (the cached path's JIT)
            bench.sampling_run(name, model, labels)
        rec["warmup_run_s"] = round(time.perf_counter() - first, 2)
        rec.update(counts)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            bench.sampling_run(name, model, labels)
            if suite.cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    rec["ms_per_sample_run"] = min(times)
    rec["ms_per_image"] = min(times) / bench.images
    rec["dynamo_graphs_compiled"] = unique_graphs() - graphs_before
    rec["recompiles_after_first_passes"] = rec["dynamo_graphs_compiled"] - rec["dynamo_graphs_first_passes"]
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    if hasattr(model, "memory_report"):
        rec["memory"] = model.memory_report()
    return rec


def record_failure(result: dict, name: str, exc: Exception) -> None:
    """Note a failed config in ``result`` and go on; a guard timeout (however wrapped) ends the stage."""
    suite_common.record_failure(result, name, exc, "stacked")


def ratios(records: list[dict]) -> dict:
    """ms_per_image ratios within this run (slower / faster: > 1 means the second is faster)."""
    ms = {r["config"]: r["ms_per_image"] for r in records}
    pairs = {f"{a}/{b}": ms[a] / ms[b] for a, b in RATIO_PAIRS if a in ms and b in ms}
    targets = {name: {"measure": "ms_per_image", "ratio": ms[a] / ms[b], "target": goal, "met": ms[a] / ms[b] >= goal}
               for name, (a, b, goal) in TARGETS.items() if a in ms and b in ms}
    return {"ratios": pairs, "targets": targets}


def fp8_paths(suite: Suite) -> dict:
    """Which FP8 code runs on this device, for the results header and the log."""
    if fp8_supported(suite.device):
        return {"diffusers": "torch._scaled_mm, row-wise scales (FP8 tensor cores)",
                "mosaic": "mosaic_kernels.fp8_gemm (Triton FP8 GEMM)", "fp8_speed": True}
    if not suite.cuda:
        return {"diffusers": "torch fallback: dequantized fp32 matmul (CPU dry run)",
                "mosaic": "torch fallback of mosaic_kernels.fp8_gemm (CPU dry run)", "fp8_speed": False}
    cc = torch.cuda.get_device_capability()
    return {"diffusers": f"torch fallback: dequantized fp32 matmul (compute capability {cc} < 8.9)",
            "mosaic": f"mosaic_kernels.fp8_gemm refuses compute capability {cc} < 8.9: the FP8 mosaic configs fail",
            "fp8_speed": False}


def stage_stacked(suite: Suite, out: Path) -> bool:
    """The stacked stage (see the module docstring); writes stacked.json after every config."""
    with single_thread_on_cpu(suite.args.dry_run):
        return _run(suite, out)


def _run(suite: Suite, out: Path) -> bool:
    path = out / "stacked.json"
    bench = StackedBench(suite)
    mosaic = suite.mosaic(TARGET_SPARSITY)
    weights = stage_step_weights(mosaic, bench.scheduler)
    paths = fp8_paths(suite)
    if not paths["fp8_speed"]:
        log(f"  stacked: no FP8 tensor cores here -- diffusers: {paths['diffusers']}; mosaic: {paths['mosaic']}; "
            f"no FP8 speed, the code paths only")
    result = {"env": suite.env, "model": "tiny DiT (dry run)" if suite.args.dry_run else "DiT-XL/2, 256 px",
              "weights": "random (seed 0)", "dtype": str(suite.dtype).replace("torch.", ""), "batch": bench.batch,
              "images_per_run": bench.images, "steps": NUM_STEPS, "guidance": GUIDANCE, "cache_threshold": THRESHOLD,
              "compile_backend": bench.compile_backend, "fp8": paths, "fp8_layers_diffusers": list(FP8_LAYERS),
              "dense_block_gemm_weights": bench.block_weights,
              "stages": [{"name": n, "t_start": t0, "t_end": t1, "sparsity": sp, "timestep": t, "steps": k}
                         for (n, t0, t1, sp), (t, k) in zip(mosaic.stage_ranges, weights)],
              "records": [], "errors": []}
    runs = 1 if suite.args.dry_run else 2
    try:
        for name in PLAN:
            try:
                rec = measure(bench, name, weights, runs)
            except Exception as exc:  # noqa: BLE001 - one config failing must not lose the others
                record_failure(result, name, exc)
                continue
            finally:
                free_memory(suite.cuda)  # the config measured (or failed) is no longer referenced
            result["records"].append(rec)
            result.update(ratios(result["records"]))
            write_json(path, result)
            compile_s = ", ".join(f"t={t} {s:.1f}" for t, s in rec["compile_s"].items())
            log(f"  stacked {name:<30} {rec['ms_per_image']:8.2f} ms/image, {rec['ms_per_forward']:7.2f} ms/forward "
                f"(all blocks), {rec['block_evaluations_per_image']:.0f} block evals/image, compile s per stage "
                f"({compile_s}), {rec['dynamo_graphs_compiled']} dynamo graphs, {rec['wall_s']} s")
    finally:
        if result["records"] or result["errors"]:
            write_json(path, result)
    return not result["errors"]
