"""`mosaicdiff demo`: MosaicDiff end to end on the embedded digits DiT, on a CPU, in minutes.

Steps: load the embedded model; divide the trajectory (closed-form score, boundaries from the
noise schedule); sample the dense model once with its trajectory (for the measured curve and as
the fixed-noise reference); prune with MosaicDiff (three stage subnetworks, the middle stage pruned
least) and with two baselines at the same mean sparsity (``uniform``: one OBS-pruned network for
all timesteps, calibrated on t uniform over [0, T); ``magnitude``: one network, least-norm heads and
channels dropped, no compensation); sample every model from the same noise; measure digits-FID
against the 1797 real digits, class accuracy of the requested digits, PSNR to the dense images
and seconds per sample.

Outputs in ``--out`` (default ``./mosaicdiff_demo``): ``report.json`` (rewritten atomically after
every method, so an interrupted run keeps what finished), ``grid_<method>.png`` (same noise and
labels in every grid; column = digit class) and ``stages.png``.

Defaults: DDIM 50 steps, guidance 1.5, 200 samples, 128 calibration samples per stage, mean
sparsity 0.5 (see `DEFAULT_GUIDANCE` and `DEFAULT_NUM_SAMPLES` for the measurements behind them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

METHODS = ("mosaic", "uniform", "magnitude")
#: Guidance scale of the demo. Sweep on the dense embedded model (DDIM 50, 200 samples, seed 1,
#: digits-FID / class accuracy; the FID of 200 real digits is 53):
#:   g:                      1.0         1.5         2.0         3.0         4.0
#:   shipped EMA weights:    372 / 0.30  331 / 0.39  314 / 0.45  337 / 0.56  386 / 0.61
#:   raw weights, step 2000: 152 / 0.74  109 / 0.90  174 / 0.97  395 / 0.99  551 / 0.99
#: Accuracy keeps rising with g while FID (diversity) is best at 1.5-2; 1.5 is the FID optimum of
#: the better weights and within 6% of it for the EMA ones.
DEFAULT_GUIDANCE = 1.5
#: 200 samples: FID of 200 random real digits against all 1797 is 53 (100: 89), so differences
#: between methods of a few tens are resolvable; the whole demo takes about 3 minutes on 2 cores.
DEFAULT_NUM_SAMPLES = 200
DEFAULT_SAMPLES_PER_STAGE = 128
DEFAULT_STEPS = 50


# ----------------------------------------------------------------------------- small helpers

def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(obj), f, indent=2, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _json_safe(v.tolist())
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10, scale: int = 2,
                    pad: int = 2) -> str:
    """Save `(N, 1, H, W)` images in [-1, 1] as a PNG grid (row-major, `nrow` per row, gray padding)."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"save_image_grid: expected (N, 1, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    ncol = min(nrow, max(n, 1))
    nrows = max(1, math.ceil(n / ncol))
    hs, ws = h * scale, w * scale
    grid = torch.full((nrows * (hs + pad) + pad, ncol * (ws + pad) + pad), 0.5)
    img = ((images[:, 0].float().clamp(-1, 1) + 1) / 2).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (hs + pad): pad + r * (hs + pad) + hs, pad + c * (ws + pad): pad + c * (ws + pad) + ws] = img[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy(), mode="L").save(path)
    return str(path)


def digits_calibration(null_class: int = 10, split: str = "train"):
    """A `Calibration` from the real digits (`zoo.data`; `split` "train" = the DiT's training split, or "all")."""
    from mosaicdiff.calibrate import Calibration
    from mosaicdiff.zoo.data import load_digits_tensors, train_test_split

    images, labels = load_digits_tensors()
    if split == "train":
        idx, _ = train_test_split(len(images))
        images, labels = images[idx], labels[idx]
    elif split != "all":
        raise ValueError(f"digits_calibration: split must be 'train' or 'all', got {split!r}")
    return Calibration(x0=images, labels=labels, null_class=null_class)


def sample_labels(num_samples: int, num_classes: int = 10) -> torch.Tensor:
    """Balanced labels 0, 1, ..., 9, 0, 1, ... (a grid with 10 columns shows one digit per column)."""
    return torch.arange(num_samples) % num_classes


def evaluate_images(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """FID to the real digits, class accuracy and (when `reference` is given) mean PSNR to it."""
    from mosaicdiff import quality

    out = {"fid": quality.fid_to_real(images), "class_accuracy": quality.class_accuracy(images, labels)}
    if reference is not None:
        p = quality.psnr(images, reference)
        out["psnr_to_dense"] = float(p.clamp(max=100.0).mean())  # identical images count as 100 dB
    return out


def timed_sample(model, labels, noise, *, steps, guidance_scale, progress, batch_size=None,
                 return_trajectory=False):
    """`sampling.sample` plus its wall time per image."""
    from mosaicdiff.sampling import sample

    warmup(model, int(labels[0]))
    t0 = time.perf_counter()
    result = sample(model, labels, num_inference_steps=steps, guidance_scale=guidance_scale, noise=noise,
                    progress=progress, batch_size=batch_size, return_trajectory=return_trajectory)
    return result, (time.perf_counter() - t0) / len(labels)


@torch.no_grad()
def warmup(model, label: int = 0) -> None:
    """A few tiny forwards spread over t = 999..0 (so every stage of a mosaic runs once).

    Keeps one-time costs (lazy imports, backend probing, kernel-config selection) out of the
    timed sampling run.
    """
    p = next(model.parameters())
    c, s = int(model.config.in_channels), int(model.config.sample_size)
    x = torch.zeros(2, c, s, s, device=p.device, dtype=p.dtype)
    y = torch.tensor([label, int(model.config.num_embeds_ada_norm)], device=p.device)
    for t in torch.linspace(999, 0, 11).round().long():
        model(x, timestep=t.expand(2).to(p.device), class_labels=y)


def real_reference_fid(num_samples: int, seed: int) -> float:
    """FID of `num_samples` random real digits against all 1797: the small-sample floor at this N."""
    from mosaicdiff import quality
    from mosaicdiff.zoo.data import load_digits_tensors

    images, _ = load_digits_tensors()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return quality.fid_to_real(images[idx])


def stage_info(mosaic) -> dict:
    """Stage names, ranges and sparsities of a `MosaicDiT`."""
    return {s.name: {"t_start": int(s.t_start), "t_end": int(s.t_end), "sparsity": float(s.sparsity)}
            for s in mosaic.stages}


def boundaries_for(calibration, scheduler, M: float, lam: float) -> tuple[tuple[int, int], float]:
    """Closed-form stage boundaries for the scheduler's schedule, with r = ||x0||^2/d from the calibration data."""
    from mosaicdiff import schedule

    r = calibration.x0_sq_norm
    return tuple(int(b) for b in schedule.stage_boundaries(scheduler.alphas_cumprod, M=M, lam=lam, x0_sq_norm=r)), r


# ----------------------------------------------------------------------------- the demo

def run_demo(
    out_dir: str | os.PathLike = "mosaicdiff_demo",
    *,
    sparsity: float = 0.5,
    seed: int = 0,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    guidance_scale: float = DEFAULT_GUIDANCE,
    steps: int = DEFAULT_STEPS,
    samples_per_stage: int = DEFAULT_SAMPLES_PER_STAGE,
    methods: tuple[str, ...] = METHODS,
    boundaries: tuple[int, int] | None = None,
    M: float = 0.55,
    lam: float = 0.0,
    progress: bool = True,
    model=None,
) -> dict:
    """Run the demo and return the report (also written to ``out_dir/report.json``).

    Args:
        out_dir: output directory (created).
        sparsity: target mean sparsity of every pruned model (averaged over sampling steps).
        seed: seeds the initial noise (shared by all methods) and the calibration draws.
        num_samples: images per method (labels 0..9 cycling).
        guidance_scale: CFG scale for every method.
        steps: DDIM steps.
        samples_per_stage: calibration samples per stage (each duplicated with the null class).
        methods: pruning methods to compare with the dense model.
        boundaries: explicit `(t_low, t_high)` of the middle stage; default from the closed-form score.
        M, lam: threshold and log-SNR weight of the closed-form stage split.
        progress: show tqdm bars.
        model: the dense model (default: the embedded digits DiT).

    Returns:
        The report dict (see the module docstring and README for the keys).

    Raises:
        ValueError: on invalid arguments.
    """
    from mosaicdiff import plots, schedule
    from mosaicdiff.pruning import prune
    from mosaicdiff.sampling import default_scheduler, make_noise
    from mosaicdiff.zoo import load_digits_dit

    if not 0 <= sparsity < 1:
        raise ValueError(f"demo: sparsity must be in [0, 1), got {sparsity}")
    if num_samples < 2:
        raise ValueError(f"demo: num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"demo: unknown methods {unknown}; expected a subset of {list(METHODS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "complete": False,
        "settings": {"sparsity": sparsity, "seed": seed, "num_samples": num_samples,
                     "guidance_scale": guidance_scale, "steps": steps, "samples_per_stage": samples_per_stage,
                     "methods": list(methods), "M": M, "lam": lam,
                     "sampler": "DDIM eta=0 (linear betas, no x0 clipping)"},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "methods": {},
    }
    report_path = out / "report.json"

    def save():
        report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        write_json_atomic(report_path, report)

    try:
        dense = model if model is not None else load_digits_dit()
        null_class = int(dense.config.num_embeds_ada_norm)
        calib = digits_calibration(null_class)
        sched = default_scheduler()
        sched.set_timesteps(steps)
        if boundaries is None:
            bounds, r = boundaries_for(calib, sched, M, lam)
        else:
            bounds, r = (int(boundaries[0]), int(boundaries[1])), calib.x0_sq_norm
        stages = schedule.stages_from_boundaries(*bounds, T=len(sched.alphas_cumprod))
        report["boundaries"] = list(bounds)
        report["x0_sq_norm"] = r
        report["steps_per_stage"] = schedule.steps_per_stage(sched.timesteps, stages)
        labels = sample_labels(num_samples, null_class)
        noise = make_noise(dense, num_samples, seed=seed)
        report["real_reference_fid"] = real_reference_fid(num_samples, seed)

        # 1. Dense reference, with its trajectory for the measured curve.
        logger.info("sampling the dense model (%d images, %d steps)", num_samples, steps)
        (dense_images, traj), sps = timed_sample(dense, labels, noise, steps=steps, guidance_scale=guidance_scale,
                                                 progress=progress, return_trajectory=True)
        report["methods"]["dense"] = {**evaluate_images(dense_images, labels, None),
                                      "psnr_to_dense": None,  # the reference itself (PSNR would be inf)
                                      "seconds_per_sample": sps, "sparsity": 0.0}
        save_image_grid(dense_images, out / "grid_dense.png")
        mse, _ = schedule.empirical_curve(traj.xs, dense_images, traj.timesteps)
        report["empirical_curve"] = {"timesteps": traj.timesteps.tolist(), "mse": mse.tolist()}
        plots.plot_stage_curves(out / "stages.png", sched.alphas_cumprod, bounds,
                                empirical=(traj.timesteps.tolist(), mse.tolist()), x0_sq_norm=r,
                                title=f"digits DiT, DDIM {steps} steps: stages {bounds}")
        save()

        # 2. Pruned models, same noise.
        for method in methods:
            logger.info("pruning: %s at mean sparsity %.2f", method, sparsity)
            t0 = time.perf_counter()
            pruned = prune(dense, calib, sparsity, method=method, boundaries=bounds,
                           num_inference_steps=steps, scheduler=default_scheduler(),
                           samples_per_stage=samples_per_stage, M=M, lam=lam, seed=seed, progress=progress)
            prune_s = time.perf_counter() - t0
            images, sps = timed_sample(pruned, labels, noise, steps=steps, guidance_scale=guidance_scale,
                                       progress=progress)
            meta = getattr(pruned, "meta", {}) or {}
            entry = {**evaluate_images(images, labels, dense_images), "seconds_per_sample": sps,
                     "prune_seconds": prune_s, "stages": stage_info(pruned),
                     "mean_sparsity": _step_mean_sparsity(pruned, sched.timesteps),
                     "realized_mean_sparsity": meta.get("realized_mean_sparsity"),
                     "stage_widths": meta.get("stage_widths")}
            entry["memory"] = pruned.memory_report()
            report["methods"][method] = entry
            save_image_grid(images, out / f"grid_{method}.png")
            save()
            del pruned
        report["complete"] = True
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        save()
        raise
    save()
    return report


def _step_mean_sparsity(mosaic, timesteps) -> float:
    """Sparsity averaged over the sampler's steps (each step uses its stage's sparsity)."""
    sp = [mosaic.stages[mosaic.stage_for(int(t))].sparsity for t in timesteps]
    return float(sum(sp) / len(sp))


def format_table(report: dict) -> str:
    """A plain-text table of the per-method results of a demo report."""
    rows = [("method", "FID", "class acc", "PSNR->dense", "s/sample", "sparsity")]
    for name, m in report.get("methods", {}).items():
        psnr = m.get("psnr_to_dense")
        psnr_s = "-" if psnr is None else f"{psnr:.2f}"
        sp = m.get("mean_sparsity", m.get("sparsity", 0.0))
        if "stages" in m:
            sp_s = f"{sp:.2f} (" + "/".join(f"{s['sparsity']:.2f}" for s in m["stages"].values()) + ")"
        else:
            sp_s = f"{sp:.2f}"
        rows.append((name, f"{m['fid']:.2f}", f"{m['class_accuracy']:.3f}", psnr_s,
                     f"{m['seconds_per_sample']:.3f}", sp_s))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "real_reference_fid" in report:
        lines.append(f"(FID of {report['settings']['num_samples']} real digits vs all 1797: "
                     f"{report['real_reference_fid']:.2f}; stage boundaries {report.get('boundaries')})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI glue

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `mosaicdiff demo` options (values are checked by the `mosaicdiff.cli` argument types)."""
    from mosaicdiff.cli import boundary_pair, choice_list, finite_float, int_at_least, integer, positive_int, sparsity

    p.add_argument("--sparsity", type=sparsity, default=0.5, help="target mean sparsity, in [0, 1) (default 0.5)")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--out", type=Path, default=Path("mosaicdiff_demo"), help="output folder")
    p.add_argument("--num-samples", type=int_at_least(2), default=DEFAULT_NUM_SAMPLES,
                   help="images per method, >= 2 (FID needs a covariance)")
    p.add_argument("--guidance-scale", type=finite_float, default=DEFAULT_GUIDANCE)
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="DDIM steps")
    p.add_argument("--samples-per-stage", type=positive_int, default=DEFAULT_SAMPLES_PER_STAGE,
                   help="calibration samples per stage")
    p.add_argument("--methods", type=choice_list(METHODS), default=list(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--boundaries", type=boundary_pair, default=None,
                   help="explicit middle-stage boundaries t_low,t_high")
    p.add_argument("--model", default=None,
                   help="a diffusers DiT folder shaped like the digits model (default: the embedded one)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads, >= 1 (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def threads_and_model(args: argparse.Namespace):
    """Apply ``--threads`` and load ``--model`` (None: the embedded model, loaded later).

    Raises:
        ValueError: a model that is not shaped like the digits DiT (1 channel, 16 x 16, 10 classes).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        return None
    from mosaicdiff.cli import load_model

    model = load_model(args.model, allow_mosaic=False)
    cfg = model.config
    shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.num_embeds_ada_norm))
    if shape != (1, 16, 10):
        raise ValueError(f"--model {args.model}: (in_channels, sample_size, classes) = {shape}, but the demo and "
                         f"eval measure digits (1, 16, 10); use `mosaicdiff prune` for other models")
    return model


def main_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments, print the table; returns the exit code."""
    t0 = time.perf_counter()
    model = threads_and_model(args)
    report = run_demo(
        args.out, sparsity=args.sparsity, seed=args.seed, num_samples=args.num_samples,
        guidance_scale=args.guidance_scale, steps=args.steps, samples_per_stage=args.samples_per_stage,
        methods=tuple(args.methods), boundaries=args.boundaries, progress=not args.no_progress, model=model,
    )
    print(format_table(report))
    print(f"wrote {Path(args.out) / 'report.json'} and PNGs in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0
