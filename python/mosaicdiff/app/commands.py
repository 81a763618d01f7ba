"""One function per `mosaicdiff` subcommand: check what can be checked first, then do the work.

Everything that can fail without the long work (flag combinations, the input model and
calibration files, the output location) is checked before it starts, so that a mistake costs
seconds, not a pruning run. Each ``cmd_*`` takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mosaicdiff.app.errors import EXIT_FAILURE, UsageError, one_line
from mosaicdiff.app.inputs import load_calibration, load_digits_shaped_model, load_model, sample_labels
from mosaicdiff.app.outputs import check_model_folder, check_output_folder, check_output_image

# ----------------------------------------------------------------------------- demo, eval

def _experiment_model(args) -> dict:
    """Apply ``--threads``; ``--model`` as run_demo/run_eval arguments: an embedded model's name
    (the run loads it) or a DiT folder (loaded and checked here)."""
    import torch

    from mosaicdiff.app.subjects import SUBJECTS, DigitsDiT

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None or args.model in SUBJECTS:
        return {"model": None, "model_name": args.model or DigitsDiT.name}
    return {"model": load_digits_shaped_model(args.model), "model_name": DigitsDiT.name}


def _experiment_kwargs(args) -> dict:
    """The options `run_demo` and `run_eval` share."""
    return dict(seed=args.seed, num_samples=args.num_samples, steps=args.steps,
                samples_per_stage=args.samples_per_stage, methods=tuple(args.methods), boundaries=args.boundaries,
                speed_threshold=args.speed_threshold, log_snr_weight=args.log_snr_weight,
                progress=not args.no_progress, num_seeds=args.num_seeds, **_experiment_model(args))


def check_heads_kept_everywhere(args, sparsities: list[float], flag: str, model) -> None:
    """Every method of a demo/eval run keeps an attention head per block at every sparsity.

    Checked on the dense model before any work: the run samples the dense model first, so a
    refusal at pruning time would cost minutes and leave a partial report. The mosaic's largest
    stage sparsity is its cap min(0.9, sparsity + 0.1), as `check_heads_kept` counts for `prune`.

    Raises:
        UsageError: naming the flag, the method and the largest sparsity that works.
    """
    from mosaicdiff.app.subjects import subject_named
    from mosaicdiff.families import adapter_for
    from mosaicdiff.method.compact import heads_to_remove
    from mosaicdiff.method.pruning import default_s_max

    name = args.model or "digits-dit"
    dense = model if model is not None else subject_named(name).load()
    adapter = adapter_for(dense)
    groups = adapter.groups(adapter.blocks(dense)[0])  # what `mosaicdiff.prune` checks
    heads = min(g.num_units for g in groups.values() if g.kind == "heads")
    limit = (heads - 0.5) / heads  # heads_to_remove rounds half up
    for s in sparsities:
        for method in args.methods:
            largest = default_s_max(s) if method == "mosaic" else s
            try:
                heads_to_remove(heads, largest)
            except ValueError:
                how = (f"lets a stage reach sparsity {largest:g} (the cap min(0.9, sparsity + 0.1))"
                       if method == "mosaic" else "prunes every stage at it")
                bound = limit - 0.1 if method == "mosaic" else limit
                raise UsageError(f"{flag} {s:g}: --methods {method} {how}, which removes all {heads} attention heads "
                                 f"per block of {name}; use {flag} below {bound:.4f}"
                                 + (" or leave mosaic out of --methods" if method == "mosaic" else ""),
                                 f"mosaicdiff {args.command}") from None


def cmd_demo(args) -> int:
    from mosaicdiff.app import demo

    check_output_folder(args.out)
    experiment = _experiment_kwargs(args)
    check_heads_kept_everywhere(args, [args.sparsity], "--sparsity", experiment["model"])
    t0 = time.perf_counter()
    report = demo.run_demo(args.out, sparsity=args.sparsity, guidance_scale=args.guidance_scale, **experiment)
    print(demo.format_table(report))
    print(f"wrote {Path(args.out) / 'report.json'} and PNGs in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from mosaicdiff.app import evaluate

    check_output_folder(args.out)
    experiment = _experiment_kwargs(args)
    check_heads_kept_everywhere(args, args.sparsities, "--sparsities", experiment["model"])
    result = evaluate.run_eval(args.out, sparsities=args.sparsities, guidance_scales=args.guidance_scales,
                               **experiment)
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
    from mosaicdiff.method.pruning import default_s_max

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
    from mosaicdiff.method.pruning import default_s_max

    if args.stage_sparsities is not None:
        return max(args.stage_sparsities), "keep every --stage-sparsities value"
    if args.method != "mosaic":
        return args.sparsity, "use --sparsity"
    if args.max_stage_sparsity is not None:
        return args.max_stage_sparsity, "use --max-stage-sparsity"
    return default_s_max(args.sparsity), "pass --max-stage-sparsity (default min(0.9, --sparsity + 0.1))"


def check_heads_kept(model, args) -> None:
    """Every stage keeps at least one attention head (checked on the loaded model, before pruning)."""
    from mosaicdiff.method.compact import heads_to_remove

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
    """Prune and save; under ``torchrun`` calibration is data parallel and rank 0 saves.

    Every rank must load the same dense model and calibration data (checked before any work: a
    digest of each per rank, `check_same_inputs`). Every rank prunes: after the all-reduce each
    holds the same float64 Hessians, and OBS is deterministic, so all ranks compute the same model
    (checked: a digest per rank) while rank 0 alone writes it. Rank 0 pruning alone would gain
    nothing (the others would wait idle) and would need the pruned model broadcast; this way
    `mosaicdiff.prune` returns the model on every rank, as without a process group.
    """
    from mosaicdiff import api
    from mosaicdiff.core import distributed
    from mosaicdiff.core.sampling import default_scheduler

    check_prune_flags(args)
    scheduler = default_scheduler()
    check_boundaries(args.boundaries, len(scheduler.alphas_cumprod))
    out = check_model_folder(args.out)
    with distributed.launched_process_group(args.device) as device:
        quiet_other_ranks()
        check_same_command_line(args)
        main = distributed.is_main_process()
        model = load_model(args.model, device, allow_mosaic=False)
        check_heads_kept(model, args)
        needs_data = args.method in ("mosaic", "uniform") or args.calibration is not None
        calib = load_calibration(args.calibration, model) if needs_data else None
        check_same_inputs(model, calib)  # before any calibration pass: their statistics would be summed
        mosaic = api.prune(
            model, calib, args.sparsity, method=args.method, boundaries=args.boundaries,
            stage_sparsities=args.stage_sparsities, num_inference_steps=args.steps, scheduler=scheduler,
            samples_per_stage=args.samples_per_stage, speed_threshold=args.speed_threshold,
            log_snr_weight=args.log_snr_weight, align=args.align, batch_size=args.batch_size, seed=args.seed,
            progress=main and not args.no_progress, s_max=args.max_stage_sparsity,
            share_producers=not args.independent_stages)
        _warn_if_ranks_pruned_differently(mosaic)
        if not main:
            return 0
        mosaic.save_pretrained(str(out))
    rep = mosaic.memory_report()
    stages = ", ".join(f"{name}[{t0},{t1}) sparsity {sp:.2f}" for name, t0, t1, sp in mosaic.stage_ranges)
    print(f"saved {args.method} mosaic to {args.out}: {stages}")
    print(f"memory: {rep['mosaic_bytes'] / 2**20:.2f} MiB vs dense {rep['dense_bytes_same_dtype'] / 2**20:.2f} MiB "
          f"(ratio {rep['ratio']:.2f}; {rep['ratio_dedup']:.2f} against one embedder instead of one per block)")
    return 0


def quiet_other_ranks() -> None:
    """Under a process group, INFO records on rank 0 only (warnings and errors from every rank)."""
    import logging

    from mosaicdiff.core import distributed

    if not distributed.is_main_process():
        logging.getLogger("mosaicdiff").setLevel(logging.WARNING)


def check_same_command_line(args) -> None:
    """Under a process group: every rank was given the same flags (a per-rank seed is an error)."""
    from mosaicdiff.core import distributed

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items()) if k != "func"}
    try:
        distributed.check_same_across_ranks(settings, "command-line settings")
    except ValueError as exc:
        raise UsageError(str(exc), f"mosaicdiff {args.command}") from None


def check_same_inputs(model, calibration) -> None:
    """Under a process group: every rank loaded the same dense model and calibration data.

    The same command line can still read different files (another node's copy of the model, a
    calibration file rewritten in between); their Hessian sums would be added as if they were one
    data set. A SHA-256 of each (`mosaicdiff.core.distributed.state_digest`,
    ``ConditionedCalibration.digest``) is compared across the ranks.

    Raises:
        UsageError: on every rank, naming what differs and each rank's digest.
    """
    from mosaicdiff.core import distributed

    if not distributed.is_distributed():
        return
    digests = {"dense model sha256": distributed.state_digest(model)[:16],
               "calibration data sha256": None if calibration is None else calibration.digest()[:16]}
    try:
        distributed.check_same_across_ranks(digests, "inputs", "every rank must read the same --model and "
                                            "--calibration files (copy them, or use a shared file system)")
    except ValueError as exc:
        raise UsageError(str(exc), "mosaicdiff prune") from None


def _warn_if_ranks_pruned_differently(mosaic) -> None:
    import logging

    from mosaicdiff.core import distributed

    if not distributed.is_distributed():
        return
    try:
        distributed.check_same_across_ranks({"pruned model sha256": distributed.state_digest(mosaic)},
                                            "pruned models")
    except ValueError as exc:  # rank 0's model is still a correct prune: save it, but say so
        logging.getLogger(__name__).warning("%s; rank 0 saves its own", exc)


# ----------------------------------------------------------------------------- sample, bench

def sample_labels_for(args, num_classes: int, num_samples: int):
    """The class ids to sample: --labels (each in [0, num_classes)) or `num_samples` cycling 0..9."""
    import torch

    if args.labels is None:
        return sample_labels(num_samples, num_classes)
    bad = [v for v in args.labels if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}",
                         "mosaicdiff sample")
    return torch.tensor(args.labels)


def cmd_sample(args) -> int:
    """A PNG grid (``--out FILE``), or with ``--num-images N`` N images in ``--out DIR/samples.npz``."""
    if sample_mode(args) == "folder":
        return _sample_to_folder(args)
    from mosaicdiff.core import sampling
    from mosaicdiff.eval.plots import save_image_grid

    out = Path("samples.png") if args.out is None else args.out
    check_output_image(out)
    model = load_model(args.model, args.device)
    if int(model.config.in_channels) != 1:
        raise ValueError(f"`mosaicdiff sample` writes pixel grids for 1-channel models; this model has "
                         f"in_channels={model.config.in_channels} (latents need a VAE: `mosaicdiff sample "
                         f"--num-images N --vae PATH --out DIR`)")
    num_samples = 20 if args.num_samples is None else args.num_samples
    labels = sample_labels_for(args, int(model.config.num_embeds_ada_norm), num_samples)
    noise = sampling.make_noise(model, len(labels), seed=args.seed)
    images = sampling.sample(model, labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                             noise=noise, progress=not args.no_progress)
    save_image_grid(images, out, nrow=10 if args.nrow is None else args.nrow)
    print(f"wrote {len(images)} samples to {out}")
    return 0


#: Flags of one mode of `sample` only: (grid, folder).
_GRID_FLAGS = {"num_samples": "--num-samples", "nrow": "--nrow"}
_FOLDER_FLAGS = {"vae": "--vae", "shard_size": "--shard-size", "batch_size": "--batch-size"}


def sample_mode(args) -> str:
    """``"folder"`` with --num-images, else ``"grid"``; flags of the other mode are refused.

    Raises:
        UsageError: --out is a folder without --num-images, an image file name with it, or a
            flag of the other mode.
    """
    prog = "mosaicdiff sample"
    folder = args.num_images is not None
    if not folder and args.out is not None and args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder: add --num-images N to sample N images into "
                         f"{args.out / 'samples.npz'}, or give an image file name for a grid", prog)
    if folder and args.out is None:
        raise UsageError("--num-images N needs --out DIR (the folder for the shards and samples.npz)", prog)
    if folder and args.out.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npz"):
        raise UsageError(f"--num-images writes a folder (shards/ and samples.npz), but --out {args.out} names a "
                         f"file; give a folder such as --out {args.out.with_suffix('')}", prog)
    other, mode = (_GRID_FLAGS, "--num-images") if folder else (_FOLDER_FLAGS, "a grid")
    given = [flag for key, flag in other.items() if getattr(args, key) is not None]
    if given:
        hint = "they set the PNG grid" if folder else "they need --num-images N and --out DIR"
        raise UsageError(f"{', '.join(given)} cannot be used with {mode} ({hint})", prog)
    return "folder" if folder else "grid"


def _sample_to_folder(args) -> int:
    from mosaicdiff.core import distributed, sharded_sampling

    check_output_folder(args.out)
    sharded_sampling.check_output_dir(args.out)  # samples.npz a folder, shards a file: before loading the model
    # an hour: ranks wait at the end for the slowest one's last shard and for rank 0's assembly
    with distributed.launched_process_group(args.device, timeout_s=3600) as device:
        quiet_other_ranks()
        check_same_command_line(args)
        world = distributed.world_size()
        if world > args.num_images:
            raise UsageError(f"{world} ranks for --num-images {args.num_images}: every rank needs at least one "
                             f"image; launch at most {args.num_images} processes (torchrun --nproc-per-node)",
                             "mosaicdiff sample")
        model = load_model(args.model, device)
        vae_path = args.vae if args.vae is not None else _pipeline_vae(args.model)
        vae = None if vae_path is None else load_vae(vae_path, device)
        if args.labels is not None:
            sample_labels_for(args, int(model.config.num_embeds_ada_norm), len(args.labels))  # range check
        path = sharded_sampling.sample_to_npz(
            model, args.out, args.num_images, seed=args.seed, labels=args.labels, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, vae=vae,
            shard_size=args.shard_size or sharded_sampling.DEFAULT_SHARD_SIZE,
            batch_size=args.batch_size or sharded_sampling.DEFAULT_BATCH_SIZE, progress=not args.no_progress)
        if distributed.is_main_process():
            print(f"wrote {args.num_images} images to {path} (arr_0: uint8 NHWC) from {world} process(es)")
    return 0


def _pipeline_vae(model: str | None) -> Path | None:
    """The ``vae/`` of a DiTPipeline folder given as --model (None when there is none)."""
    if model is None:
        return None
    vae = Path(model) / "vae"
    return vae if (vae / "config.json").is_file() else None


def load_vae(path, device: str):
    """A diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``), in eval mode.

    Raises:
        FileNotFoundError: no such folder or no config.json. ValueError: another class or
            weights diffusers cannot load.
    """
    import json

    from diffusers import AutoencoderKL

    p = Path(path)
    subfolder = "vae" if (p / "vae" / "config.json").is_file() else None
    config = p / (subfolder or "") / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--vae {p}: no config.json (nor vae/config.json) there; pass a diffusers "
                                f"AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema saved locally")
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except ValueError as exc:
        raise ValueError(f"--vae {config} is not valid JSON ({exc})") from None
    if found != "AutoencoderKL":
        raise ValueError(f"--vae {p} holds a {found or 'model without a _class_name'}, not an AutoencoderKL")
    try:
        vae = AutoencoderKL.from_pretrained(str(p), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load the AutoencoderKL in {p}: {one_line(exc)}") from None
    return vae.to(device).eval()


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
