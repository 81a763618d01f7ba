"""One function per `mosaicdiff` subcommand: check what can be checked first, then do the work.

Everything that can fail without the long work (flag combinations, the input model and
calibration files, the output location) is checked before it starts, so that a mistake costs
seconds, not a pruning run. Each ``cmd_*`` takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mosaicdiff.app.errors import EXIT_FAILURE, UsageError
from mosaicdiff.app.inputs import load_calibration, load_digits_shaped_model, load_model, sample_labels
from mosaicdiff.app.outputs import check_model_folder, check_output_folder, check_output_image


# ----------------------------------------------------------------------------- demo, eval

def _experiment_model(args):
    """Apply ``--threads`` and load ``--model`` (None: the embedded model, loaded by the run)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return None if args.model is None else load_digits_shaped_model(args.model)


def _experiment_kwargs(args) -> dict:
    """The options `run_demo` and `run_eval` share."""
    return dict(seed=args.seed, num_samples=args.num_samples, steps=args.steps,
                samples_per_stage=args.samples_per_stage, methods=tuple(args.methods), boundaries=args.boundaries,
                speed_threshold=args.speed_threshold, log_snr_weight=args.log_snr_weight,
                progress=not args.no_progress)


def cmd_demo(args) -> int:
    from mosaicdiff import demo

    check_output_folder(args.out)
    t0 = time.perf_counter()
    model = _experiment_model(args)
    report = demo.run_demo(args.out, sparsity=args.sparsity, guidance_scale=args.guidance_scale, model=model,
                           **_experiment_kwargs(args))
    print(demo.format_table(report))
    print(f"wrote {Path(args.out) / 'report.json'} and PNGs in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from mosaicdiff import evaluate

    check_output_folder(args.out)
    model = _experiment_model(args)
    result = evaluate.run_eval(args.out, sparsities=args.sparsities, guidance_scales=args.guidance_scales,
                               model=model, **_experiment_kwargs(args))
    print(evaluate.format_eval_table(result))
    print(f"wrote {Path(args.out) / 'eval.json'} and {Path(args.out) / 'fid_vs_sparsity.png'}")
    return 0


# ----------------------------------------------------------------------------- prune

def check_prune_flags(args) -> None:
    """Flag combinations of `prune`, in CLI terms, before any work.

    Raises:
        UsageError: a flag that the method ignores, the wrong number of --stage-sparsities, or a
            --sparsity the per-stage cap cannot reach.
    """
    from mosaicdiff.pruning import default_s_max

    prog = "mosaicdiff prune"
    mosaic = args.method == "mosaic"
    if not mosaic and args.boundaries is not None:
        raise UsageError(f"--boundaries sets the stages of --method mosaic; --method {args.method} has one "
                         f"stage for all timesteps: drop --boundaries", prog)
    if args.stage_sparsities is not None:
        want = 3 if mosaic else 1
        if len(args.stage_sparsities) != want:
            names = "early,middle,late" if mosaic else "one value"
            raise UsageError(f"--stage-sparsities: --method {args.method} takes {want} ({names}), got "
                             f"{len(args.stage_sparsities)}", prog)
    if args.max_stage_sparsity is not None and (not mosaic or args.stage_sparsities is not None):
        raise UsageError("--max-stage-sparsity caps the automatic allocation of --method mosaic; it has no "
                         "effect with " + ("--stage-sparsities" if mosaic else f"--method {args.method}"), prog)
    if mosaic and args.stage_sparsities is None:
        cap = default_s_max(args.sparsity) if args.max_stage_sparsity is None else args.max_stage_sparsity
        if args.sparsity > cap:
            origin = ("the default cap min(0.9, --sparsity + 0.1)" if args.max_stage_sparsity is None
                      else "--max-stage-sparsity")
            raise UsageError(f"--sparsity {args.sparsity:g} is above the largest sparsity a stage may get, "
                             f"{cap:g} ({origin}); lower --sparsity or pass --max-stage-sparsity between "
                             f"{args.sparsity:g} and 1 (exclusive)", prog)


def _largest_stage_sparsity(args) -> tuple[float, str]:
    """The largest sparsity `prune` may give a stage, and the flag to change it."""
    from mosaicdiff.pruning import default_s_max

    if args.stage_sparsities is not None:
        return max(args.stage_sparsities), "keep every --stage-sparsities value"
    if args.method != "mosaic":
        return args.sparsity, "use --sparsity"
    if args.max_stage_sparsity is not None:
        return args.max_stage_sparsity, "use --max-stage-sparsity"
    return default_s_max(args.sparsity), "pass --max-stage-sparsity (default min(0.9, --sparsity + 0.1))"


def check_heads_kept(model, args) -> None:
    """Every stage keeps at least one attention head (checked on the loaded model, before pruning)."""
    from mosaicdiff.compact import heads_to_remove

    heads = int(model.config.num_attention_heads)
    largest, advice = _largest_stage_sparsity(args)
    try:
        heads_to_remove(heads, largest)
    except ValueError:
        raise UsageError(f"a stage sparsity of {largest:g} would remove all {heads} attention heads of this "
                         f"model; {advice} below {(heads - 0.5) / heads:.4f}", "mosaicdiff prune") from None


def check_boundaries(bounds, num_train_timesteps: int) -> None:
    if bounds is not None and not bounds[1] < num_train_timesteps:
        raise UsageError(f"--boundaries {bounds[0]},{bounds[1]}: t_high must be below the {num_train_timesteps} "
                         f"training timesteps (0 < t_low < t_high < {num_train_timesteps})", "mosaicdiff prune")


def cmd_prune(args) -> int:
    from mosaicdiff import pruning
    from mosaicdiff.sampling import default_scheduler

    check_prune_flags(args)
    scheduler = default_scheduler()
    check_boundaries(args.boundaries, len(scheduler.alphas_cumprod))
    out = check_model_folder(args.out)
    model = load_model(args.model, args.device, allow_mosaic=False)
    check_heads_kept(model, args)
    needs_data = args.method in ("mosaic", "uniform") or args.calibration is not None
    calib = load_calibration(args.calibration, model) if needs_data else None
    mosaic = pruning.prune(
        model, calib, args.sparsity, method=args.method, boundaries=args.boundaries,
        stage_sparsities=args.stage_sparsities, num_inference_steps=args.steps, scheduler=scheduler,
        samples_per_stage=args.samples_per_stage, speed_threshold=args.speed_threshold,
        log_snr_weight=args.log_snr_weight, align=args.align, seed=args.seed, progress=not args.no_progress,
        s_max=args.max_stage_sparsity, share_producers=not args.independent_stages)
    mosaic.save_pretrained(str(out))
    rep = mosaic.memory_report()
    stages = ", ".join(f"{name}[{t0},{t1}) sparsity {sp:.2f}" for name, t0, t1, sp in mosaic.stage_ranges)
    print(f"saved {args.method} mosaic to {args.out}: {stages}")
    print(f"memory: {rep['mosaic_bytes'] / 2**20:.2f} MiB vs dense {rep['dense_bytes_same_dtype'] / 2**20:.2f} MiB "
          f"(ratio {rep['ratio']:.2f}; {rep['ratio_dedup']:.2f} against one embedder instead of one per block)")
    return 0


# ----------------------------------------------------------------------------- sample, bench

def sample_labels_for(args, num_classes: int):
    """The class ids to sample: --labels (each in [0, num_classes)) or --num-samples cycling 0..9."""
    import torch

    if args.labels is None:
        return sample_labels(args.num_samples, num_classes)
    bad = [v for v in args.labels if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}",
                         "mosaicdiff sample")
    return torch.tensor(args.labels)


def cmd_sample(args) -> int:
    from mosaicdiff import sampling
    from mosaicdiff.plots import save_image_grid

    check_output_image(args.out)
    model = load_model(args.model, args.device)
    if int(model.config.in_channels) != 1:
        raise ValueError(f"`mosaicdiff sample` writes pixel grids for 1-channel models; this model has "
                         f"in_channels={model.config.in_channels} (latents need a VAE: use diffusers' DiTPipeline)")
    labels = sample_labels_for(args, int(model.config.num_embeds_ada_norm))
    noise = sampling.make_noise(model, len(labels), seed=args.seed)
    images = sampling.sample(model, labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                             noise=noise, progress=not args.no_progress)
    save_image_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {len(images)} samples to {args.out}")
    return 0


#: The GPU benchmark suite `mosaicdiff bench` runs (in a source checkout).
GPU_SUITE = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_suite.py"


def cmd_bench(args) -> int:
    import runpy

    import torch

    script = GPU_SUITE
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script not found at {script}: `mosaicdiff bench` runs from a source "
                                f"checkout (`python benchmarks/gpu_suite.py`)")
    runs_on_cpu = {"--dry-run", "-h", "--help"} & set(args.extra)
    if not runs_on_cpu and not torch.cuda.is_available():
        print("mosaicdiff bench needs a CUDA GPU (none found); `mosaicdiff bench --out DIR --dry-run` rehearses "
              f"it on the CPU. On a GPU machine: `mosaicdiff bench --out DIR` ({script}).")
        return EXIT_FAILURE
    argv = sys.argv
    sys.argv = [str(script), *args.extra]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # the suite's own argparse or its exit status
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILURE)
    finally:
        sys.argv = argv
    return 0
