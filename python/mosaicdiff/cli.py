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
before it starts. Exit status: 0 success; 2 (`EXIT_USAGE`, as argparse) a bad command line, input
file or output location; 1 (`EXIT_FAILURE`) the run itself failed; 130 (`EXIT_INTERRUPTED`)
interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

logger = logging.getLogger(__name__)

PRUNE_METHODS = ("mosaic", "uniform", "magnitude", "random")
#: The diffusers class `mosaicdiff` prunes (``_class_name`` in a model folder's config.json).
DIT_CLASS_NAME = "DiTTransformer2DModel"

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Errors that mean "the input is wrong" (command line, input files, output location): exit 2.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)
_MAX_MESSAGE = 600  # characters of an exception message printed without --debug


class UsageError(Exception):
    """A bad command line, found by the parser or by a check before the work starts (exit 2)."""

    def __init__(self, message: str, prog: str = "mosaicdiff"):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors raise `UsageError` (one line, no usage dump, no exit)."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


# ----------------------------------------------------------------------------- argument types
# argparse `type=` functions: a bad value becomes "argument --flag: <message>", exit 2.

def finite_float(text: str) -> float:
    """A finite number (no nan, inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def sparsity(text: str) -> float:
    """A sparsity (fraction removed) in [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number in (0, 1)."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def threshold(text: str) -> float:
    """A threshold relative to a peak, in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def integer(text: str) -> int:
    """A whole number written as one ("1.7" and "1e3" are refused, not truncated)."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_at_least(low: int):
    """`integer` >= `low`."""
    def parse(text: str) -> int:
        value = integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)


def comma_list(item, count: int | None = None, what: str = "values"):
    """A comma-separated list of `item` values (exactly `count` of them if given)."""
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or "" in parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        try:
            values = [item(p) for p in parts]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} in {text!r}" if len(parts) > 1 else str(exc)) from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated {what}, got {len(values)} in {text!r}")
        return values

    parse.__name__ = f"list of {what}"
    return parse


def choice_list(choices):
    """A comma-separated subset of `choices`."""
    def item(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {text!r} (choose from {', '.join(choices)})")
        return text

    return comma_list(item, what="names")


def boundary_pair(text: str) -> tuple[int, int]:
    """``t_low,t_high``: two integer timesteps with 0 < t_low < t_high."""
    t_low, t_high = comma_list(integer, count=2, what="integer timesteps t_low,t_high")(text)
    if not 0 < t_low < t_high:
        raise argparse.ArgumentTypeError(f"expected 0 < t_low < t_high, got {text!r}")
    return t_low, t_high


def device(text: str) -> str:
    """A torch device that exists here (``cuda`` needs a visible GPU)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
                                             f"here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return text


# ----------------------------------------------------------------------------- output locations

def _nearest_existing(path: Path) -> Path:
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a probe file in `folder` (the one test that also holds for root and ACLs).

    Raises:
        PermissionError: `folder` cannot be written.
    """
    from mosaicdiff.serialization import write_probe_error

    exc = write_probe_error(folder)
    if exc is None:
        return
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise PermissionError(f"{flag} {target}: cannot write into {folder} ({exc.strerror}); "
                              f"choose another {flag}") from None
    raise exc


def check_output_folder(path: Path, flag: str = "--out", target: Path | None = None) -> None:
    """`path` is, or can be created as, a writable folder (checked before long work; writes nothing).

    `target` (default `path`) is what the user gave for `flag`, named in the messages.

    Raises:
        FileExistsError: `path` is a file. NotADirectoryError: a parent is a file.
        PermissionError: not writable.
    """
    target = path if target is None else target
    if path.exists() and not path.is_dir():
        what = f"{flag} {target}" if target == path else f"{flag} {target}: {path}"
        raise FileExistsError(f"{what} is a file, but it must be a folder; choose another {flag}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotADirectoryError(f"{flag} {target}: {base} is a file, not a folder; choose another {flag}")
    check_writable_folder(base, flag, target)


def check_output_image(path: Path, flag: str = "--out") -> None:
    """`path` can be written as an image file (a known image suffix, not a folder, a writable folder).

    Raises:
        ValueError: unknown image suffix. IsADirectoryError: `path` is a folder.
        NotADirectoryError / PermissionError: see `check_output_folder`.
    """
    from PIL import Image

    Image.init()
    savable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give an image file name such as {path / 'samples.png'}")
    if path.suffix.lower() not in savable:
        raise ValueError(f"{flag} {path}: unknown image type {path.suffix or '(no suffix)'!r}; "
                         f"use a name ending in .png (or .jpg, .bmp, .tif)")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path} exists and is not writable; choose another {flag}")
    check_output_folder(path.parent, flag, target=path)


def check_model_folder(path: Path, flag: str = "--out") -> Path:
    """`serialization.validate_save_directory`, its message in CLI terms (writes nothing)."""
    from mosaicdiff.serialization import validate_save_directory

    try:
        return validate_save_directory(path)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        message = str(exc).removeprefix("save_pretrained: ")
        raise type(exc)(f"{flag} {path}: {message}") from None


# ----------------------------------------------------------------------------- model loading

def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"model config {path} is not valid JSON ({exc}); restore or re-save the model") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _model_config(p: Path) -> tuple[Path, str | None]:
    """The config.json of a model folder `p` and the subfolder holding it (a pipeline's ``transformer``)."""
    if not p.exists():
        raise FileNotFoundError(f"model folder {p} does not exist; pass a DiT folder, or omit --model for "
                                f"the embedded digits DiT")
    if not p.is_dir():
        raise NotADirectoryError(f"model {p} is a file; pass the folder that holds its config.json")
    if (p / "config.json").is_file():
        return p / "config.json", None
    if (p / "transformer" / "config.json").is_file():
        return p / "transformer" / "config.json", "transformer"
    raise FileNotFoundError(f"model folder {p} has no config.json (nor transformer/config.json): expected a "
                            f"{DIT_CLASS_NAME} folder (save_pretrained), a DiTPipeline folder or a mosaic "
                            f"saved by `mosaicdiff prune`")


def load_model(path: str | None, device: str = "cpu", *, allow_mosaic: bool = True):
    """Load the embedded digits DiT (`path` None), a saved `MosaicDiT` folder, or a diffusers DiT folder.

    A diffusers pipeline folder (with a ``transformer/`` subfolder) is accepted too. The class is
    read from ``_class_name`` in config.json first: another model class is refused (diffusers
    would otherwise build a randomly initialised DiT from its config and load none of its weights).

    Raises:
        FileNotFoundError: `path` or its config.json does not exist.
        NotADirectoryError: `path` is a file.
        ValueError: invalid config.json, another model class, a mosaic where `allow_mosaic` is
            False, or weights diffusers cannot load.
    """
    from mosaicdiff.serialization import FORMAT_NAME
    from mosaicdiff.zoo import load_digits_dit

    if path is None:
        return load_digits_dit(device)
    p = Path(path)
    config_path, subfolder = _model_config(p)
    config = _read_config(config_path)
    if config.get("format") == FORMAT_NAME:
        if not allow_mosaic:
            raise ValueError(f"model {p} is an already pruned MosaicDiT; pass the dense {DIT_CLASS_NAME} "
                             f"it was pruned from")
        from mosaicdiff.mosaic import MosaicDiT

        return MosaicDiT.from_pretrained(str(p), device=device).eval()
    found = config.get("_class_name")
    if found != DIT_CLASS_NAME:
        what = f"a {found}" if found else "a model without a _class_name"
        raise ValueError(f"model {p} holds {what} ({config_path}), not a {DIT_CLASS_NAME}: mosaicdiff prunes and "
                         f"samples diffusers DiT transformers only")
    from diffusers import DiTTransformer2DModel

    try:
        model = DiTTransformer2DModel.from_pretrained(str(p), subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:  # missing or mismatched weights
        raise ValueError(f"cannot load the {DIT_CLASS_NAME} in {p}: {_one_line(exc)}") from None
    return model.to(device).eval()


def load_calibration(path: str | None, model):
    """Calibration data on the model's device: a safetensors file with ``x0`` and ``labels``, or the
    digits for digits-shaped models.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: not a safetensors file, tensors missing or of the wrong kind or shape for
            the model (`Calibration.check_model`), or no file given for a model that is not
            digits-shaped (1 x 16 x 16).
    """
    from mosaicdiff.calibrate import Calibration

    null_class = int(model.config.num_embeds_ada_norm)
    model_device = next(model.parameters()).device
    if path is None:
        shape = (int(model.config.in_channels), int(model.config.sample_size))
        if shape != (1, 16):
            raise ValueError(f"no calibration data for a model with (in_channels, sample_size)={shape}; the "
                             f"built-in digits fit (1, 16). Pass --calibration FILE.safetensors with x0 "
                             f"(N, C, H, W) clean latents and labels (N,)")
        from mosaicdiff.demo import digits_calibration

        calib = digits_calibration(null_class)
        return Calibration(calib.x0.to(model_device), calib.labels.to(model_device), null_class=null_class)
    x0, labels = _read_calibration_file(Path(path))
    try:
        calib = Calibration(x0=x0.float().to(model_device), labels=labels.long().to(model_device),
                            null_class=null_class)
        calib.check_model(model)  # shapes and classes of this model, before any long work
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--calibration {path}: {exc}") from None
    return calib


def _read_calibration_file(p: Path):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hint = "write one with safetensors.torch.save_file({'x0': x0, 'labels': labels}, PATH)"
    if not p.exists():
        raise FileNotFoundError(f"--calibration {p}: no such file; {hint}")
    if not p.is_file():
        raise IsADirectoryError(f"--calibration {p} is a folder; pass the .safetensors file ({hint})")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--calibration {p} is not a safetensors file ({_one_line(exc)}); {hint}") from None
    missing = {"x0", "labels"} - set(tensors)
    if missing:
        raise ValueError(f"--calibration {p} lacks the tensors {sorted(missing)} (has {sorted(tensors)}); {hint}")
    x0, labels = tensors["x0"], tensors["labels"]
    if not x0.is_floating_point():
        raise ValueError(f"--calibration {p}: x0 must be floating point (N, C, H, W) data, got {x0.dtype}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"--calibration {p}: labels must be integer class ids, got {labels.dtype}")
    return x0, labels


# ----------------------------------------------------------------------------- subcommands

def cmd_demo(args) -> int:
    from mosaicdiff.demo import main_from_args

    check_output_folder(args.out)
    return main_from_args(args)


def cmd_eval(args) -> int:
    from mosaicdiff.evaluate import main_from_args

    check_output_folder(args.out)
    return main_from_args(args)


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


def check_boundaries(bounds, T: int) -> None:
    if bounds is not None and not bounds[1] < T:
        raise UsageError(f"--boundaries {bounds[0]},{bounds[1]}: t_high must be below the {T} training "
                         f"timesteps (0 < t_low < t_high < {T})", "mosaicdiff prune")


def cmd_prune(args) -> int:
    from mosaicdiff.pruning import prune
    from mosaicdiff.sampling import default_scheduler

    check_prune_flags(args)
    scheduler = default_scheduler()
    check_boundaries(args.boundaries, len(scheduler.alphas_cumprod))
    out = check_model_folder(args.out)
    model = load_model(args.model, args.device, allow_mosaic=False)
    check_heads_kept(model, args)
    needs_data = args.method in ("mosaic", "uniform") or args.calibration is not None
    calib = load_calibration(args.calibration, model) if needs_data else None
    mosaic = prune(model, calib, args.sparsity, method=args.method, boundaries=args.boundaries,
                   stage_sparsities=args.stage_sparsities, num_inference_steps=args.steps, scheduler=scheduler,
                   samples_per_stage=args.samples_per_stage, M=args.M, lam=args.lam, align=args.align,
                   seed=args.seed, progress=not args.no_progress, s_max=args.max_stage_sparsity)
    mosaic.save_pretrained(str(out))
    rep = mosaic.memory_report()
    stages = ", ".join(f"{s.name}[{s.t_start},{s.t_end}) sparsity {s.sparsity:.2f}" for s in mosaic.stages)
    print(f"saved {args.method} mosaic to {args.out}: {stages}")
    print(f"memory: {rep['mosaic_bytes'] / 2**20:.2f} MiB vs dense {rep['dense_bytes_same_dtype'] / 2**20:.2f} MiB "
          f"(ratio {rep['ratio']:.2f})")
    return 0


def sample_labels_for(args, num_classes: int):
    """The class ids to sample: --labels (each in [0, num_classes)) or --num-samples cycling 0..9."""
    import torch

    from mosaicdiff.demo import sample_labels

    if args.labels is None:
        return sample_labels(args.num_samples, num_classes)
    bad = [v for v in args.labels if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}",
                         "mosaicdiff sample")
    return torch.tensor(args.labels)


def cmd_sample(args) -> int:
    from mosaicdiff.demo import save_image_grid
    from mosaicdiff.sampling import make_noise, sample

    check_output_image(args.out)
    model = load_model(args.model, args.device)
    if int(model.config.in_channels) != 1:
        raise ValueError(f"`mosaicdiff sample` writes pixel grids for 1-channel models; this model has "
                         f"in_channels={model.config.in_channels} (latents need a VAE: use diffusers' DiTPipeline)")
    labels = sample_labels_for(args, int(model.config.num_embeds_ada_norm))
    noise = make_noise(model, len(labels), seed=args.seed)
    images = sample(model, labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    noise=noise, progress=not args.no_progress)
    save_image_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {len(images)} samples to {args.out}")
    return 0


def cmd_bench(args) -> int:
    import torch

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script not found at {script}: `mosaicdiff bench` runs from a source "
                                f"checkout (`python benchmarks/gpu_suite.py`)")
    runs_on_cpu = {"--dry-run", "-h", "--help"} & set(args.extra)
    if not runs_on_cpu and not torch.cuda.is_available():
        print("mosaicdiff bench needs a CUDA GPU (none found); `mosaicdiff bench --out DIR --dry-run` rehearses "
              f"it on the CPU. On a GPU machine: `mosaicdiff bench --out DIR` ({script}).")
        return EXIT_FAILURE
    import runpy

    argv = sys.argv
    sys.argv = [str(script), *args.extra]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # the suite's own argparse or its exit status
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILURE)
    finally:
        sys.argv = argv
    return 0


# ----------------------------------------------------------------------------- parser

def _add_global_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """-v / --debug, before or after the subcommand (a subcommand's default must not reset them)."""
    default = argparse.SUPPRESS if sub else False
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, print the traceback too (implies --verbose)")


def _add_prune_parser(sub) -> None:
    pr = sub.add_parser("prune", help="prune a DiT and save the mosaic folder")
    _add_global_options(pr, sub=True)
    pr.add_argument("--model", default=None, help=f"diffusers {DIT_CLASS_NAME} (or DiTPipeline) folder "
                    "(default: the embedded digits DiT)")
    pr.add_argument("--out", type=Path, required=True, help="output folder (checked before pruning starts)")
    pr.add_argument("--sparsity", type=sparsity, default=0.5, help="target mean sparsity, in [0, 1) (default 0.5)")
    pr.add_argument("--max-stage-sparsity", type=open_fraction, default=None,
                    help="--method mosaic: largest sparsity a stage may get, in (0, 1) "
                         "(default min(0.9, --sparsity + 0.1))")
    pr.add_argument("--method", choices=PRUNE_METHODS, default="mosaic")
    pr.add_argument("--boundaries", type=boundary_pair, default=None,
                    help="--method mosaic: middle-stage timesteps t_low,t_high (default: from the schedule)")
    pr.add_argument("--stage-sparsities", type=comma_list(sparsity, what="sparsities in [0, 1)"), default=None,
                    help="explicit sparsities, replacing the allocation: early,middle,late (mosaic) or one value")
    pr.add_argument("--calibration", default=None,
                    help="safetensors file with x0 (N,C,H,W) and labels (N,) (default: the digits)")
    pr.add_argument("--steps", type=positive_int, default=50, help="sampler steps used to weight stage sparsities")
    pr.add_argument("--samples-per-stage", type=positive_int, default=128)
    pr.add_argument("--M", type=threshold, default=0.55,
                    help="middle-stage threshold relative to the peak score, in (0, 1]")
    pr.add_argument("--lam", type=finite_float, default=0.0, help="log-SNR weight of the stage score")
    pr.add_argument("--align", type=positive_int, default=64, help="round kept MLP widths to this multiple")
    pr.add_argument("--seed", type=integer, default=0)
    pr.add_argument("--device", type=device, default="cpu")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_prune)


def _add_sample_parser(sub, default_guidance: float) -> None:
    s = sub.add_parser("sample", help="sample a dense or mosaic model to a PNG grid")
    _add_global_options(s, sub=True)
    s.add_argument("--model", default=None, help="mosaic or diffusers DiT folder (default: the embedded one)")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="image file (default samples.png)")
    s.add_argument("--num-samples", type=positive_int, default=20)
    s.add_argument("--labels", type=comma_list(int_at_least(0), what="class ids"), default=None,
                   help="comma-separated class ids, e.g. 1,2,3 (default: --num-samples ids cycling 0..9)")
    s.add_argument("--steps", type=positive_int, default=50)
    s.add_argument("--guidance-scale", type=finite_float, default=default_guidance)
    s.add_argument("--seed", type=integer, default=0)
    s.add_argument("--nrow", type=positive_int, default=10, help="images per row of the grid")
    s.add_argument("--device", type=device, default="cpu")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    from mosaicdiff import demo, evaluate

    p = Parser(prog="mosaicdiff", description="MosaicDiff: training-free stage-wise structural pruning for "
               "diffusion transformers.")
    _add_global_options(p, sub=False)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="prune the embedded digits DiT and compare methods (CPU, minutes)")
    _add_global_options(d, sub=True)
    demo.add_arguments(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="FID vs sparsity sweep per method and guidance scale")
    _add_global_options(e, sub=True)
    evaluate.add_arguments(e)
    e.set_defaults(func=cmd_eval)

    _add_prune_parser(sub)
    _add_sample_parser(sub, demo.DEFAULT_GUIDANCE)

    b = sub.add_parser("bench", help="GPU benchmark suite: runs benchmarks/gpu_suite.py",
                       description="Runs benchmarks/gpu_suite.py; every argument not listed here is passed to "
                                   "it, e.g. `mosaicdiff bench --out DIR --dry-run` (`mosaicdiff bench -- -h`: "
                                   "the suite's own options).")
    _add_global_options(b, sub=True)
    b.set_defaults(func=cmd_bench, extra=[])
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


# ----------------------------------------------------------------------------- errors and logging

def _one_line(exc: BaseException) -> str:
    """`exc`'s message on one line (whitespace collapsed, long messages cut)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:  # "[Errno 28] ...: 'x'" -> "x: ..."
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " ... (--debug shows it all)"


def describe_error(exc: Exception) -> tuple[int, str]:
    """(exit status, one-line message) of an exception that ended a command."""
    from safetensors import SafetensorError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, SafetensorError):  # a weights or calibration file that is not safetensors
        return EXIT_USAGE, f"not a valid safetensors file: {_one_line(exc)}"
    if isinstance(exc, INPUT_ERRORS):
        return EXIT_USAGE, _one_line(exc)
    if isinstance(exc, OSError):  # disk full, I/O error, a concurrent save, ...
        return EXIT_FAILURE, _one_line(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)"


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
