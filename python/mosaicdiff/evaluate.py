"""`mosaicdiff eval`: digits-FID against mean sparsity for each pruning method and guidance scale.

For every method and sparsity the embedded model is pruned once; the pruned model is then sampled
at every guidance scale from the same noise (the same noise as the dense reference of that scale).
Writes ``eval.json`` (rewritten atomically after every point, so an interrupted sweep keeps what
finished) and ``fid_vs_sparsity.png`` (one panel per guidance scale, one line per method, the dense
model as a horizontal line).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from mosaicdiff.demo import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SAMPLES_PER_STAGE,
    DEFAULT_STEPS,
    METHODS,
    boundaries_for,
    digits_calibration,
    evaluate_images,
    real_reference_fid,
    sample_labels,
    stage_info,
    timed_sample,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_SPARSITIES = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_GUIDANCES = (1.5, 3.0)


def run_eval(
    out_dir: str | os.PathLike = "mosaicdiff_eval",
    *,
    sparsities=DEFAULT_SPARSITIES,
    guidance_scales=DEFAULT_GUIDANCES,
    methods=METHODS,
    seed: int = 0,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    steps: int = DEFAULT_STEPS,
    samples_per_stage: int = DEFAULT_SAMPLES_PER_STAGE,
    boundaries: tuple[int, int] | None = None,
    M: float = 0.55,
    lam: float = 0.0,
    progress: bool = True,
    model=None,
) -> dict:
    """Run the sweep; returns the result dict (also written to ``out_dir/eval.json``).

    The result has ``settings``, ``boundaries``, ``real_reference_fid``, ``dense`` (guidance ->
    metrics) and ``points``: one entry per (method, sparsity, guidance) with ``fid``,
    ``class_accuracy``, ``psnr_to_dense``, ``seconds_per_sample`` and the per-stage sparsities.

    Raises:
        ValueError: on empty or out-of-range sweeps or unknown methods.
    """
    from mosaicdiff.pruning import prune
    from mosaicdiff.sampling import default_scheduler, make_noise
    from mosaicdiff.zoo import load_digits_dit

    sparsities = [float(s) for s in sparsities]
    guidance_scales = [float(g) for g in guidance_scales]
    if not sparsities or any(not 0 <= s < 1 for s in sparsities):
        raise ValueError(f"eval: sparsities must be a non-empty list in [0, 1), got {sparsities}")
    if not guidance_scales:
        raise ValueError("eval: need at least one guidance scale")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"eval: unknown methods {unknown}; expected a subset of {list(METHODS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dense = model if model is not None else load_digits_dit()
    calib = digits_calibration(int(dense.config.num_embeds_ada_norm))
    sched = default_scheduler()
    sched.set_timesteps(steps)
    if boundaries is None:
        bounds, _ = boundaries_for(calib, sched, M, lam)
    else:
        bounds = (int(boundaries[0]), int(boundaries[1]))
    labels = sample_labels(num_samples, int(dense.config.num_embeds_ada_norm))
    noise = make_noise(dense, num_samples, seed=seed)
    result: dict[str, Any] = {
        "complete": False,
        "settings": {"sparsities": sparsities, "guidance_scales": guidance_scales, "methods": list(methods),
                     "seed": seed, "num_samples": num_samples, "steps": steps,
                     "samples_per_stage": samples_per_stage, "M": M, "lam": lam},
        "boundaries": list(bounds),
        "real_reference_fid": real_reference_fid(num_samples, seed),
        "dense": {},
        "points": [],
    }

    def save():
        result["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        write_json_atomic(out / "eval.json", result)
        plot_fid_vs_sparsity(result, out / "fid_vs_sparsity.png")

    dense_images = {}
    for g in guidance_scales:
        images, sps = timed_sample(dense, labels, noise, steps=steps, guidance_scale=g, progress=progress)
        dense_images[g] = images
        result["dense"][str(g)] = {**evaluate_images(images, labels, None), "seconds_per_sample": sps}
    save()
    for method in methods:
        for s in sparsities:
            t0 = time.perf_counter()
            pruned = prune(dense, calib, s, method=method, boundaries=bounds, num_inference_steps=steps,
                           scheduler=default_scheduler(), samples_per_stage=samples_per_stage, M=M, lam=lam,
                           seed=seed, progress=progress)
            prune_s = time.perf_counter() - t0
            for g in guidance_scales:
                images, sps = timed_sample(pruned, labels, noise, steps=steps, guidance_scale=g,
                                           progress=progress)
                result["points"].append({
                    "method": method, "sparsity": s, "guidance_scale": g,
                    **evaluate_images(images, labels, dense_images[g]),
                    "seconds_per_sample": sps, "prune_seconds": prune_s, "stages": stage_info(pruned),
                })
                logger.info("eval %s s=%.2f g=%.2f: fid %.2f", method, s, g, result["points"][-1]["fid"])
                save()
            del pruned
    result["complete"] = True
    save()
    return result


def plot_fid_vs_sparsity(result: dict, path: str | os.PathLike) -> str:
    """One panel per guidance scale: FID against mean sparsity per method, dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = result["settings"]["guidance_scales"]
    fig, axes = plt.subplots(1, len(gs), figsize=(4.5 * len(gs), 3.6), squeeze=False)
    for ax, g in zip(axes[0], gs):
        for method in result["settings"]["methods"]:
            pts = sorted((p["sparsity"], p["fid"]) for p in result["points"]
                         if p["method"] == method and p["guidance_scale"] == g)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        d = result["dense"].get(str(g))
        if d is not None:
            ax.axhline(d["fid"], color="k", ls="--", lw=1, label="dense")
        ax.axhline(result["real_reference_fid"], color="gray", ls=":", lw=1, label="real (same N)")
        ax.set_title(f"guidance {g:g}")
        ax.set_xlabel("mean sparsity")
        ax.set_ylabel("digits-FID")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"FID vs sparsity ({result['settings']['num_samples']} samples, "
                 f"DDIM {result['settings']['steps']}, stages {tuple(result['boundaries'])})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `mosaicdiff eval` options (values are checked by the `mosaicdiff.cli` argument types)."""
    from mosaicdiff.cli import (
        boundary_pair,
        choice_list,
        comma_list,
        finite_float,
        int_at_least,
        integer,
        positive_int,
        sparsity,
    )

    p.add_argument("--sparsities", type=comma_list(sparsity, what="sparsities in [0, 1)"),
                   default=list(DEFAULT_SPARSITIES), help="comma-separated mean sparsities (default "
                   + ",".join(str(s) for s in DEFAULT_SPARSITIES) + ")")
    p.add_argument("--guidance-scales", type=comma_list(finite_float, what="numbers"), default=list(DEFAULT_GUIDANCES),
                   help="comma-separated guidance scales (default " + ",".join(str(g) for g in DEFAULT_GUIDANCES) + ")")
    p.add_argument("--methods", type=choice_list(METHODS), default=list(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--out", type=Path, default=Path("mosaicdiff_eval"), help="output folder")
    p.add_argument("--num-samples", type=int_at_least(2), default=DEFAULT_NUM_SAMPLES,
                   help="images per point, >= 2 (FID needs a covariance)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS)
    p.add_argument("--samples-per-stage", type=positive_int, default=DEFAULT_SAMPLES_PER_STAGE)
    p.add_argument("--boundaries", type=boundary_pair, default=None, help="explicit middle-stage boundaries t_low,t_high")
    p.add_argument("--model", default=None,
                   help="a diffusers DiT folder shaped like the digits model (default: the embedded one)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads, >= 1 (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")


def main_from_args(args: argparse.Namespace) -> int:
    from mosaicdiff.demo import threads_and_model

    model = threads_and_model(args)
    result = run_eval(
        args.out, sparsities=args.sparsities, guidance_scales=args.guidance_scales, methods=tuple(args.methods),
        seed=args.seed, num_samples=args.num_samples, steps=args.steps, samples_per_stage=args.samples_per_stage,
        boundaries=args.boundaries, progress=not args.no_progress, model=model,
    )
    print(format_eval_table(result))
    print(f"wrote {Path(args.out) / 'eval.json'} and {Path(args.out) / 'fid_vs_sparsity.png'}")
    return 0


def format_eval_table(result: dict) -> str:
    """FID table: rows (method, sparsity), one column per guidance scale."""
    gs = result["settings"]["guidance_scales"]
    header = ["method", "sparsity"] + [f"FID g={g:g}" for g in gs]
    rows = [header, ["dense", "0"] + [f"{result['dense'][str(g)]['fid']:.2f}" for g in gs]]
    for method in result["settings"]["methods"]:
        for s in result["settings"]["sparsities"]:
            vals = []
            for g in gs:
                p = [q for q in result["points"] if q["method"] == method and q["sparsity"] == s
                     and q["guidance_scale"] == g]
                vals.append(f"{p[0]['fid']:.2f}" if p else "-")
            rows.append([method, f"{s:g}"] + vals)
    w = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(x) for c, x in zip(r, w)) for r in rows)


__all__ = ["run_eval", "plot_fid_vs_sparsity", "format_eval_table", "DEFAULT_SPARSITIES", "DEFAULT_GUIDANCES"]

