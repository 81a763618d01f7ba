"""The `mosaicdiff` command line: ``demo | prune | sample | bench | eval``.

Examples::

    mosaicdiff demo                                  # embedded digits DiT, CPU, a few minutes
    mosaicdiff prune --out out/mosaic-digits --sparsity 0.5
    mosaicdiff sample --model out/mosaic-digits --out samples.png
    mosaicdiff eval --out out/eval
    mosaicdiff bench                                 # GPU only: runs benchmarks/gpu_suite.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PRUNE_METHODS = ("mosaic", "uniform", "magnitude", "random")


# ----------------------------------------------------------------------------- model loading

def load_model(path: str | None, device: str = "cpu"):
    """Load the embedded digits DiT (`path` None), a saved `MosaicDiT` dir, or a diffusers DiT dir.

    A diffusers pipeline directory (with a ``transformer/`` subfolder) is accepted too.

    Raises:
        FileNotFoundError: if `path` does not exist.
    """
    from mosaicdiff.zoo import load_digits_dit

    if path is None:
        return load_digits_dit(device)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory {p} does not exist")
    from mosaicdiff.serialization import _is_mosaic_dir

    if _is_mosaic_dir(p):
        from mosaicdiff.mosaic import MosaicDiT

        return MosaicDiT.from_pretrained(str(p), device=device).eval()
    from diffusers import DiTTransformer2DModel

    sub = "transformer" if (p / "transformer" / "config.json").is_file() else None
    model = DiTTransformer2DModel.from_pretrained(str(p), subfolder=sub, local_files_only=True)
    return model.to(device).eval()


def load_calibration(path: str | None, model):
    """Calibration data: a safetensors file with ``x0`` and ``labels``, or the digits for digits-shaped models.

    Raises:
        ValueError: if no file is given and the model is not digits-shaped (1 x 16 x 16).
    """
    from mosaicdiff.calibrate import Calibration

    null_class = int(model.config.num_embeds_ada_norm)
    if path is not None:
        from safetensors.torch import load_file

        tensors = load_file(path)
        missing = {"x0", "labels"} - set(tensors)
        if missing:
            raise ValueError(f"calibration file {path} lacks tensors {sorted(missing)} (has {sorted(tensors)})")
        return Calibration(x0=tensors["x0"].float(), labels=tensors["labels"].long(), null_class=null_class)
    shape = (int(model.config.in_channels), int(model.config.sample_size))
    if shape != (1, 16):
        raise ValueError(f"no calibration data for a model with (in_channels, sample_size)={shape}; the "
                         f"built-in digits fit (1, 16). Pass --calibration FILE.safetensors with x0 "
                         f"(N, C, H, W) clean latents and labels (N,)")
    from mosaicdiff.demo import digits_calibration

    return digits_calibration(null_class)


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str | None) -> list[int] | None:
    vals = _floats(text)
    return None if vals is None else [int(v) for v in vals]


# ----------------------------------------------------------------------------- subcommands

def cmd_demo(args) -> int:
    from mosaicdiff.demo import main_from_args

    return main_from_args(args)


def cmd_eval(args) -> int:
    from mosaicdiff.evaluate import main_from_args

    return main_from_args(args)


def cmd_prune(args) -> int:
    from mosaicdiff.prune import prune
    from mosaicdiff.sampling import default_scheduler

    model = load_model(args.model, args.device)
    calib = load_calibration(args.calibration, model)
    bounds = _ints(args.boundaries)
    if bounds is not None and len(bounds) != 2:
        raise ValueError(f"--boundaries expects t_low,t_high, got {args.boundaries!r}")
    stage_sp = _floats(args.stage_sparsities)
    if stage_sp is not None and len(stage_sp) != 3:
        raise ValueError(f"--stage-sparsities expects three values early,middle,late, got {args.stage_sparsities!r}")
    mosaic = prune(model, calib, args.sparsity, method=args.method,
                   boundaries=tuple(bounds) if bounds else None, stage_sparsities=stage_sp,
                   num_inference_steps=args.steps, scheduler=default_scheduler(),
                   samples_per_stage=args.samples_per_stage, M=args.M, lam=args.lam, align=args.align,
                   seed=args.seed, progress=not args.no_progress)
    mosaic.save_pretrained(str(args.out))
    rep = mosaic.memory_report()
    stages = ", ".join(f"{s.name}[{s.t_start},{s.t_end}) sparsity {s.sparsity:.2f}" for s in mosaic.stages)
    print(f"saved {args.method} mosaic to {args.out}: {stages}")
    print(f"memory: {rep['mosaic_bytes'] / 2**20:.2f} MiB vs dense {rep['dense_bytes_same_dtype'] / 2**20:.2f} MiB "
          f"(ratio {rep['ratio']:.2f})")
    return 0


def cmd_sample(args) -> int:
    import torch

    from mosaicdiff.demo import sample_labels, save_image_grid
    from mosaicdiff.sampling import make_noise, sample

    model = load_model(args.model, args.device)
    if int(model.config.in_channels) != 1:
        raise ValueError(f"`mosaicdiff sample` writes pixel grids for 1-channel models; this model has "
                         f"in_channels={model.config.in_channels} (latents need a VAE: use diffusers' DiTPipeline)")
    num_classes = int(model.config.num_embeds_ada_norm)
    labels = torch.tensor(_ints(args.labels)) if args.labels else sample_labels(args.num_samples, num_classes)
    noise = make_noise(model, len(labels), seed=args.seed)
    images = sample(model, labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    noise=noise, progress=not args.no_progress)
    save_image_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {len(images)} samples to {args.out}")
    return 0


def cmd_bench(args) -> int:
    import torch

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"
    if not torch.cuda.is_available():
        print("mosaicdiff bench needs a CUDA GPU (none found). On a GPU machine run "
              f"`python benchmarks/gpu_suite.py` from the repository root ({script}).")
        return 1
    if not script.is_file():
        print(f"benchmark script not found at {script}: run it from a source checkout "
              "(`python benchmarks/gpu_suite.py`).")
        return 1
    import runpy

    sys.argv = [str(script), *args.extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from mosaicdiff import demo, evaluate

    p = argparse.ArgumentParser(prog="mosaicdiff", description="MosaicDiff: training-free stage-wise "
                                "structural pruning for diffusion transformers.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="prune the embedded digits DiT and compare methods (CPU, minutes)")
    demo.add_arguments(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="FID vs sparsity sweep per method and guidance scale")
    evaluate.add_arguments(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("prune", help="prune a DiT and save the mosaic directory")
    pr.add_argument("--model", default=None, help="diffusers DiT directory (default: embedded digits DiT)")
    pr.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    pr.add_argument("--sparsity", type=float, default=0.5, help="target mean sparsity")
    pr.add_argument("--method", choices=PRUNE_METHODS, default="mosaic")
    pr.add_argument("--boundaries", default=None, help="middle-stage boundaries t_low,t_high")
    pr.add_argument("--stage-sparsities", default=None, help="explicit sparsities early,middle,late")
    pr.add_argument("--calibration", default=None,
                    help="safetensors file with x0 (N,C,H,W) and labels (N,) (default: digits)")
    pr.add_argument("--steps", type=int, default=50, help="sampler steps used to weight stage sparsities")
    pr.add_argument("--samples-per-stage", type=int, default=128)
    pr.add_argument("--M", type=float, default=0.55, help="middle-stage threshold relative to the peak score")
    pr.add_argument("--lam", type=float, default=0.0, help="log-SNR weight of the stage score")
    pr.add_argument("--align", type=int, default=64, help="round kept MLP widths to this multiple")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_prune)

    s = sub.add_parser("sample", help="sample a dense or mosaic model to a PNG grid")
    s.add_argument("--model", default=None, help="mosaic or diffusers DiT directory (default: embedded)")
    s.add_argument("--out", type=Path, default=Path("samples.png"))
    s.add_argument("--num-samples", type=int, default=20)
    s.add_argument("--labels", default=None, help="comma-separated class ids (default 0..9 cycling)")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance-scale", type=float, default=demo.DEFAULT_GUIDANCE)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, default=10)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="GPU benchmark suite (needs CUDA)")
    b.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to benchmarks/gpu_suite.py")
    b.set_defaults(func=cmd_bench)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (survives stream swaps, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(level: int) -> None:
    """Log `mosaicdiff` records at `level` and `mosaic_kernels` ones (backend fallbacks) at WARNING,
    or both at DEBUG when `level` is DEBUG, to stderr (handlers added once per process)."""
    for name in ("mosaicdiff", "mosaic_kernels"):
        log = logging.getLogger(name)
        log.setLevel(level if name == "mosaicdiff" or level <= logging.DEBUG else logging.WARNING)
        if not any(isinstance(h, _StderrHandler) for h in log.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mosaicdiff` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"mosaicdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
