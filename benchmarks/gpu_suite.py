"""GPU suite: the engine against diffusers eager and torch.compile, side by side in one run.

Measures, at DiT-XL/2 shapes (random weights, bf16; speed does not depend on weight values):

- ceilings: device-to-device copy (TB/s, bytes read + written) and an 8192^3 bf16 matmul;
- every kernel provider at DiT shapes (`bench_kernels.py`), checked against the reference first;
- per forward and per 50-step DDIM + CFG sampling run, at forward batch 16 and 64 (CFG: batch/2
  images, conditional + null halves), for the configs
  diffusers_eager_dense, diffusers_compile_dense, engine_dense, engine_mosaic_0.3,
  engine_mosaic_0.5 and compile_pruned_0.5 (torch.compile(mode="reduce-overhead") of a plain
  torch implementation of the same compact mosaic: the same block code with the reference ops).

The mosaic shapes come from the real divide + allocate path (stage boundaries from the linear
schedule, per-stage sparsity from the target mean, aligned widths); the kept weights are
magnitude-selected because the timing does not depend on which heads are kept, and OBS on
28 x 3 blocks would spend the lease on calibration.

Writes benchmarks/results/<date>-<card>.json ({config, batch, ms_per_forward, ms_per_sample_run,
gpu, commit} records plus kernel rows and ceilings) and a PNG bar chart next to it.

    python benchmarks/gpu_suite.py                 # the full suite, under 8 minutes on one H100
    python benchmarks/gpu_suite.py --dry-run       # tiny model on the CPU: checks the code path
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
DIT_TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
NUM_STEPS = 50


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> str:
    if os.environ.get("MOSAIC_COMMIT"):
        return os.environ["MOSAIC_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------ timing


def time_ms(fn, device: str, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in ms: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def ceilings(device: str) -> dict:
    if device != "cuda":
        return {}
    n = 1 << 28  # 256 Mi bf16 = 512 MiB per buffer, far above L2
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device)
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms_mm = time_ms(lambda: m @ m, device, iters=10)
    del a, b, m
    return {"copy_tbps": 2 * n * 2 / ms / 1e9, "matmul_tflops": 2 * 8192**3 / ms_mm / 1e9}


# ------------------------------------------------------------------------------------ models


def build_dense(cfg: dict, device: str, dtype: torch.dtype):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**cfg)
    # converted DiT-XL/2 checkpoints carry 28 identical embedders: mirror that
    emb0 = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    return model.to(device=device, dtype=dtype).eval()


def timing_mosaic(dense, target: float, num_steps: int = NUM_STEPS):
    """A mosaic with the real divide/allocate shapes, magnitude-selected weights (timing only)."""
    from mosaicdiff.mosaic import MosaicDiT
    from mosaicdiff.prune import prune_stages

    stages = prune_stages(dense, None, target, method="mosaic", pruner="magnitude",
                          num_inference_steps=num_steps, progress=False)
    return MosaicDiT(dense, stages, meta={"method": "timing-only magnitude", "target_sparsity": target})


@contextlib.contextmanager
def plain_torch_ops():
    """Swap the fused mosaic ops for their plain-torch references (what torch.compile sees through)."""
    from mosaic_kernels import ops
    from mosaic_kernels import reference as ref

    names = ["ln_modulate", "gated_residual", "gated_residual_ln_modulate", "linear_gelu", "linear_gated_residual"]
    saved = {n: getattr(ops, n) for n in names}
    try:
        for n in names:
            setattr(ops, n, getattr(ref, f"{n}_ref"))
        yield
    finally:
        for n, fn in saved.items():
            setattr(ops, n, fn)


def stage_step_weights(model, scheduler) -> list[tuple[int, int]]:
    """(representative timestep, number of sampler steps) per stage of a mosaic."""
    counts: dict[int, list[int]] = {}
    for t in scheduler.timesteps.tolist():
        counts.setdefault(model.stage_for(t), []).append(int(t))
    return [(ts[0], len(ts)) for _, ts in sorted(counts.items())]


def per_forward_ms(model, batch: int, cfg: dict, device: str, dtype, scheduler, iters: int) -> float:
    """Mean ms per forward over the sampler's steps (stages weighted by their step counts)."""
    x = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], device=device, dtype=dtype)
    y = torch.randint(0, cfg["num_embeds_ada_norm"], (batch,), device=device)
    if hasattr(model, "stage_for"):
        weights = stage_step_weights(model, scheduler)
    else:
        weights = [(500, 1)]
    total, steps = 0.0, 0
    with torch.no_grad():
        for t, n in weights:
            tt = torch.full((batch,), t, device=device, dtype=torch.long)
            total += n * time_ms(lambda: model(x, timestep=tt, class_labels=y).sample, device, iters=iters)
            steps += n
    return total / steps


def sample_run_ms(model, batch: int, cfg: dict, device: str, dtype, guidance: float = 4.0) -> float:
    from mosaicdiff.sampling import sample

    labels = torch.randint(0, cfg["num_embeds_ada_norm"], (batch // 2,), device=device)
    run = lambda: sample(model, labels, num_inference_steps=NUM_STEPS, guidance_scale=guidance,  # noqa: E731
                         progress=False, generator=torch.Generator(device).manual_seed(0))
    return time_ms(run, device, iters=2, warmup=1)


# ------------------------------------------------------------------------------------ main


def run_suite(args) -> dict:
    from diffusers import DDIMScheduler

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = DIT_TINY if args.dry_run else DIT_XL2
    iters = 3 if args.dry_run else 20
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    result = {"gpu": gpu, "date": _dt.date.today().isoformat(), "commit": git_commit(),
              "torch": torch.__version__, "records": [], "kernels": [], "compile_seconds": {}}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    from mosaic_kernels import backends

    result["backends"] = backends()
    log(f"{gpu}, torch {torch.__version__}, backends {json.dumps(result['backends'])}")
    result["ceilings"] = ceilings(device)
    log(f"ceilings {result['ceilings']}")

    if device == "cuda" and not args.skip_kernels:
        import bench_kernels

        for case in bench_kernels.dit_cases(tuple(args.batches)):
            result["kernels"].extend(bench_kernels.bench_op(case))
        log(f"{len(result['kernels'])} kernel rows")

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(NUM_STEPS)
    dense = build_dense(cfg, device, dtype)
    from mosaicdiff.mosaic import MosaicDiT

    models = {
        "diffusers_eager_dense": dense,
        "engine_dense": MosaicDiT.from_dense_unpruned(dense),
        "engine_mosaic_0.3": timing_mosaic(dense, 0.3),
        "engine_mosaic_0.5": timing_mosaic(dense, 0.5),
    }
    for name in ("engine_dense", "engine_mosaic_0.3", "engine_mosaic_0.5"):
        models[name].enable_cuda_graphs(device == "cuda")
    models["diffusers_compile_dense"] = torch.compile(dense)
    compile_pruned = timing_mosaic(dense, 0.5)
    compile_pruned.forward_stage = torch.compile(compile_pruned.forward_stage, mode="reduce-overhead")
    models["compile_pruned_0.5"] = compile_pruned

    for batch in args.batches:
        for name, model in models.items():
            plain = name == "compile_pruned_0.5"
            with plain_torch_ops() if plain else contextlib.nullcontext():
                t0 = time.perf_counter()
                fwd = per_forward_ms(model, batch, cfg, device, dtype, scheduler, iters)
                first = time.perf_counter() - t0
                run = sample_run_ms(model, batch, cfg, device, dtype) if not args.skip_sampling else None
            if "compile" in name:
                result["compile_seconds"][f"{name}@{batch}"] = round(first, 1)
            rec = {"config": name, "batch": batch, "ms_per_forward": fwd, "ms_per_sample_run": run,
                   "gpu": gpu, "commit": result["commit"]}
            result["records"].append(rec)
            log(f"{name:<24} batch {batch:>3}: {fwd:8.2f} ms/forward, "
                f"{run if run is None else round(run, 1)} ms/sample run")
    result["memory"] = {n: m.memory_report() for n, m in models.items() if hasattr(m, "memory_report")}
    return result


def summarize(result: dict) -> str:
    by = {(r["config"], r["batch"]): r for r in result["records"]}
    lines = [f"{'config':<24} {'batch':>5} {'ms/fwd':>9} {'ms/run':>9} {'fwd x vs compile':>17}"]
    for (name, batch), r in by.items():
        base = by.get(("diffusers_compile_dense", batch))
        speed = base["ms_per_forward"] / r["ms_per_forward"] if base else float("nan")
        run = r["ms_per_sample_run"]
        lines.append(f"{name:<24} {batch:>5} {r['ms_per_forward']:9.2f} "
                     f"{(run if run is not None else float('nan')):9.1f} {speed:17.2f}")
    return "\n".join(lines)


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["records"]})
    configs = list(dict.fromkeys(r["config"] for r in result["records"]))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        vals = [next(r["ms_per_forward"] for r in result["records"] if r["config"] == c and r["batch"] == batch)
                for c in configs]
        ax.bar(range(len(configs)), vals)
        ax.set_xticks(range(len(configs)), configs, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per forward")
        ax.set_title(f"{result['gpu']}, batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: check the code path only")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-sampling", action="store_true")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; use --dry-run to check the code path on the CPU")
    args.batches = args.batches or ([2] if args.dry_run else [16, 64])
    t0 = time.perf_counter()
    result = run_suite(args)
    result["suite_seconds"] = round(time.perf_counter() - t0, 1)
    card = "".join(c if c.isalnum() else "-" for c in result["gpu"]).strip("-")
    stem = f"{result['date']}-{card}" + ("-dryrun" if args.dry_run else "")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(args.out / f"{stem}.json")
    bar_chart(result, args.out / f"{stem}.png")
    print(summarize(result))
    print(f"suite: {result['suite_seconds']} s -> {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
