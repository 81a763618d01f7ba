"""The GPU suite's kstages stage: what K stages cost the runtime (issue 24, item 4).

DiT-XL/2 (random bf16 weights at the real config, 256 px), forward batch ``--batches[0]`` (16: 8
images with CFG, as the e2e stage), DDIM 50, guidance 4, one card, one run. Per mean sparsity
(`TARGETS`), two mosaics with the same step-weighted mean sparsity:

- ``mosaic_3_<s>``: the three-stage default (``method="mosaic"``: the divide/allocate shapes of the
  e2e stage's timing mosaic, `dit_models.timing_mosaic`);
- ``stepwise_10_<s>``: ``method="stepwise"`` at its default ``num_stages=10`` (ten windows of five
  DDIM steps). Its allocation probes the model on calibration data, which random weights make
  meaningless, so the ten sparsities are the stepwise allocation of a fixed sensitivity curve (the
  last window ten times as sensitive as the first, geometric in between; default exchange rate
  and cap: `dit_models.stepwise_timing_sparsities`), passed as ``stage_sparsities``.

Both are magnitude-selected with nested kept sets and shared producers, as `mosaicdiff.prune`
nests them: speed depends on the widths only, and the question here is the runtime cost of K
stages, not quality. Per mosaic: build seconds; its stage shape groups at the forward batch
(``distinct_stage_shapes``: how many config sets it selects; stages of a group share them) and
its distinct attention shapes; ``autotune_s``, `autotune_kernels` (the SDPA kernel per attention
shape, its default ops) into a fresh config cache, so that neither mosaic finds the other's
winners -- the mosaic then runs on them; a DDIM-50 + CFG run with CUDA graphs off and one with
them on (the first run captures one graph per stage: ``first_run_s``), each timed after a warm-up
run (``ms_per_image``: the fastest run / images); the graphs' device memory per stage
(``memory_report()["graph_bytes"]``: what each capture added to the shared pool) and the peak
reserved memory of the graphs-on runs. Ratios: ten stages over three, per sparsity, graphs on and
off (> 1: the ten stages are slower). The dry run uses the tiny DiT on the CPU (no graphs, no
tuning: the code paths only).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from dit_models import NUM_STEPS, stepwise_timing_stages, timing_mosaic
from suite_common import free_memory, log, record_failure, write_json
from suite_context import Suite
from suite_forward import single_thread_on_cpu

GUIDANCE = 4.0  # the e2e stage's
TARGETS = (0.3, 0.5)
NUM_STAGES = 10  # method="stepwise"'s default (mosaicdiff.method.step_allocation.DEFAULT_NUM_STAGES)
#: (config prefix, stages): the three-stage default first, then the K-stage stepwise mosaic.
METHODS = (("mosaic_3", 3), (f"stepwise_{NUM_STAGES}", NUM_STAGES))


def plan(targets=TARGETS) -> list[tuple[str, int, float]]:
    """(config, stages, target) in order: per target, three stages then ten."""
    return [(f"{prefix}_{target}", k, target) for target in targets for prefix, k in METHODS]


@contextlib.contextmanager
def fresh_config_cache() -> Iterator[Path]:
    """`mosaic_kernels.configs` reading and writing an empty cache file (restored after)."""
    from mosaic_kernels import configs

    saved = os.environ.get(configs.CACHE_ENV)
    with tempfile.TemporaryDirectory(prefix="kstages-configs-") as tmp:
        path = Path(tmp) / "configs.json"
        os.environ[configs.CACHE_ENV] = str(path)
        configs.clear_memo()
        try:
            yield path
        finally:
            if saved is None:
                os.environ.pop(configs.CACHE_ENV, None)
            else:
                os.environ[configs.CACHE_ENV] = saved
            configs.clear_memo()


def build(suite: Suite, stages: int, target: float):
    """The timing mosaic of `stages` stages at mean sparsity `target` (graphs off)."""
    dense = suite.dense()
    if stages == 3:
        return timing_mosaic(dense, target)
    specs = stepwise_timing_stages(dense, target, stages)
    return timing_mosaic(dense, target, stages=specs)


def stage_table(model, scheduler) -> list[dict]:
    """Name, range, sparsity, sampler steps and (block 0's) widths per stage."""
    steps: dict[int, int] = {}
    for t in scheduler.timesteps.tolist():
        stage = model.stage_for(t)
        steps[stage] = steps.get(stage, 0) + 1
    return [{"name": name, "t_start": t0, "t_end": t1, "sparsity": sp, "steps": steps.get(i, 0),
             "heads": int(model.stage_blocks[i][0].num_heads), "mlp_width": int(model.stage_blocks[i][0].mlp_width)}
            for i, (name, t0, t1, sp) in enumerate(model.stage_ranges)]


class Runs:
    """DDIM-50 + CFG sampling runs of one mosaic at the stage's batch."""

    def __init__(self, suite: Suite, scheduler):
        self.suite, self.scheduler = suite, scheduler
        self.batch = suite.batches[0]
        self.images = self.batch // 2  # CFG doubles every forward
        self.labels = suite.inputs(self.batch)[1][: self.images].cpu()
        self.timed = 1 if suite.args.dry_run else 2

    def run_s(self, model) -> float:
        from mosaicdiff.core.sampling import sample

        t0 = time.perf_counter()
        sample(model, self.labels, num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE, scheduler=self.scheduler,
               progress=False, generator=torch.Generator().manual_seed(0))
        if self.suite.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def measure(self, model) -> dict:
        """A warm-up run (graph captures, Triton JIT), then the timed runs."""
        with torch.no_grad():
            first = self.run_s(model)
            ms = min(self.run_s(model) for _ in range(self.timed)) * 1e3
        return {"first_run_s": round(first, 3), "ms_per_sample_run": ms, "ms_per_image": ms / self.images}


def measure(suite: Suite, runs: Runs, name: str, stages: int, target: float) -> dict:
    """One mosaic: build, shape groups, autotune, graphs off and on, graph memory."""
    t_start = time.perf_counter()
    model = build(suite, stages, target)
    rec: dict = {"config": name, "num_stages": stages, "target_sparsity": target,
                 "build_s": round(time.perf_counter() - t_start, 2)}
    rec["stages"] = stage_table(model, runs.scheduler)
    names = model.stage_names
    groups = model.stage_shape_groups(runs.batch, suite.tokens, suite.dtype)
    rec["stage_shape_groups"] = [[names[i] for i in g] for g in groups]
    rec["distinct_stage_shapes"] = len(groups)
    shapes = {it for s in range(model.num_stages) for it in model.stage_kernel_shapes(s, runs.batch, suite.tokens,
                                                                                       suite.dtype)}
    rec["distinct_attention_shapes"] = sum(1 for op, *_ in shapes if op == "attention")
    with fresh_config_cache():
        t0 = time.perf_counter()
        tuned = model.autotune_kernels(runs.batch, suite.tokens, suite.dtype)
        rec["autotune_s"] = round(time.perf_counter() - t0, 3)
        rec["tuned_configs"] = tuned
        rec["graphs_off"] = runs.measure(model.enable_cuda_graphs(False))
        if suite.cuda:
            torch.cuda.reset_peak_memory_stats()
        rec["graphs_on"] = runs.measure(model.enable_cuda_graphs(suite.cuda))
    runner = model._graphs
    rec["graphs_on"]["graphs_captured"] = runner.num_graphs if runner is not None else 0
    rec["graphs_on"]["graphs_failed"] = {str(k): v for k, v in runner.failed.items()} if runner is not None else {}
    rec["graphs_on"]["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if suite.cuda else 0
    report = model.memory_report()
    rec["graph_bytes"] = report["graph_bytes"]
    rec["graph_bytes_total"] = sum(report["graph_bytes"].values())
    rec["memory"] = {k: report[k] for k in ("mosaic_bytes", "producer_bytes", "ratio")}
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    return rec


def ratios(records: list[dict]) -> dict:
    """ms per image of the ten-stage mosaic over the three-stage one, per target, graphs on and off."""
    by = {(r["num_stages"], r["target_sparsity"]): r for r in records}
    out = {}
    for (k, target), rec in sorted(by.items()):
        base = by.get((3, target))
        if k == 3 or base is None:
            continue
        for mode in ("graphs_on", "graphs_off"):
            out[f"{rec['config']}/{base['config']}:{mode}"] = rec[mode]["ms_per_image"] / base[mode]["ms_per_image"]
    return out


def summary(rec: dict) -> str:
    """One log line of a measured mosaic."""
    on, off = rec["graphs_on"], rec["graphs_off"]
    return (f"{rec['config']:<16} {on['ms_per_image']:8.2f} ms/image graphs on, {off['ms_per_image']:8.2f} off; "
            f"{rec['distinct_stage_shapes']} distinct stage shapes ({rec['distinct_attention_shapes']} attention), "
            f"autotune {rec['autotune_s']:.1f} s, {on['graphs_captured']} graphs, "
            f"{rec['graph_bytes_total'] / 2**20:.0f} MiB graph memory, {rec['wall_s']} s")


def stage_kstages(suite: Suite, out: Path) -> bool:
    """The kstages stage (see the module docstring); writes kstages.json after every mosaic."""
    with single_thread_on_cpu(suite.args.dry_run):
        return _run(suite, out)


def _run(suite: Suite, out: Path) -> bool:
    from diffusers import DDIMScheduler

    path = out / "kstages.json"
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(NUM_STEPS)
    runs = Runs(suite, scheduler)
    result = {"env": suite.env, "model": "tiny DiT (dry run)" if suite.args.dry_run else "DiT-XL/2, 256 px",
              "weights": "random (seed 0)", "dtype": str(suite.dtype).replace("torch.", ""), "batch": runs.batch,
              "images_per_run": runs.images, "steps": NUM_STEPS, "guidance": GUIDANCE, "cuda_graphs": suite.cuda,
              "records": [], "ratios": {}, "errors": []}
    for name, stages, target in plan():
        try:
            rec = measure(suite, runs, name, stages, target)
        except Exception as exc:  # noqa: BLE001 - one mosaic failing must not lose the others
            record_failure(result, name, exc, "kstages")  # a guard timeout ends the stage here
        else:
            result["records"].append(rec)
            result["ratios"] = ratios(result["records"])
            log(f"  kstages {summary(rec)}")
        finally:
            free_memory(suite.cuda)  # the mosaic measured (or failed) is no longer referenced
            write_json(path, result)  # after every mosaic: a timeout keeps what was measured
    return not result["errors"]
