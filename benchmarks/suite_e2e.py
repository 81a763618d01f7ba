"""The GPU suite's e2e stage: every config per forward and per DDIM-50 + CFG sampling run, the
ratios between them and the issue's targets, and the bar chart (see gpu_suite.py)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from dit_models import NUM_STEPS, plain_torch_ops
from suite_common import StageTimeout, is_timeout, log, stage_step_weights, time_ms, unique_graphs, write_json
from suite_context import Suite

GUIDANCE = 4.0
#: The issue's targets: name -> (slower config, faster config, index into --batches (0: batch 16,
#: 1: batch 64), measure, target ratio).
TARGETS = {
    "PF1_engine_dense_vs_compile_dense": ("diffusers_compile_dense", "engine_dense", 0, "ms_per_forward", 1.3),
    "PF1_engine_dense_vs_compile_dense_large_batch": ("diffusers_compile_dense", "engine_dense", 1,
                                                      "ms_per_forward", 1.15),
    "PF2_mosaic_0.5_run_vs_compile_dense": ("diffusers_compile_dense", "engine_mosaic_0.5", 0,
                                            "ms_per_sample_run", 2.3),
    "PF7_engine_vs_compile_pruned_0.5": ("compile_pruned_0.5", "engine_mosaic_0.5", 0, "ms_per_forward", 1.2),
}


def measure(suite: Suite, name: str, batch: int, scheduler) -> dict:
    """Per forward (stage-weighted) and per DDIM-50 + CFG run of one config at one batch."""
    from mosaicdiff.core.sampling import sample

    model = suite.model(name)
    x, y = suite.inputs(batch)
    plain = plain_torch_ops() if name.startswith("compile_pruned") else contextlib.nullcontext()
    graphs_before, t_start = unique_graphs(), time.perf_counter()
    rec: dict = {"config": name, "batch": batch, "per_stage_ms": {}}
    with plain, torch.no_grad():
        total = steps = 0.0
        for t, n in stage_step_weights(model, scheduler):
            tt = suite.timestep(model, t, batch)
            first = time.perf_counter()
            model(x, timestep=tt, class_labels=y)  # compile / capture happens here
            if suite.cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - first
            rec.setdefault("first_call_s", {})[str(t)] = round(first_s, 2)
            ms = time_ms(lambda: model(x, timestep=tt, class_labels=y), suite.device, suite.args.rep_ms)
            # compile (or capture) time of this stage: its first pass less a steady-state forward
            rec.setdefault("compile_s", {})[str(t)] = round(max(first_s - ms / 1e3, 0.0), 3)
            rec["per_stage_ms"][str(t)] = ms
            total += n * ms
            steps += n
        rec["ms_per_forward"] = total / steps
        labels = y[: batch // 2].cpu()
        run = lambda: sample(model, labels, num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE,  # noqa: E731
                             progress=False, generator=torch.Generator().manual_seed(0))
        run()  # warm-up (a new timestep form would recompile here: counted below)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        rec["ms_per_sample_run"] = min(times)
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    rec["dynamo_graphs_compiled"] = unique_graphs() - graphs_before
    runner = getattr(model, "_graphs", None)
    if runner is not None:
        rec["cuda_graphs_captured"] = runner.num_graphs
        rec["cuda_graphs_failed"] = {str(k): v for k, v in runner.failed.items()}
    return rec


def ratios(records: list[dict], batches: list[int]) -> dict:
    """Speed ratios within this run (slower / faster: > 1 means the second config is faster)."""
    by = {(r["config"], r["batch"]): r for r in records}
    out = {"ratios": {}, "targets": {}}
    for batch in sorted({r["batch"] for r in records}):
        for num, den in (("diffusers_eager_dense", "engine_dense"), ("diffusers_compile_dense", "engine_dense"),
                         ("engine_dense", "engine_mosaic_0.5"), ("engine_dense", "engine_mosaic_0.3"),
                         ("diffusers_compile_dense", "engine_mosaic_0.5"), ("compile_pruned_0.5", "engine_mosaic_0.5"),
                         ("diffusers_compile_dense", "compile_pruned_0.5"), ("engine_dense_unfused", "engine_dense"),
                         ("engine_mosaic_0.5_copies", "engine_mosaic_0.5")):
            a, b = by.get((num, batch)), by.get((den, batch))
            if a and b:
                for kind in ("ms_per_forward", "ms_per_sample_run"):
                    out["ratios"][f"{num}/{den}@{batch}:{kind}"] = a[kind] / b[kind]
    for name, (num, den, index, kind, target) in TARGETS.items():
        batch = batches[index] if index < len(batches) else None
        a, b = by.get((num, batch)), by.get((den, batch))
        if a and b:
            value = a[kind] / b[kind]
            out["targets"][name] = {"batch": batch, "measure": kind, "ratio": value, "target": target,
                                    "met": value >= target}
    return out


def e2e_plan(suite: Suite) -> list[tuple[str, int]]:
    """(config, batch) in order of importance: everything at the first batch, then the rest."""
    first, *rest = suite.batches
    plan = [(name, first) for name in ("diffusers_eager_dense", "engine_dense", "engine_mosaic_0.5",
                                       "engine_mosaic_0.3", "diffusers_compile_dense", "compile_pruned_0.5",
                                       "engine_dense_unfused", "engine_mosaic_0.5_copies")]
    for batch in rest:
        plan += [(name, batch) for name in ("diffusers_eager_dense", "engine_dense", "engine_mosaic_0.5",
                                            "engine_mosaic_0.3", "diffusers_compile_dense")]
    plan += [("compile_pruned_0.5", batch) for batch in rest]  # 3 more compiles: only if time remains
    return plan


def stage_e2e(suite: Suite, out: Path) -> bool:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(NUM_STEPS)
    result = {"env": suite.env, "steps": NUM_STEPS, "guidance": GUIDANCE, "records": [], "errors": []}
    try:
        for name, batch in e2e_plan(suite):
            try:
                rec = measure(suite, name, batch, scheduler)
            except Exception as exc:  # noqa: BLE001 - one config failing must not lose the others
                if is_timeout(exc):
                    raise StageTimeout(str(exc)) from exc
                result["errors"].append({"config": name, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"  {name} @ {batch}: {type(exc).__name__}: {exc}")
                continue
            result["records"].append(rec)
            result.update(ratios(result["records"], suite.batches))
            write_json(out / "e2e.json", result)
            log(f"  {name:<24} batch {batch:>3}: {rec['ms_per_forward']:8.2f} ms/forward, "
                f"{rec['ms_per_sample_run']:9.1f} ms/run, {rec['dynamo_graphs_compiled']} dynamo graphs, "
                f"{rec['wall_s']} s")
    finally:
        if result["records"]:
            result["memory"] = {n: m.memory_report() for n, m in suite._models.items() if hasattr(m, "memory_report")}
            write_json(out / "e2e.json", result)
            bar_chart(result, out / "e2e.png")
    return not result["errors"]


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["records"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        recs = [r for r in result["records"] if r["batch"] == batch]
        ax.bar(range(len(recs)), [r["ms_per_forward"] for r in recs])
        ax.set_xticks(range(len(recs)), [r["config"] for r in recs], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per forward")
        ax.set_title(f"{result['env']['device']}, batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
