"""The `mosaicdiff` command line: ``demo | prune | sample | bench | eval``.

Examples::

    mosaicdiff demo                                  # embedded digits DiT, CPU, a few minutes
    mosaicdiff prune --out out/mosaic-digits --sparsity 0.5
    mosaicdiff sample --model out/mosaic-digits --out samples.png
    mosaicdiff eval --out out/eval
    mosaicdiff bench --out out/bench                 # GPU (or --dry-run): benchmarks/gpu_suite.py

Errors are one line on stderr, ``mosaicdiff <command>: error: <what is wrong and what to do>``
(``--debug`` adds the traceback). Everything that can be checked without the long work (flag
values, the input model and calibration files, the output location, the device) is checked
before it starts. Exit status (`mosaicdiff.app.errors`): 0 success; 2 a bad command line, input
file or output location; 1 the run itself failed; 130 interrupted with Ctrl-C.

This module is the parser and the dispatch; each subcommand is a function in
`mosaicdiff.app.commands`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from mosaicdiff.app import argtypes as t
from mosaicdiff.app.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, describe_error


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors raise `UsageError` (one line, no usage dump, no exit)."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


# ----------------------------------------------------------------------------- options

def _add_global_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """-v / --debug, before or after the subcommand (a subcommand's default must not reset them)."""
    default = argparse.SUPPRESS if sub else False
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, print the traceback too (implies --verbose)")


def _add_stage_split_options(p: argparse.ArgumentParser) -> None:
    """The closed-form stage split; ``--M`` / ``--lam`` (the paper's symbols) stay as hidden aliases."""
    from mosaicdiff.method import schedule

    p.add_argument("--speed-threshold", type=t.threshold, default=schedule.DEFAULT_SPEED_THRESHOLD,
                   help="middle stage: timesteps whose learning-speed score is at least this fraction of its "
                        f"peak, in (0, 1] (default {schedule.DEFAULT_SPEED_THRESHOLD:g})")
    p.add_argument("--log-snr-weight", type=t.finite_float, default=schedule.DEFAULT_LOG_SNR_WEIGHT,
                   help=f"log-SNR weight of the stage score (default {schedule.DEFAULT_LOG_SNR_WEIGHT:g})")
    # Separate actions, so that an error names the spelling the user typed.
    p.add_argument("--M", dest="speed_threshold", type=t.threshold, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--lam", dest="log_snr_weight", type=t.finite_float, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def _add_experiment_options(p: argparse.ArgumentParser, out: str, what: str, min_steps: int = 1) -> None:
    """The options `demo` and `eval` share (`mosaicdiff.app.experiment` has the defaults)."""
    from mosaicdiff.app import experiment as ex

    methods = ex.KNOWN_METHODS
    p.add_argument("--seed", type=t.integer, default=0)
    p.add_argument("--out", type=Path, default=Path(out), help="output folder")
    p.add_argument("--num-samples", type=t.int_at_least(2), default=ex.DEFAULT_NUM_SAMPLES,
                   help=f"images per {what}, >= 2 (FID needs a covariance)")
    p.add_argument("--steps", type=t.int_at_least(min_steps), default=ex.DEFAULT_STEPS,
                   help="DDIM steps" + (f", >= {min_steps}" if min_steps > 1 else ""))
    p.add_argument("--samples-per-stage", type=t.positive_int, default=ex.DEFAULT_SAMPLES_PER_STAGE,
                   help="calibration samples per stage")
    p.add_argument("--methods", type=t.choice_list(methods), default=list(ex.COMPARED_METHODS),
                   help="comma-separated subset of " + ",".join(methods) + " (default: all but searched, "
                        "whose evolution search takes minutes per sparsity)")
    p.add_argument("--boundaries", type=t.boundary_pair, default=None,
                   help="explicit middle-stage boundaries t_low,t_high")
    _add_stage_split_options(p)
    p.add_argument("--model", default=None,
                   help="an embedded model, digits-dit (default), digits-unet (text-conditioned, its "
                        "transformer blocks pruned as SDXL's) or digits-pixart (text-conditioned DiT in PixArt's "
                        "layout), or a diffusers DiT folder shaped like digits-dit")
    p.add_argument("--num-seeds", type=t.positive_int, default=ex.DEFAULT_NUM_SEEDS,
                   help=f"noise seeds --seed, --seed+1, ... per {what}; their images are pooled for the "
                        f"intervals (default {ex.DEFAULT_NUM_SEEDS})")
    p.add_argument("--threads", type=t.positive_int, default=None,
                   help="torch CPU threads, >= 1 (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_demo_parser(sub) -> None:
    from mosaicdiff.app import commands
    from mosaicdiff.app import experiment as ex

    d = sub.add_parser("demo", help="prune an embedded digits model and compare methods (CPU, minutes)")
    _add_global_options(d, sub=True)
    d.add_argument("--sparsity", type=t.experiment_sparsity, default=ex.DEFAULT_SPARSITY,
                   help=f"target mean sparsity, in [0, {t.EXPERIMENT_MAX_SPARSITY:g}] and keeping an attention head "
                        f"of the model in every stage (default {ex.DEFAULT_SPARSITY:g})")
    d.add_argument("--guidance-scale", type=t.finite_float, default=None,
                   help="classifier-free guidance scale (default: the model's, 1.5; 3 for digits-pixart)")
    # >= 3 steps: the report compares the stage curve along the dense run (schedule.curve_agreement)
    _add_experiment_options(d, "mosaicdiff_demo", "method", min_steps=3)
    d.set_defaults(func=commands.cmd_demo)


def _add_eval_parser(sub) -> None:
    from mosaicdiff.app import commands
    from mosaicdiff.app import experiment as ex

    e = sub.add_parser("eval", help="FID vs sparsity sweep per method and guidance scale")
    _add_global_options(e, sub=True)
    e.add_argument("--sparsities", type=t.comma_list(t.experiment_sparsity, what="sparsities", unique=True),
                   default=list(ex.DEFAULT_SPARSITIES), help="comma-separated mean sparsities, each once, in "
                   f"[0, {t.EXPERIMENT_MAX_SPARSITY:g}] and keeping an attention head of the model in every stage "
                   "(default " + ",".join(str(s) for s in ex.DEFAULT_SPARSITIES) + ")")
    e.add_argument("--guidance-scales", type=t.comma_list(t.finite_float, what="numbers", unique=True),
                   default=list(ex.DEFAULT_GUIDANCES), help="comma-separated guidance scales (default "
                   + ",".join(str(g) for g in ex.DEFAULT_GUIDANCES) + ")")
    _add_experiment_options(e, "mosaicdiff_eval", "point")
    e.set_defaults(func=commands.cmd_eval)


def _add_prune_parser(sub) -> None:
    from mosaicdiff.app import commands
    from mosaicdiff.app import experiment as ex
    from mosaicdiff.app.inputs import DIT_CLASS_NAME
    from mosaicdiff.method import pruning

    pr = sub.add_parser("prune", help="prune a DiT and save the mosaic folder",
                        description="Prune a DiT and save the mosaic folder. Under torchrun (e.g. torchrun "
                                    "--nproc-per-node 8 -m mosaicdiff prune ... --device cuda) each rank calibrates "
                                    "on its share of the batches, the Hessian sums are all-reduced, every rank prunes "
                                    "the same model and rank 0 saves it.")
    _add_global_options(pr, sub=True)
    pr.add_argument("--model", default=None, help=f"diffusers {DIT_CLASS_NAME} (or DiTPipeline) folder "
                    "(default: the embedded digits DiT)")
    pr.add_argument("--out", type=Path, required=True, help="output folder (checked before pruning starts)")
    pr.add_argument("--sparsity", type=t.sparsity, default=ex.DEFAULT_SPARSITY,
                    help=f"target mean sparsity, in [0, 1) (default {ex.DEFAULT_SPARSITY:g})")
    pr.add_argument("--max-stage-sparsity", type=t.open_fraction, default=None,
                    help="--method mosaic: largest sparsity a stage may get, in (0, 1) "
                         "(default min(0.9, --sparsity + 0.1))")
    pr.add_argument("--method", choices=pruning.METHODS, default="mosaic")
    pr.add_argument("--boundaries", type=t.boundary_pair, default=None,
                    help="--method mosaic: middle-stage timesteps t_low,t_high (default: from the schedule)")
    pr.add_argument("--stage-sparsities", type=t.comma_list(t.sparsity, what="sparsities in [0, 1)"), default=None,
                    help="explicit sparsities, replacing the allocation: early,middle,late (mosaic) or one value")
    pr.add_argument("--calibration", default=None,
                    help="safetensors file with x0 (N,C,H,W) and labels (N,) (default: the digits)")
    pr.add_argument("--steps", type=t.positive_int, default=ex.DEFAULT_STEPS,
                    help="sampler steps used to weight stage sparsities")
    pr.add_argument("--samples-per-stage", type=t.positive_int, default=ex.DEFAULT_SAMPLES_PER_STAGE)
    _add_stage_split_options(pr)
    pr.add_argument("--align", type=t.positive_int, default=64, help="round kept MLP widths to this multiple")
    pr.add_argument("--independent-stages", action="store_true",
                    help="let every stage choose its heads/channels freely and store its own q/k/v and fc1 rows "
                         "(default: the stages share one producer storage; docs/results.md compares both)")
    pr.add_argument("--batch-size", type=t.positive_int, default=64,
                    help="calibration batch size (under torchrun the batches are split across the ranks)")
    pr.add_argument("--seed", type=t.integer, default=0)
    pr.add_argument("--device", type=t.device, default="cpu",
                    help="cpu, cuda or cuda:N (under torchrun, cuda is each rank's LOCAL_RANK GPU)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=commands.cmd_prune)


_SAMPLE_DESCRIPTION = """\
Two modes, chosen by --num-images:

  grid (default): --out FILE.png, a grid of --num-samples images (1-channel models).
  folder: --num-images N --out DIR, N images for FID: DIR/samples.npz with arr_0, uint8
    (N, H, W, 3), the layout of the ADM evaluation suite (gray images get 3 equal channels).
    Image i depends only on --seed and i. Shards of --shard-size images are written to
    DIR/shards/ as they finish; the same command again resumes, sampling only missing shards.
    Latent models need a VAE (--vae, or the vae/ of a DiTPipeline --model folder).
    Under torchrun the shards are split across the ranks (the same N images for any number of
    processes), e.g. torchrun --nproc-per-node 8 -m mosaicdiff sample --model M --vae V
    --num-images 50000 --out DIR --device cuda.
"""


def _add_sample_parser(sub) -> None:
    from mosaicdiff.app import commands
    from mosaicdiff.app import experiment as ex
    from mosaicdiff.core import sharded_sampling as ss

    s = sub.add_parser("sample", help="sample a dense or mosaic model to a PNG grid, or N images to an .npz (FID)",
                       description=_SAMPLE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(s, sub=True)
    s.add_argument("--model", default=None, help="mosaic or diffusers DiT folder (default: the embedded one)")
    s.add_argument("--out", type=Path, default=None,
                   help="grid: image file (default samples.png); with --num-images: the output folder")
    s.add_argument("--num-samples", type=t.positive_int, default=None, help="grid: images in the grid (default 20)")
    s.add_argument("--num-images", type=t.positive_int, default=None,
                   help="folder mode: sample this many images into --out DIR/samples.npz (e.g. 50000)")
    s.add_argument("--labels", type=t.comma_list(t.int_at_least(0), what="class ids"), default=None,
                   help="comma-separated class ids, e.g. 1,2,3, cycled over the images (default: 0, 1, 2, ... "
                        "cycling over the classes; the grid cycles 0..9)")
    s.add_argument("--steps", type=t.positive_int, default=ex.DEFAULT_STEPS)
    s.add_argument("--guidance-scale", type=t.finite_float, default=ex.DEFAULT_GUIDANCE)
    s.add_argument("--seed", type=t.integer, default=0)
    s.add_argument("--nrow", type=t.positive_int, default=None, help="grid: images per row (default 10)")
    s.add_argument("--vae", default=None, help="folder mode: diffusers AutoencoderKL folder decoding the latents "
                   "(default: the vae/ of a pipeline --model folder)")
    s.add_argument("--shard-size", type=t.positive_int, default=None,
                   help=f"folder mode: images per shard file (default {ss.DEFAULT_SHARD_SIZE}; part of the settings "
                        f"a resumed run must repeat)")
    s.add_argument("--batch-size", type=t.positive_int, default=None,
                   help=f"folder mode: images per sampling batch (default {ss.DEFAULT_BATCH_SIZE})")
    s.add_argument("--device", type=t.device, default="cpu",
                   help="cpu, cuda or cuda:N (under torchrun, cuda is each rank's LOCAL_RANK GPU)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=commands.cmd_sample)


def _add_bench_parser(sub) -> None:
    from mosaicdiff.app import commands

    b = sub.add_parser("bench", help="GPU benchmark suite: runs benchmarks/gpu_suite.py",
                       description="Runs benchmarks/gpu_suite.py; every argument not listed here is passed to "
                                   "it, e.g. `mosaicdiff bench --out DIR --dry-run` (`mosaicdiff bench -- -h`: "
                                   "the suite's own options).")
    _add_global_options(b, sub=True)
    b.set_defaults(func=commands.cmd_bench, extra=[])


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mosaicdiff", description="MosaicDiff: training-free stage-wise structural pruning for "
               "diffusion transformers.")
    _add_global_options(p, sub=False)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo_parser, _add_eval_parser, _add_prune_parser, _add_sample_parser, _add_bench_parser):
        add(sub)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; only `bench` takes arguments it does not know (they go to the benchmark suite)."""
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.extra = extra[1:] if extra[:1] == ["--"] else extra
    elif extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `mosaicdiff {args.command} --help`)",
                         prog=f"mosaicdiff {args.command}")
    return args


# ----------------------------------------------------------------------------- logging and dispatch

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


def _error(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mosaicdiff` console script; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except UsageError as exc:
        return _error(exc.prog, str(exc), EXIT_USAGE)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(logging.DEBUG if debug or getattr(args, "verbose", False) else logging.INFO)
    prog = f"mosaicdiff {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (--debug: the traceback)
        if debug:
            traceback.print_exc()
        code, message = describe_error(exc)
        return _error(getattr(exc, "prog", prog), message, code)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
