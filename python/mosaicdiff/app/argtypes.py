"""argparse ``type=`` functions: a bad value becomes ``argument --flag: <message>``, exit 2.

Lists are one comma-separated argument (``--labels 1,2,3``), parsed by `comma_list`, so that a
list flag reads like the Python value it becomes and its errors name the whole list.
"""

from __future__ import annotations

import argparse
import math


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


#: The largest target sparsity `mosaicdiff demo` / `eval` prune to: the mosaic allocation caps a
#: stage at min(0.9, target + 0.1) (`mosaicdiff.method.stage_plan.default_s_max`), so a target above
#: 0.9 cannot be reached (and there is no --max-stage-sparsity to change the cap there).
EXPERIMENT_MAX_SPARSITY = 0.9


def experiment_sparsity(text: str) -> float:
    """A sparsity the demo and eval compare every method at: in [0, 0.9]."""
    value = finite_float(text)
    if not 0 <= value <= EXPERIMENT_MAX_SPARSITY:
        raise argparse.ArgumentTypeError(
            f"expected a sparsity in [0, {EXPERIMENT_MAX_SPARSITY:g}] (the mosaic caps a stage at "
            f"min({EXPERIMENT_MAX_SPARSITY:g}, sparsity + 0.1)), got {text!r}")
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


def comma_list(item, count: int | None = None, what: str = "values", unique: bool = False):
    """A comma-separated list of `item` values (exactly `count` of them if given; with `unique`, each
    value once: a repeated point of a sweep would be computed twice)."""
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
        repeated = [p for v, p in zip(values, parts) if values.count(v) > 1]
        if unique and repeated:
            raise argparse.ArgumentTypeError(f"{repeated[0]} is listed more than once in {text!r}; give each value "
                                             f"once")
        return values

    parse.__name__ = f"list of {what}"
    return parse


def choice_list(choices):
    """A comma-separated subset of `choices`."""
    def item(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {text!r} (choose from {', '.join(choices)})")
        return text

    return comma_list(item, what="names", unique=True)


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
